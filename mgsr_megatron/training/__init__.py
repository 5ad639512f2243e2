"""The distillation trainer: loop, optimizer, checkpointing, metrics."""
