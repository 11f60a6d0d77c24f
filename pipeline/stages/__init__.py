"""The DVC stages: one thin module per stage, run as ``python -m pipeline.stages.<name>``."""
