"""The training loop and what it owns: the trainer, the backbone's engine, the optimizers and their schedules,
the checkpoint lifecycle, the loop's own state and the run folder."""
