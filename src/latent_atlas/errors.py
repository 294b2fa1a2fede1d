"""Errors that name the problem and the fix.

Every error raised for bad input derives from :class:`LatentAtlasError`, so the workflow's scripts can
let them through unchanged: their message is what the user reads in the job log. Advice to rebuild a file
with ``snakemake`` is given only for a file a rule of the workflow makes (:func:`rebuild_advice`).
"""

import os
import re
from pathlib import Path


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


class DiskSpaceError(LatentAtlasError):
    """An output would not fit on its disk; the message says how much it needs and how to need less."""


_WORKFLOW_OUTPUTS = tuple(
    re.compile(pattern)
    for pattern in (
        r"results/activations/[^/]+/[^/]+\.h5",
        r"results/models/[^/]+/manifest\.json",
        r"results/corpora/[^/]+\.parquet",
        r"results/lenses/[^/]+/[^/]+\.tuned-lens\.pt",
    )
)


def workflow_target(path: str | os.PathLike[str]) -> str | None:
    """``path`` as a Snakemake target when a rule of the workflow makes it (from the working directory), else None."""
    try:
        relative = Path(path).absolute().relative_to(Path.cwd()).as_posix()
    except ValueError:
        return None
    return relative if any(pattern.fullmatch(relative) for pattern in _WORKFLOW_OUTPUTS) else None


def rebuild_advice(path: str | os.PathLike[str], what: str = "Delete it and rebuild it") -> str:
    """`` {what} with `snakemake {target}`.`` for an output of the workflow; empty for any other file."""
    target = workflow_target(path)
    return f" {what} with `snakemake {target}`." if target else ""
