"""Aerie trainer: CLI, DeepSpeed engine, training loop, checkpoints, export and evaluation."""
