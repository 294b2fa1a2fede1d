"""latent-atlas: study the latent spaces that language models induce.

The library behind the Snakemake workflow: model acquisition, corpora, the HDF5 activation store and
extraction. It never imports snakemake; the workflow's scripts call into it.
"""

from latent_atlas.errors import (
    ConfigError,
    CorpusError,
    LatentAtlasError,
    ModelAcquisitionError,
    StoreError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CorpusError",
    "LatentAtlasError",
    "ModelAcquisitionError",
    "StoreError",
    "__version__",
]
