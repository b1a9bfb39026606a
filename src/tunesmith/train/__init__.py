"""Training: the one loop, batching, schedules, checkpoints, progress."""
