"""The draft architectures (Eagle3 chains, DFlash blocks) behind base.py's DraftModel protocol."""
