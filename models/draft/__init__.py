"""The Eagle3 draft architectures, their training-time-test objective and draft vocabulary."""
