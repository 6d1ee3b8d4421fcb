"""Aerie data pipeline: sources, chat templating, vocabulary, regeneration, hidden-state store, batching."""
