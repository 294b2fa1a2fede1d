"""Benchmark: activation extraction into HDF5 against plain forward passes, on the same batches.

Each measurement runs in its own process (so peak RSS is that method's alone), rounds are interleaved
(this machine's speed drifts by ~20% between runs), and every ratio is taken within a round before the
median is reported. Methods:

- ``forward``: the full causal LM forward, logits included (what any user runs anyway);
- ``body``: the body-only forward, no LM head: the limit for extraction, which never needs logits;
- ``hf-states``: the full forward with ``output_hidden_states=True``, keeping every state in RAM as
  float16 (how HF, TransformerLens and nnsight caches hold them);
- ``extract``: latent_atlas.extract into an HDF5 store (all layers + ln_final, float16).

With a CUDA device, ``body`` and ``extract`` also run on it in float32 and in bfloat16 (``extraction.model_dtype:
auto`` there), in the same rounds, and a second table gives their throughput against the CPU float32 run of the
same method in the same round, and their peak GPU memory. Without one, it says that those rows were skipped.

Usage (after `make run` has built the model and corpus):
    .venv/bin/python benchmarks/extraction.py [--docs 24] [--scale 4] [--rounds 5]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import reset_peak_rss, rss_mib

METHODS = ("forward", "body", "hf-states", "extract")
GPU_METHODS = ("body", "extract")  # timed on CUDA as well, when there is a CUDA device
GPU_DTYPES = ("float32", "bfloat16")


def child(
    method: str,
    model_dir: str,
    corpus_path: str,
    n_docs: int,
    threads: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Run one method once in this process, on ``device`` in ``dtype``; return tokens/s and memory figures."""
    import numpy as np
    import polars as pl
    import torch

    from latent_atlas.corpus import load_corpus_table
    from latent_atlas.extract import ExtractionSettings, _pad_batch, extract_activations, plan_extraction
    from latent_atlas.models import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model_dir, device=device, dtype=dtype)
    corpus, _ = load_corpus_table(corpus_path)
    corpus = corpus.head(n_docs).with_columns(pl.lit("train").alias("split"))
    settings = ExtractionSettings(
        device=device, model_dtype=dtype, max_length=256, batch_size=32, max_batch_tokens=4096
    )
    plan = plan_extraction(loaded.tokenizer, corpus["text"].to_list(), settings)
    with torch.inference_mode():  # page in every weight (mmapped safetensors) and warm up, for all methods
        loaded.model(input_ids=torch.tensor([plan.token_ids[-1][:8]], device=loaded.device), use_cache=False)
    cuda = loaded.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_loaded = rss_mib("VmRSS")
    reset_peak_rss()
    kept: list[np.ndarray] = []
    write_seconds = _time_hdf5_writes()
    start = time.perf_counter()
    if method == "extract":
        with tempfile.TemporaryDirectory() as folder:
            extract_activations(loaded, corpus, Path(folder) / "s.h5", settings, {"model": "bench"}, progress=False)
    else:
        pad = loaded.tokenizer.pad_token_id or 0
        for batch in plan.batches:
            ids, attention, stored = _pad_batch(
                [plan.token_ids[i] for i in batch], [plan.keep[i] for i in batch], pad, loaded.device
            )
            with torch.inference_mode():
                if method == "body":
                    loaded.parts.body(input_ids=ids, attention_mask=attention, use_cache=False)
                elif method == "forward":
                    loaded.model(input_ids=ids, attention_mask=attention, use_cache=False)
                else:
                    out = loaded.model(
                        input_ids=ids, attention_mask=attention, use_cache=False, output_hidden_states=True
                    )
                    kept.extend(h[stored].to(torch.float16).cpu().numpy() for h in out.hidden_states)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {
        "method": method,
        "tokens": plan.n_rows,
        "tokens_per_s": plan.n_rows / seconds,
        "peak_rss_mb": rss_mib("VmHWM"),
        "rss_after_load_mb": rss_loaded,
        "write_share": write_seconds[0] / seconds,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
    }


def _time_hdf5_writes() -> list[float]:
    """Wrap StoreWriter.write_states to accumulate the seconds spent writing HDF5; return the accumulator."""
    from latent_atlas.store import StoreWriter

    spent = [0.0]
    write_states = StoreWriter.write_states

    def timed(self: StoreWriter, *args: object) -> None:
        begin = time.perf_counter()
        write_states(self, *args)
        spent[0] += time.perf_counter() - begin

    StoreWriter.write_states = timed
    return spent


