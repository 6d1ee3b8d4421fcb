"""Aerie models: the Eagle3 draft head, frozen target backends and modality adapters."""
