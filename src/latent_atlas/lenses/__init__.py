"""Vocabulary lenses: read any residual state as a distribution over the vocabulary (METHODS §1-4).

Every lens has one interface: ``logits(h, layer)`` for states ``h`` of shape ``(..., d)`` taken at
``resid.{layer}``, and ``top_k``. Lenses that need fitting are built from a model (and data) by
classmethods and saved/loaded with a config JSON and a hash of the unembedding they were fitted to.
"""

from latent_atlas.lenses.base import Lens, Unembed
from latent_atlas.lenses.inverse_embedding import InverseEmbeddingLens
from latent_atlas.lenses.logit import LogitLens
from latent_atlas.lenses.semantic_basis import SemanticBasisLens
from latent_atlas.lenses.tuned import TunedLens

__all__ = ["InverseEmbeddingLens", "Lens", "LogitLens", "SemanticBasisLens", "TunedLens", "Unembed"]
