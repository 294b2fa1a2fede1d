"""Training data and small-LM training (issue: 'Training data shapes the space').

- :mod:`~latent_atlas.training.corpora`: register-labelled training corpora assembled offline from
  public-domain and freely licensed texts that Debian packages ship (``config/training/debian-sources.yaml``).
"""
