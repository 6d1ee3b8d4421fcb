"""Frozen target models: the TargetModel interface and its backends."""
