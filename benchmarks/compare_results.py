"""Compare the tables of two pipeline runs: does a faster run give the same outputs?

Every parquet file under ``OLD/results`` is read beside the same path under ``NEW/results``: columns and shapes
must match, non-float columns exactly, float columns to ``--tolerance`` (0: bit for bit; NaN equals NaN).
Columns named in ``--timings`` (wall-clock durations such as a training log's ``seconds``) are reported apart,
since no two runs share them. Provenance lives in each file's metadata, not its columns, so it is not compared.

Usage:
    .venv/bin/python benchmarks/compare_results.py OLD_RUN_DIR NEW_RUN_DIR [--tolerance 0] [--timings seconds]

Exits with 1 when any table differs beyond the tolerance or is missing from NEW.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl


def column_difference(old: pl.Series, new: pl.Series) -> tuple[str, float] | None:
    """How two columns differ and by how much (the largest |a-b| of floats; inf otherwise), or None if they agree."""
    if old.dtype.is_float() and new.dtype.is_float():
        a, b = old.to_numpy().astype(np.float64), new.to_numpy().astype(np.float64)
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            return "NaN in one run only", float("inf")
        gap = np.abs(np.where(np.isnan(a), 0.0, a - b))
        worst = float(gap.max()) if len(gap) else 0.0
        return None if worst == 0 else (f"max |a-b| = {worst:.2g}", worst)
    if old.equals(new, check_names=False):
        return None
    if old.dtype.is_nested() or new.dtype.is_nested():
        return "differs", float("inf")
    return f"{int((old.cast(pl.String) != new.cast(pl.String)).fill_null(True).sum())} rows", float("inf")


def compare_table(old: Path, new: Path, tolerance: float, timings: set[str]) -> tuple[list[str], list[str]]:
    """(differences beyond the tolerance, timing columns that differ) of one table."""
    a, b = pl.read_parquet(old), pl.read_parquet(new)
    if a.columns != b.columns or a.shape != b.shape:
        return [f"columns or shape: {a.shape} {b.shape}, {sorted(set(a.columns) ^ set(b.columns))}"], []
    beyond, timed = [], []
    for name in a.columns:
        difference = column_difference(a[name], b[name])
        if difference is None:
            continue
        text, size = difference
        if name in timings:
            timed.append(f"{name} ({text})")
        elif size > tolerance:
            beyond.append(f"{name} ({text})")
    return beyond, timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="a run directory (holding results/)")
    parser.add_argument("new", type=Path)
    parser.add_argument("--tolerance", type=float, default=0.0, help="largest |old - new| allowed in float columns")
    parser.add_argument("--timings", nargs="*", default=["seconds"], help="wall-clock columns, reported apart")
    args = parser.parse_args()
    tables = sorted(path.relative_to(args.old) for path in (args.old / "results").rglob("*.parquet"))
    if not tables:
        parser.error(f"{args.old / 'results'} holds no parquet tables: give a directory where the pipeline ran")
    failed = 0
    for table in tables:
        if not (args.new / table).is_file():
            print(f"MISSING {table}")
            failed += 1
            continue
        beyond, timed = compare_table(args.old / table, args.new / table, args.tolerance, set(args.timings))
        if beyond:
            print(f"DIFFERS {table}: {', '.join(beyond)}")
            failed += 1
        elif timed:
            print(f"timings only {table}: {', '.join(timed)}")
    print(f"{len(tables) - failed} of {len(tables)} tables equal (tolerance {args.tolerance:g}, timings apart)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
