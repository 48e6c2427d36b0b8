"""Distillation and rejection sampling: generate -> verify -> keep a dataset, then SFT a student on it."""
