"""Aerie models: draft architectures, training objectives and frozen target backends."""
