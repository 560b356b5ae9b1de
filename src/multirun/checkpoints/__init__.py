"""Checkpoints: serialization, blob exporters, the checkpoint store and the replay cache."""
