"""Offline training on a dataset: SFT, DPO, ORPO and reward models (no rollouts, no Ray)."""
