"""The draft architectures (Eagle3 chains, DFlash blocks) behind models/draft/base.py's DraftModel protocol."""
