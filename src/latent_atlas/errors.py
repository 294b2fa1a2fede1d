"""Errors that name the problem and the fix.

Every error raised for bad input derives from :class:`LatentAtlasError`, so the workflow's scripts can
let them through unchanged: their message is what the user reads in the job log.
"""


class LatentAtlasError(Exception):
    """Base class for every error caused by bad input (config, files, models)."""


class ConfigError(LatentAtlasError, ValueError):
    """The configuration is invalid; the message names the key and the fix."""


class ModelAcquisitionError(LatentAtlasError):
    """A model could not be fetched, verified or converted."""


class CorpusError(LatentAtlasError):
    """A corpus could not be read or has the wrong shape."""


class StoreError(LatentAtlasError):
    """An activation store is missing, foreign, truncated, incomplete or does not match its inputs."""
