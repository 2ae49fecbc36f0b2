"""Training a DDPM, one job per module: config.py (TrainConfig, presets,
validation), run_folder.py (the run folder: claim and lock, ownership, pruning,
config.json, metrics.jsonl), distributed.py (torchrun: ranks, work rank 0 alone
does, stop agreement, RNG state), trainer.py (the step, the EMA, checkpoint
state, the loop), curves.py (curves.png) and tensorboard.py (--tensorboard). fastddpm.train is their command line. Import from the
modules: this file imports nothing."""
