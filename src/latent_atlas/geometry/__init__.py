"""Geometry of the latent space (METHODS §8).

Metrics and affine post-processings (``metrics``), a Gaussianising flow (``flow``), the per-layer measurement
of a store (``measure``) and the readout-rescaling check (``readout``).
"""

from latent_atlas.geometry.metrics import (
    Anisotropy,
    PostProcessing,
    anisotropy,
    cluster_bootstrap,
    cosine_contributions,
    effective_rank,
    euclidean_contributions,
    fit_post_processing,
    intra_sentence_similarity,
    is_powered,
    isoscore,
    massive_rows,
    maximum_explainable_variance,
    mean_intra_sentence_similarity,
    random_pairs,
    self_similarity,
    twonn,
    weighted_pca_variances,
)

__all__ = [
    "Anisotropy",
    "PostProcessing",
    "anisotropy",
    "cluster_bootstrap",
    "cosine_contributions",
    "effective_rank",
    "euclidean_contributions",
    "fit_post_processing",
    "intra_sentence_similarity",
    "is_powered",
    "isoscore",
    "massive_rows",
    "maximum_explainable_variance",
    "mean_intra_sentence_similarity",
    "random_pairs",
    "self_similarity",
    "twonn",
    "weighted_pca_variances",
]