def run_child(method: str, args: argparse.Namespace, n_docs: int, device: str = "cpu", dtype: str = "float32") -> dict:
    """Run one measurement in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--child",
        method,
        "--n-docs",
        str(n_docs),
        "--model",
        args.model,
        "--corpus",
        args.corpus,
        "--threads",
        str(args.threads),
        "--device",
        device,
        "--dtype",
        dtype,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the interleaved rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--corpus", default="results/corpora/registers.parquet")
    parser.add_argument("--docs", type=int, default=24, help="documents at 1x")
    parser.add_argument("--scale", type=int, default=4, help="the larger corpus is this many times 1x")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", choices=METHODS)
    parser.add_argument("--n-docs", type=int)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # a child's device and dtype
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measured = child(args.child, args.model, args.corpus, args.n_docs, args.threads, args.device, args.dtype)
        print(json.dumps(measured))
        return
    methods = args.methods.split(",")
    gpu = [(method, dtype) for method in methods if method in GPU_METHODS for dtype in GPU_DTYPES]
    if not _cuda_available():
        gpu = []
    sizes = {"1x": args.docs, f"{args.scale}x": args.docs * args.scale}
    results: dict[tuple[str, str], list[dict]] = {}
    for round_number in range(args.rounds):
        for size, n_docs in sizes.items():
            order = methods[round_number % len(methods) :] + methods[: round_number % len(methods)]
            for method in order:
                measured = run_child(method, args, n_docs)
                results.setdefault((size, method), []).append(measured)
                print(
                    f"round {round_number + 1} {size:>3} {method:<10} {measured['tokens_per_s']:8.1f} tok/s "
                    f"peak RSS {measured['peak_rss_mb']:7.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
            for method, dtype in gpu:
                measured = run_child(method, args, n_docs, "cuda", dtype)
                results.setdefault((size, f"{method} cuda/{dtype}"), []).append(measured)
                print(f"round {round_number + 1} {size:>3} {method} cuda/{dtype} {measured['tokens_per_s']:8.1f} tok/s",
                      file=sys.stderr, flush=True)  # fmt: skip
    print_table(results, sizes, methods)
    print_gpu_table(results, sizes, gpu)


def _cuda_available() -> bool:
    """Whether a CUDA device is present (asked in a child: the parent stays free of torch and CUDA)."""
    probe = [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"]
    result = subprocess.run(probe, capture_output=True, text=True, check=False)
    return result.stdout.strip().endswith("True")


HEADER = (
    "| size | method | tokens | tok/s (median) | tok/s (best) | x forward | x body | x body (best) "
    "| peak RSS MB | RSS after load+warm-up MB |"
)


def _paired_ratio(runs: list[dict], baseline: list[dict] | None) -> str:
    """Median over rounds of the within-round throughput ratio (runs / baseline)."""
    if baseline is None:
        return "-"
    ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, baseline, strict=True)]
    return f"{statistics.median(ratios):.2f}"


def _best(runs: list[dict]) -> float:
    """Best throughput over rounds: the least disturbed run on a noisy machine."""
    return max(r["tokens_per_s"] for r in runs)


def _row(size: str, method: str, results: dict) -> list[object]:
    """One table row: throughput, ratios against both forwards, and memory."""
    runs = results[(size, method)]
    body = results.get((size, "body"))
    return [
        size,
        method,
        runs[0]["tokens"],
        f"{statistics.median(r['tokens_per_s'] for r in runs):.1f}",
        f"{_best(runs):.1f}",
        _paired_ratio(runs, results.get((size, "forward"))),
        _paired_ratio(runs, body),
        f"{_best(runs) / _best(body):.2f}" if body else "-",
        f"{statistics.median(r['peak_rss_mb'] for r in runs):.0f}",
        f"{statistics.median(r['rss_after_load_mb'] for r in runs):.0f}",
    ]


def print_table(results: dict, sizes: dict, methods: list[str]) -> None:
    """Print medians, best-of and within-round ratios as a Markdown table, then memory growth."""
    print("\n" + HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for size in sizes:
        for method in methods:
            print("| " + " | ".join(map(str, _row(size, method, results))) + " |")
    small, large = list(sizes)
    if (large, "extract") in results:
        peak = {size: statistics.median(r["peak_rss_mb"] for r in results[(size, "extract")]) for size in sizes}
        print(f"\nextract peak RSS {large} / {small}: {peak[large] / peak[small]:.3f}")
        share = statistics.median(r["write_share"] for r in results[(large, "extract")])
        print(f"share of extraction wall time spent in HDF5 writes ({large}): {100 * share:.1f}%")


def print_gpu_table(results: dict, sizes: dict, gpu: list[tuple[str, str]]) -> None:
    """The CUDA rows: throughput against the same method on the CPU in float32, paired within rounds."""
    if not gpu:
        print("\nGPU rows skipped: no CUDA device found (torch.cuda.is_available() is False).")
        return
    print("\n| size | method | device / dtype | tok/s (median) | x CPU float32 (same method) | peak GPU MB |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        for method, dtype in gpu:
            runs = results[(size, f"{method} cuda/{dtype}")]
            median = statistics.median(r["tokens_per_s"] for r in runs)
            ratio = _paired_ratio(runs, results.get((size, method)))
            peak = statistics.median(r["peak_gpu_mb"] for r in runs)
            print(f"| {size} | {method} | cuda / {dtype} | {median:.1f} | {ratio} | {peak:.0f} |")


if __name__ == "__main__":
    main()
