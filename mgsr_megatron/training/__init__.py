"""The distillation trainer: loop, optimizer, checkpointing, metrics.

Public:
  run.train, run.build_trainer   `mgsr train`: the whole run, or a Trainer ready to step
  trainer.Trainer                one training step at a time (`train_step`, `validation_loss`)
  smoke                          a tiny end-to-end setup for smoke runs (tools/gpu_check.py, tests)
checkpoint.py, data.py, metrics.py and optimizer.py serve the trainer.
"""
