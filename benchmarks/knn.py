"""Benchmark exact nearest-neighbour search over the activation store against a dense in-memory baseline.

Throughput is (queries x stored vectors) per second. The baseline holds the whole layer in memory as
float32 (read once, not timed) and does one dense ``Q @ X^T`` plus top-k: the fastest exact search there
is when the layer fits in memory. ``nearest_stored`` reads the HDF5 store block by block (its reads and
float16 -> float32 conversion are timed), so its memory does not grow with the store. Peak memory is the
rise of the process's peak RSS (Linux VmHWM, reset before each measurement) over the RSS before it.
Methods alternate within each round; the table shows medians over rounds.

Usage (after `make run` has built the default store; or --synthetic N for a random store of N rows):
    .venv/bin/python benchmarks/knn.py [--store PATH] [--layer 15] [--queries 1 64 512] [--rounds 3]
"""

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from latent_atlas.neighbourhood.knn import kept_rows, nearest_stored
from latent_atlas.store import ActivationStore, StoreWriter

DEFAULT_STORE = Path("results/activations/smollm2-135m/registers.h5")


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def synthetic_store(path: Path, n_rows: int, d_model: int = 576) -> Path:
    """A float16 store of ``n_rows`` random states at resid.01 (documents of 100 tokens)."""
    rng = np.random.default_rng(0)
    n_docs = max(1, n_rows // 100)
    n_rows = n_docs * 100
    docs = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n_docs)],
            "label": ["x"] * n_docs,
            "split": ["train"] * n_docs,
            "token_start": np.arange(n_docs) * 100,
            "token_count": [100] * n_docs,
        }
    )
    attrs = {"model": "synthetic", "model_sha256": "0" * 64, "corpus": "random", "corpus_sha256": "0" * 64}
    attrs |= {"config_hash": "-", "code_version": "-", "n_layers": 1, "created": "-"}
    with StoreWriter(path, n_rows, d_model, [1], "float16", attrs) as writer:
        writer.write_tokens(np.zeros(n_rows), np.repeat(np.arange(n_docs), 100), np.tile(np.arange(100), n_docs))
        writer.write_docs(docs)
        for start in range(0, n_rows, 8192):
            block = rng.standard_normal((min(8192, n_rows - start), d_model)).astype(np.float16)
            writer.write_states("resid.01", start, block)
            writer.write_states("ln_final", start, block)
    return path


def dense_baseline(layer_states: torch.Tensor, queries: np.ndarray, k: int) -> None:
    """One dense matmul of every query with every stored state (in memory), then top-k (cosine)."""
    query = torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
    (query @ layer_states.T).topk(k, dim=-1)


def measure(function: object, *args: object) -> tuple[float, float]:
    """Seconds and peak-RSS rise (MiB) of one call."""
    before = _rss_mb("VmRSS")
    _reset_peak_rss()
    begin = time.perf_counter()
    function(*args)  # type: ignore[operator]
    return time.perf_counter() - begin, _rss_mb("VmHWM") - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--synthetic", type=int, default=0, help="use a random store of this many rows instead")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        path, layer = args.store, args.layer
        if args.synthetic or not path.exists():
            path, layer = synthetic_store(Path(scratch) / "synthetic.h5", args.synthetic or 100_000), 1
        with ActivationStore(path) as store:
            run(store, layer, args)


def run(store: ActivationStore, layer: int, args: argparse.Namespace) -> None:
    """Time both methods for each query count and print the table."""
    keep = kept_rows(store)
    n_stored = int(keep.sum())
    rng = np.random.default_rng(0)
    in_memory = torch.nn.functional.normalize(torch.from_numpy(store.read(layer)[keep]), dim=-1)
    print(
        f"\n## Exact kNN: {store.path.name} resid.{layer:02d}, {n_stored} stored states x d={store.d_model}, ", end=""
    )
    print(f"k={args.k}, block {args.block_rows} rows, {args.threads} threads, median of {args.rounds} rounds\n")
    print("| queries | method | queries x stored / s | x dense | peak RSS rise (MiB) |")
    print("|---|---|---|---|---|")
    for n_queries in args.queries:
        queries = store.read(layer, rng.choice(np.flatnonzero(keep), n_queries)) + rng.standard_normal(
            (n_queries, store.d_model)
        ).astype(np.float32)
        results: dict[str, list[tuple[float, float]]] = {"dense in-memory matmul": [], "blocked over the store": []}
        for round_index in range(args.rounds):
            order = list(results) if round_index % 2 == 0 else list(reversed(results))
            for name in order:
                if name.startswith("dense"):
                    results[name].append(measure(dense_baseline, in_memory, queries, args.k))
                else:
                    call = (store, layer, queries, args.k, "cosine", None, True, args.block_rows)
                    results[name].append(measure(nearest_stored, *call))
        base = statistics.median(seconds for seconds, _ in results["dense in-memory matmul"])
        for name, values in results.items():
            seconds = statistics.median(value for value, _ in values)
            peak = max(rise for _, rise in values)
            speed = n_queries * n_stored / seconds
            print(f"| {n_queries} | {name} | {speed:.3g} | {base / seconds:.2f} | {peak:.0f} |")
    layer_mb = in_memory.numel() * 4 / 2**20
    print(f"\nThe dense baseline also holds the whole layer: {layer_mb:.0f} MiB (not in its peak rise: loaded before).")


if __name__ == "__main__":
    main()
