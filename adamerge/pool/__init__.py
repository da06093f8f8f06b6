"""The models of a run: the pool config, the pretrained model and its experts read lazily from disk (HF
directories, safetensors, PEFT LoRA adapters, hub references), their fingerprint, FW-Merging's candidates."""
