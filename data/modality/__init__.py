"""Modality adapters: raw samples to target inputs and loss masks."""
