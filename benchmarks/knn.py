"""Benchmark exact nearest-neighbour search over the store against faiss and a dense matmul in RAM, in one run.

Throughput is (queries x stored vectors) per second. The references hold the whole layer in RAM as unit-normed
float32 (read once, not timed): faiss ``IndexFlatIP`` (optional: skipped with a line when faiss is not
installed) and one dense ``Q @ X^T`` plus top-k in torch. ``nearest_stored`` runs twice: with the layer cached
in RAM (its first call, which reads the layer, is timed apart) and streamed from the HDF5 store block by block
(``cache_bytes=0``: its reads and float16 -> float32 conversion are timed; its memory does not grow with the
store). Methods alternate within each round (benchmarks/harness.py); medians with the range over rounds.

Usage (after `make run` has built the default store; or --synthetic N for a random store of N rows):
    .venv/bin/python benchmarks/knn.py [--store PATH] [--layer 15] [--queries 1 64 512] [--rounds 5]
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import interleaved, measure, peak, rate, ratio, synthetic_store

from latent_atlas.neighbourhood.knn import kept_rows, nearest_stored
from latent_atlas.store import ActivationStore

DEFAULT_STORE = Path("results/activations/smollm2-135m/registers.h5")


def dense_baseline(layer_states: torch.Tensor, queries: np.ndarray, k: int) -> None:
    """One dense matmul of every query with every stored state (in memory), then top-k (cosine)."""
    query = torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
    (query @ layer_states.T).topk(k, dim=-1)


def faiss_index(layer_states: torch.Tensor, threads: int) -> object | None:
    """A faiss ``IndexFlatIP`` over the unit-normed layer, or None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(layer_states.shape[1])
    index.add(layer_states.numpy())
    return index


def faiss_search(index: object, queries: np.ndarray, k: int) -> None:
    """Faiss's exact inner-product search of the unit-normed queries."""
    query = torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1).numpy()
    index.search(query, k)  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE)
    parser.add_argument("--synthetic", type=int, default=0, help="use a random store of this many rows instead")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--queries", type=int, nargs="+", default=[1, 64, 512])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=5)
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
    """Time every method for each query count and print the table."""
    keep = kept_rows(store)
    n_stored = int(keep.sum())
    rng = np.random.default_rng(0)
    in_memory = torch.nn.functional.normalize(torch.from_numpy(store.read(layer)[keep]), dim=-1)
    index = faiss_index(in_memory, args.threads)
    first = measure(lambda: nearest_stored(store, layer, store.read(layer, [1]), args.k))
    print(
        f"\n## Exact kNN: {store.path.name} resid.{layer:02d}, {n_stored} stored states x d={store.d_model}, ", end=""
    )
    print(f"k={args.k}, cosine, {args.threads} threads, median (range) of {args.rounds} interleaved rounds\n")
    if index is None:
        print("faiss rows skipped: faiss is not installed (pip install faiss-cpu); ratios are against torch.\n")
    base = "faiss IndexFlatIP (RAM)" if index is not None else "torch matmul + top-k (RAM)"
    print(f"| queries | method | queries x stored / s | x {base} | peak RSS rise (MiB) |")
    print("|---|---|---|---|---|")
    for n_queries in args.queries:
        queries = store.read(layer, rng.choice(np.flatnonzero(keep), n_queries)) + rng.standard_normal(
            (n_queries, store.d_model)
        ).astype(np.float32)
        methods = {
            "faiss IndexFlatIP (RAM)": lambda q=queries: faiss_search(index, q, args.k),
            "torch matmul + top-k (RAM)": lambda q=queries: dense_baseline(in_memory, q, args.k),
            "nearest_stored, layer cached": lambda q=queries: nearest_stored(store, layer, q, args.k),
            "nearest_stored, streamed": lambda q=queries: nearest_stored(
                store, layer, q, args.k, block_rows=args.block_rows, cache_bytes=0
            ),
        }
        if index is None:
            del methods["faiss IndexFlatIP (RAM)"]
        samples = interleaved(methods, args.rounds)
        for name, values in samples.items():
            speed = rate(values, n_queries * n_stored).format(".3g")
            print(f"| {n_queries} | {name} | {speed} | {ratio(values, samples[base]).format()} | {peak(values):.0f} |")
    layer_mb = in_memory.numel() * 4 / 2**20
    print(f"\nThe references and the cache hold the whole layer: {layer_mb:.0f} MiB each (loaded before the rounds); ")
    print(f"nearest_stored's first call read it in {first.seconds:.2f} s (peak RSS rise {first.peak_mib:.0f} MiB).")


if __name__ == "__main__":
    main()
