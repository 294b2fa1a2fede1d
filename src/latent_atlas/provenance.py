"""Provenance: hashes, code version, and outputs that appear only when complete."""

import contextlib
import datetime as dt
import glob
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import latent_atlas
from latent_atlas.errors import DiskSpaceError

_HASH_BLOCK = 1 << 22


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to JSON with sorted keys and no whitespace, so equal configs hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """Return a short, stable hash of a config fragment (first 16 hex digits of its sha256)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


@cache
def code_version() -> str:
    """Return the package version plus the git commit of the checkout, with ``-dirty`` if modified.

    Outside a git checkout (an installed wheel) only the package version is returned.
    """
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return latent_atlas.__version__
    return f"{latent_atlas.__version__}+g{commit}" if commit else latent_atlas.__version__


def utc_now() -> str:
    """Return the current UTC time in ISO 8601, to the second."""
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


def execution_context() -> dict[str, str]:
    """Where a job ran, when a scheduler says so: the SLURM job id and node (nothing for a local run)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job_id": job, "slurm_node": os.environ.get("SLURMD_NODENAME", "")} if job else {}


def provenance_record(config_fragment: Any, **extra: Any) -> dict[str, Any]:
    """Return the provenance every output carries: config hash, code version, time, where it ran, and ``extra``."""
    return {
        "config_hash": config_hash(config_fragment),
        "code_version": code_version(),
        "created": utc_now(),
        **execution_context(),
        **extra,
    }


def temporary_sibling(path: Path) -> Path:
    """Return a temporary name next to ``path`` (same filesystem, so a rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that were killed (their process is gone).

    A writer killed hard (SIGKILL, out of memory, a cluster's time limit) cannot remove its temporary, which
    can be as large as the output; the next writer of the same output removes it. A temporary whose process
    still runs on this machine is left alone. Returns what was removed.
    """
    removed = []
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            _remove(stale)
            removed.append(stale)
    return removed


def _process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def require_free_space(path: str | os.PathLike[str], needed_bytes: int, what: str, fix: str) -> None:
    """Raise :class:`DiskSpaceError` before writing ``what`` to ``path`` when its disk has less than it needs.

    A disk that fills up half-way through a large write fails late with the storage library's own message
    (``No space left on device``), after minutes of work; this check fails first and says what to change.
    ``fix`` names the config keys that make the output smaller.
    """
    existing = Path(path)
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if needed_bytes > free:
        raise DiskSpaceError(
            f"writing {what} to {path} needs about {_gigabytes(needed_bytes)}, but its disk has "
            f"{_gigabytes(free)} free. Free space there, or {fix}."
        )


def _gigabytes(n_bytes: int) -> str:
    """A byte count as ``1.23 GB``."""
    return f"{n_bytes / 1e9:.2f} GB"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; rename it to ``path`` only if the block succeeds.

    A crash or an exception leaves no file at ``path`` (an existing one is kept untouched), so no later
    run can mistake a half-written output for a complete one. Works for files and directories.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = temporary_sibling(final)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary output {tmp}")
        _remove(final)
        os.replace(tmp, final)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Remove a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | os.PathLike[str], payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def read_tables(paths: Iterable[str | os.PathLike[str]]) -> Any:
    """Read parquet tables into one polars table, columns matched by name (absent ones null)."""
    import polars as pl

    return pl.concat([pl.read_parquet(path) for path in paths], how="diagonal_relaxed")


def write_parquet_with_provenance(table: Any, path: str | os.PathLike[str], meta: dict[str, Any]) -> None:
    """Write a polars table to parquet atomically, with ``meta`` as JSON under the ``latent_atlas`` key."""
    with atomic_output(path) as tmp:
        table.write_parquet(tmp, metadata={"latent_atlas": json.dumps(meta, default=str)})
