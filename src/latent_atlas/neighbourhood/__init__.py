"""Neighbourhoods of points in the latent space (RQ2): sampling, paths, decoding, exact data neighbours.

- :mod:`~latent_atlas.neighbourhood.knn`: exact k nearest stored states by blocked matrix products over
  the HDF5 store, and per-layer statistics (mean, std, typical norm, per-dimension cosine shares);
- :mod:`~latent_atlas.neighbourhood.sampling`: direction families, samples at relative radii, linear and
  spherical interpolation;
- :mod:`~latent_atlas.neighbourhood.decode`: decode many states with lenses or the model itself and
  compare them with a reference;
- :mod:`~latent_atlas.neighbourhood.pipeline`: the tables the workflow writes;
- :mod:`~latent_atlas.neighbourhood.stability`: a point's stability curves with intervals (torch-free, for
  the figures).
"""
