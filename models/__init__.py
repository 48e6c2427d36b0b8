"""Loading causal LMs and tokenizers, LoRA wrapping, per-token log-probs, tiny test models, the demo model."""
