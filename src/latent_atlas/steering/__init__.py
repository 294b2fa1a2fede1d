"""Steering (RQ2): move a model's states on purpose and measure what its behaviour does (METHODS §7).

- :mod:`~latent_atlas.steering.interventions`: edits of the forward pass with one strength per batch row;
- :mod:`~latent_atlas.steering.vectors`: ActAdd, mean-difference, in-context vectors, ITI heads, optimised
  vectors;
- :mod:`~latent_atlas.steering.generate`: batched generation and the scores (perplexity, off-target KL);
- :mod:`~latent_atlas.steering.pipeline`: the sweeps and tables the workflow writes.
"""
