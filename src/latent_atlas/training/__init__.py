"""Training data and small-LM training (issue: 'Training data shapes the space').

- :mod:`~latent_atlas.training.debian`: register-labelled training corpora assembled offline from
  public-domain and freely licensed texts that Debian packages ship (``config/training/debian-sources.yaml``),
  read by the format modules of :mod:`~latent_atlas.training.extractors`;
- :mod:`~latent_atlas.training.hub`: the same table from a streamed Hugging Face dataset, labelled by the
  register classifier of :mod:`~latent_atlas.training.classifier`; :mod:`~latent_atlas.training.text` holds
  what both builders share (cleaning, cutting, deduplication, splits, pieces and caps).
"""
