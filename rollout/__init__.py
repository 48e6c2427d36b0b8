"""Inference engines behind one interface, the Ray rollout worker, sampling parameters."""
