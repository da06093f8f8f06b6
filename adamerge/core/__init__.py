"""The merge itself, model-agnostic: task vectors (dense, LoRA factors, sharded), coefficients and masks, the
functional merged model and its weighted-sum kernel, the data-free transforms (DARE, TIES, consensus, LiNeS)
and the losses as pure functions."""
