"""Learned readers of the latent space: an embedding language model (ELM) and semantic clustering (METHODS §4, §6)."""
