"""The training loop and what it owns: the trainer, the backbone's engine, the optimizers and their schedules,
the checkpoint lifecycle, the run folder and stop signals."""
