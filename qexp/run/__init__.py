"""One training run: the Hydra entry point, the engine, checkpoints, records, signals, DDP, schedules."""
