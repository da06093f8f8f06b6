"""One run of adamerge as a program: ``program.run(cfg)`` (pool → method → fit → evaluate → export), the
Trainer side in ``fit``, the command line's errors and signals in ``cli``. train.py is the Hydra shim over it."""
