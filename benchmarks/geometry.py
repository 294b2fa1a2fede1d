"""Benchmark streamed geometry metrics on a store too large to load at once, against an in-memory baseline.

Phases, each in a fresh (spawned) Python process so that its peak memory is its own:

1. ``read only``: stream one layer block by block with ``ActivationStore.read_into`` (no arithmetic): the
   I/O and HDF5 floor of every streamed pass.
2. ``streamed moments``: the same pass feeding a ``MomentAccumulator`` (exact float64 mean and covariance);
   then IsoScore and effective rank from those moments (one ``eigvalsh`` of the d x d covariance).
3. ``in-memory baseline``: ``Moments.of(store.read(layer))``, the whole layer loaded at once, only when its
   estimated peak (float32 copy + two float64 copies = 20 bytes per value) is below ``--max-baseline-gb`` and
   half the memory available now; otherwise on the largest prefix of rows that is, with the streamed moments
   of that same prefix checked against it (max |ΔC| / max |C|) and the whole-layer cost extrapolated.
4. ``measure_geometry``: the pipeline end to end on one layer (default ``GeometrySettings`` but
   ``layers=[layer]``; its streamed pass uses ``--block-rows`` too), with where its time goes (functions of
   ``latent_atlas.geometry.measure`` wrapped in timers in that process only).

Peak memory is the rise of the process's peak RSS (Linux VmHWM, reset via /proc/self/clear_refs at the start of
each phase) over its RSS at that start, after imports and opening the store; ru_maxrss is not used. The page
cache is warmed by one untimed pass first (``--cold`` instead evicts the store file from the page cache before
each phase, so reads come from disk). Ratios are rows/s and peak rise against the in-memory baseline.

The synthetic store (float16, d = 576, one stored layer resid.01, ln_final left unwritten and so taking no disk
space) is written block by block, so building it never holds a layer: documents of 64-512 tokens (80 % train,
20 % heldout, three registers), token ids drawn from ``latent_atlas.testing.tiny_tokenizer()``'s vocabulary (its
".", "!", "?" end sentences), Gaussian states with a decaying spectrum, two rogue dimensions and large norms at
position 0. Without ``--store`` it is written under ``--scratch`` and deleted afterwards.

Usage (the default store is 2,000,000 rows x 576: 2.3 GB per layer in float16, 4.6 GB in float32; on 2 shared
cores pass --threads 1, as below: with 2 BLAS/OpenMP threads competing with other work every phase was 2-3x slower):
    .venv/bin/python benchmarks/geometry.py --synthetic 300000 --threads 1    # quick (~1.5 min): whole-layer baseline
    .venv/bin/python benchmarks/geometry.py --threads 1                       # 2M rows (~6 min): baseline on a prefix
    # the same 2M run in two shorter ones (~1 min, ~4.5 min), building the store once at a path and keeping it:
    .venv/bin/python benchmarks/geometry.py --store /tmp/geometry-2m.h5 --threads 1 --phases read streamed baseline
    .venv/bin/python benchmarks/geometry.py --store /tmp/geometry-2m.h5 --threads 1 --phases measure
    rm /tmp/geometry-2m.h5
    # a real store (its model's tokenizer for measure_geometry):
    .venv/bin/python benchmarks/geometry.py --store results/activations/smollm2-135m/registers.h5 --layer 15
        --tokenizer results/models/smollm2-135m         # (one command line)
Options: --threads T (torch and BLAS threads of every phase), --block-rows B (default 8192), --cold,
--max-baseline-gb G (default 4), --dtype float16|float32, --d-model D, --scratch DIR (default /tmp).
"""

import argparse
import concurrent.futures
import functools
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from harness import MIB as _MIB
from harness import PeakMeter, rss_mib, synthetic_store

from latent_atlas.geometry.metrics import (
    MomentAccumulator,
    Moments,
    effective_rank_from_variances,
    isoscore_from_variances,
)
from latent_atlas.store import ActivationStore

PHASES = ("read", "streamed", "baseline", "measure")
BASELINE_BYTES_PER_VALUE = 4 + 8 + 8  # the float32 layer, its float64 copy and the centred float64 copy


# --------------------------------------------------------------------------------------------------
# The page cache


def evict_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop the file's (clean, after fsync) pages from the page cache: the next reads hit disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def blocks(store: ActivationStore, layer: int, block_rows: int, n_rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, block)`` over the first ``n_rows`` rows, read with ``read_into`` into one reused buffer."""
    buffer = np.empty((block_rows, store.d_model), dtype=store.stored_dtype(layer))
    for start in range(0, n_rows, block_rows):
        yield start, store.read_into(layer, start, buffer[: min(block_rows, n_rows - start)])


# --------------------------------------------------------------------------------------------------
# The phases (each runs in a fresh process)


@dataclass(frozen=True)
class Job:
    """What every phase needs (picklable: the store is reopened in the phase's process)."""

    path: Path
    layer: int
    block_rows: int
    threads: int
    cold: bool
    prefix_rows: int  # rows of the in-memory baseline (the whole layer when it fits)
    tokenizer: str | None  # a tokenizer directory, or None for latent_atlas.testing.tiny_tokenizer()


@dataclass
class PhaseResult:
    """Timings, peak memory and outputs of one phase."""

    rows: int
    seconds: float
    peak_mib: float
    start_mib: float
    parts: dict[str, float] = field(default_factory=dict)  # seconds (or MiB, by key) of sub-steps
    moments: dict[str, Moments] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


def run_phase(phase: str, job: Job) -> PhaseResult:
    """Entry point of a phase's process: set threads, open the store, run the phase."""
    import torch

    torch.set_num_threads(job.threads)
    if job.cold:
        evict_from_page_cache(job.path)
    with ActivationStore(job.path) as store:
        meter = PeakMeter()
        meter.start()
        result = {"read": _read_only, "streamed": _streamed, "baseline": _baseline, "measure": _measure}[phase](
            store, job, meter
        )
    return result


def _read_only(store: ActivationStore, job: Job, meter: PeakMeter) -> PhaseResult:
    begin = time.perf_counter()
    for _ in blocks(store, job.layer, job.block_rows, store.n_tokens):
        pass
    return PhaseResult(store.n_tokens, time.perf_counter() - begin, meter.rise(), meter.start_mib)


def _scores(moments: Moments) -> tuple[float, float]:
    """IsoScore and effective rank from moments: the principal-axis variances are the covariance's eigenvalues."""
    variances = np.clip(np.linalg.eigvalsh(moments.covariance)[::-1], 0.0, None)
    return isoscore_from_variances(variances), effective_rank_from_variances(variances)


def _streamed(store: ActivationStore, job: Job, meter: PeakMeter) -> PhaseResult:
    """Exact moments of the whole layer in one streamed pass (a snapshot at the baseline's prefix on the way)."""
    accumulator = MomentAccumulator(store.d_model)
    moments: dict[str, Moments] = {}
    read_seconds = add_seconds = 0.0
    begin = clock = time.perf_counter()
    for start, block in blocks(store, job.layer, job.block_rows, store.n_tokens):
        now = time.perf_counter()
        read_seconds += now - clock
        cut = job.prefix_rows - start
        if 0 < cut < len(block):
            accumulator.add(block[:cut])
            moments["prefix"] = accumulator.moments()
            accumulator.add(block[cut:])
        else:
            accumulator.add(block)
            if cut == len(block):
                moments["prefix"] = accumulator.moments()
        clock = time.perf_counter()
        add_seconds += clock - now
    moments["all"] = accumulator.moments()
    seconds = time.perf_counter() - begin
    peak = meter.rise()
    meter.start()
    begin = time.perf_counter()
    isoscore, rank = _scores(moments["all"])
    score_seconds = time.perf_counter() - begin
    parts = {"read_into": read_seconds, "MomentAccumulator.add": add_seconds}
    parts |= {"scores_seconds": score_seconds, "scores_peak_mib": meter.rise()}
    notes = {"isoscore": isoscore, "effective_rank": rank}
    return PhaseResult(store.n_tokens, seconds, peak, meter.start_mib, parts, moments, notes)


def _baseline(store: ActivationStore, job: Job, meter: PeakMeter) -> PhaseResult:
    """``Moments.of(store.read(layer))`` on the first ``prefix_rows`` rows (all of them when they fit)."""
    begin = time.perf_counter()
    states = store.read(job.layer, slice(0, job.prefix_rows))
    loaded = time.perf_counter()
    load_peak = meter.rise()
    moments = Moments.of(states)
    seconds = time.perf_counter() - begin
    peak = meter.rise()
    del states
    isoscore, rank = _scores(moments)
    parts = {"store.read": loaded - begin, "Moments.of": seconds - (loaded - begin), "load_peak_mib": load_peak}
    notes = {"isoscore": isoscore, "effective_rank": rank}
    return PhaseResult(job.prefix_rows, seconds, peak, meter.start_mib, parts, {"prefix": moments}, notes)


# Functions of latent_atlas.geometry.measure timed inside measure_geometry: name -> the timed one it runs inside
_TIMED = {
    "token_table": None,
    "read_layer": None,
    "fit_processings": None,
    "fit_flow": "fit_processings",
    "space_metrics": None,
    "twonn": "space_metrics",
    "register_auc": None,
    "probe_metrics": None,
    "_rogue_rows": None,
}


def _timed(parts: dict[str, float], name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``function`` to add its seconds to ``parts[name]`` and how far it raised the peak RSS (VmHWM)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        begin, high = time.perf_counter(), rss_mib("VmHWM")
        try:
            return function(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + time.perf_counter() - begin
            parts[f"{name} MiB"] = parts.get(f"{name} MiB", 0.0) + rss_mib("VmHWM") - high

    return wrapper


def _measure(store: ActivationStore, job: Job, meter: PeakMeter) -> PhaseResult:
    """``measure_geometry`` on one layer, default settings, with timers around its main steps."""
    from latent_atlas.geometry import measure

    if job.tokenizer is None:
        from latent_atlas.testing import tiny_tokenizer

        tokenizer = tiny_tokenizer()
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(job.tokenizer)
    unknown = [len(tokenizer), len(tokenizer) + 1000, 2**31 - 1]
    try:
        decoded = [tokenizer.decode([i]) for i in unknown]
        decode_note = f"decode of unknown ids {unknown} does not raise (returns {decoded})"
    except Exception as error:  # reported, not hidden
        decode_note = f"decode of unknown ids {unknown} RAISES {type(error).__name__}: {error}"
    seconds: dict[str, float] = {}
    untimed_token_table = measure.token_table
    for name in _TIMED:
        setattr(measure, name, _timed(seconds, name, getattr(measure, name)))
    measure._BLOCK_ROWS = job.block_rows  # the streamed pass of measure_geometry uses --block-rows too
    settings = measure.GeometrySettings(layers=[job.layer])
    meter.start()
    begin = time.perf_counter()
    result = measure.measure_geometry(store, tokenizer, settings)
    total = time.perf_counter() - begin
    peak = meter.rise()
    table = untimed_token_table(store, tokenizer, settings.include_first_position)
    selection = measure.Selection.draw(table, settings)
    notes = {
        "decode": decode_note,
        "metric_rows": result.metrics.height,
        "sentences": int(selection.sentence_slot.max()) + 1,
        "docs": len(selection.passage_docs),
        "fit_sentences": int(selection.sentence_slot.max()) + 1,
        "measured_docs": len(selection.passage_docs),
        "flow_epochs": result.flow_losses.height,
    }
    return PhaseResult(store.n_tokens, total, peak, meter.start_mib, seconds, notes=notes)


def in_fresh_process(phase: str, job: Job) -> PhaseResult | str:
    """Run one phase in a newly spawned interpreter; a string says why it failed (e.g. killed for memory)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(run_phase, phase, job).result()
        except concurrent.futures.process.BrokenProcessPool:
            return "its process died (killed for memory?)"
        except Exception as error:  # one failed phase should not lose the others' results
            return f"{type(error).__name__}: {error}"


# --------------------------------------------------------------------------------------------------
# The report


def _relative_difference(streamed: Moments, in_memory: Moments) -> tuple[float, float]:
    """The largest differences: max |ΔC| / max |C| and max |Δmean| / max |mean|."""
    covariance = np.abs(streamed.covariance - in_memory.covariance).max() / np.abs(in_memory.covariance).max()
    mean = np.abs(streamed.mean - in_memory.mean).max() / max(np.abs(in_memory.mean).max(), 1e-300)
    return float(covariance), float(mean)


def _row(name: str, rows: int | str, seconds: float, peak: float, base: PhaseResult | None) -> str:
    speed = rows / seconds if isinstance(rows, int) and seconds > 0 else float("nan")
    speed_text = f"{speed:,.0f}" if np.isfinite(speed) else "-"
    peak_text = f"{peak:,.0f}" if np.isfinite(peak) else "-"
    if base is None or not isinstance(rows, int):
        ratios = "- | -"
    else:
        ratios = f"{speed / (base.rows / base.seconds):.2f} | {peak / base.peak_mib:.3f}"
    rows_text = f"{rows:,}" if isinstance(rows, int) else rows
    return f"| {name} | {rows_text} | {seconds:.2f} | {speed_text} | {peak_text} | {ratios} |"


def report(results: dict[str, PhaseResult | str], n_rows: int, d_model: int) -> None:
    """Print the phases' table, the agreement check and where measure_geometry's time goes."""
    base = results.get("baseline")
    base = base if isinstance(base, PhaseResult) else None
    print("\n| phase | rows | seconds | rows/s | peak RSS rise (MiB) | x baseline rows/s | x baseline peak |")
    print("|---|---|---|---|---|---|---|")
    for phase, result in results.items():
        if isinstance(result, str):
            print(f"| {phase} | - | - | - | - | failed: {result} | |")
            continue
        if phase == "read":
            print(_row("read only (read_into, no arithmetic)", result.rows, result.seconds, result.peak_mib, base))
        elif phase == "streamed":
            print(_row("(a) streamed moments (MomentAccumulator)", result.rows, result.seconds, result.peak_mib, base))
            parts = result.parts
            for part in ("read_into", "MomentAccumulator.add"):
                print(_row(f"  of which {part}", result.rows, parts[part], float("nan"), None))
            print(_row("(b) IsoScore + eff. rank from moments", "d x d", parts["scores_seconds"],
                       parts["scores_peak_mib"], None))  # fmt: skip
        elif phase == "baseline":
            prefix = "" if result.rows == n_rows else f", first {result.rows:,} rows"
            print(_row(f"(c) in-memory baseline{prefix}", result.rows, result.seconds, result.peak_mib, base))
            print(_row("  of which store.read", result.rows, result.parts["store.read"],
                       result.parts["load_peak_mib"], None))  # fmt: skip
            print(_row("  of which Moments.of", result.rows, result.parts["Moments.of"], float("nan"), None))
            if result.rows < n_rows:
                scale = n_rows / result.rows
                name = "(c) in-memory, whole layer (extrapolated, not run)"
                print(_row(name, n_rows, result.seconds * scale, result.peak_mib * scale, base))
        elif phase == "measure":
            print(_row("measure_geometry, 1 layer, end to end", result.rows, result.seconds, result.peak_mib, base))
    streamed = results.get("streamed")
    if isinstance(streamed, PhaseResult):
        print(f"\nStreamed, all {n_rows:,} rows: IsoScore {streamed.notes['isoscore']:.6f}, ", end="")
        print(f"effective rank {streamed.notes['effective_rank']:.4f}.")
        if base is not None:
            same_rows = streamed.moments["all"] if base.rows == n_rows else streamed.moments["prefix"]
            covariance, mean = _relative_difference(same_rows, base.moments["prefix"])
            scores = _scores(same_rows)
            print(
                f"Streamed vs in-memory on the same {base.rows:,} rows: max|dC|/max|C| = {covariance:.2e}, "
                f"max|dmean|/max|mean| = {mean:.2e}; IsoScore {scores[0]:.9f} vs {base.notes['isoscore']:.9f}, "
                f"effective rank {scores[1]:.6f} vs {base.notes['effective_rank']:.6f}."
            )
    measured = results.get("measure")
    if isinstance(measured, PhaseResult):
        _report_measure(measured, n_rows, d_model)


def _report_measure(result: PhaseResult, n_rows: int, d_model: int) -> None:
    parts, notes = result.parts, result.notes
    print(
        f"\n### measure_geometry: where the time goes ({result.seconds:.1f} s, peak rise {result.peak_mib:,.0f} MiB)\n"
    )
    print("| step | seconds | share | raised the peak by (MiB) | note |")
    print("|---|---|---|---|---|")
    accounted = raised = 0.0
    for name, parent in _TIMED.items():
        seconds = parts.get(name, 0.0)
        nested = parent is not None
        accounted += 0.0 if nested else seconds
        raised += 0.0 if nested else parts.get(f"{name} MiB", 0.0)
        note = ""
        if name == "read_layer" and seconds:
            note = f"{n_rows / seconds:,.0f} rows/s streamed"
        elif name == "token_table":
            note = "tokens, documents, sentence split (decodes each distinct id)"
        elif name == "fit_flow":
            note = f"{notes['fit_sentences']:,} fitting sentences, {notes['flow_epochs']} epochs"
        elif name == "register_auc":
            note = f"passage cosines of all pairs of {notes['measured_docs']:,} measured documents, per processing"
        elif nested:
            note = f"inside {parent}"
        label = f"  {name}" if nested else name
        rise = parts.get(f"{name} MiB", 0.0)
        print(f"| {label} | {seconds:.2f} | {seconds / result.seconds:.0%} | {rise:,.0f} | {note} |")
    other, other_rise = result.seconds - accounted, result.peak_mib - raised
    print(f"| everything else | {other:.2f} | {other / result.seconds:.0%} | {other_rise:,.0f} | transforms, pairs |")
    pooled_mib = (notes["sentences"] + notes["docs"]) * d_model * 8 / _MIB
    print(
        f"\n{notes['metric_rows']} metric rows. Pooled float64 sums held by read_layer: {notes['sentences']:,} "
        f"sentences + {notes['docs']:,} documents x d = {pooled_mib:,.0f} MiB "
        "(bounded by max_sentences and max_states). "
        f"Tokenizer check: {notes['decode']}."
    )


# --------------------------------------------------------------------------------------------------


def warm_page_cache(path: Path, layer: int, block_rows: int) -> float:
    """One untimed pass over the layer so every phase reads from the page cache; returns its seconds."""
    begin = time.perf_counter()
    with ActivationStore(path) as store:
        for _ in blocks(store, layer, block_rows, store.n_tokens):
            pass
    return time.perf_counter() - begin


def baseline_rows(n_rows: int, d_model: int, max_gb: float) -> tuple[int, str]:
    """Rows of the in-memory baseline: all of them if their estimated peak fits, else the largest prefix that does."""
    available = psutil.virtual_memory().available
    limit = min(max_gb * 1e9, available / 2)
    need = n_rows * d_model * BASELINE_BYTES_PER_VALUE
    if need <= limit:
        return n_rows, f"in-memory baseline on the whole layer (estimated peak {need / 1e9:.2f} GB)"
    rows = int(limit // (d_model * BASELINE_BYTES_PER_VALUE))
    why = (
        f"in-memory baseline on the whole layer SKIPPED: it would need about {need / 1e9:.1f} GB (float32 copy "
        f"{n_rows * d_model * 4 / 1e9:.1f} GB + two float64 copies), over the limit {limit / 1e9:.1f} GB "
        f"(--max-baseline-gb {max_gb:g}, half of the {available / 1e9:.1f} GB available); "
        f"compared on the first {rows:,} rows ({rows * d_model * BASELINE_BYTES_PER_VALUE / 1e9:.2f} GB) instead"
    )
    return rows, why


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=2_000_000, help="rows of the synthetic store")
    parser.add_argument("--store", type=Path, help="an existing store, or where to write the synthetic one and keep it")
    parser.add_argument("--layer", type=int, help="the layer (default: resid.01 of a synthetic store, else the middle)")
    parser.add_argument("--tokenizer", help="tokenizer directory for measure_geometry (default: the tiny tokenizer)")
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--block-rows", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--max-baseline-gb", type=float, default=4.0, help="largest estimated in-memory peak")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--cold", action="store_true", help="evict the store from the page cache before each phase")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # read by numpy's BLAS in each spawned phase
    with tempfile.TemporaryDirectory(dir=args.scratch, prefix="geometry-benchmark-") as scratch:
        path = args.store or Path(scratch) / "synthetic.h5"
        if not path.exists():
            begin = time.perf_counter()
            synthetic_store(path, args.synthetic, args.d_model, args.dtype, args.block_rows)
            seconds = time.perf_counter() - begin
            print(f"Built {path} ({path.stat().st_size / 1e9:.2f} GB) in {seconds:.1f} s, block by block.")
        with ActivationStore(path) as store:
            n_rows, d_model, stored = store.n_tokens, store.d_model, store.layers
            layer = args.layer if args.layer is not None else stored[len(stored) // 2]
            dtype = store.stored_dtype(layer)
        prefix, baseline_note = baseline_rows(n_rows, d_model, args.max_baseline_gb)
        job = Job(path, layer, args.block_rows, args.threads, args.cold, prefix, args.tokenizer)
        cache = "cold: store evicted from the page cache before each phase"
        if not args.cold:
            cache = (
                f"warm: page cache filled by one untimed pass ({warm_page_cache(path, layer, args.block_rows):.1f} s)"
            )
        layer_gb = n_rows * d_model * dtype.itemsize / 1e9
        print(
            f"\n## Geometry metrics, streamed vs in memory: {path.name} resid.{layer:02d}, {n_rows:,} rows x "
            f"d={d_model} {dtype} ({layer_gb:.2f} GB stored, {n_rows * d_model * 4 / 1e9:.2f} GB as float32), "
            f"block {args.block_rows} rows, {args.threads} threads, {cache}.\n"
        )
        print(f"{baseline_note}.")
        print(
            "Each phase runs once in a fresh spawned process; peak = rise of peak RSS (VmHWM, reset at the phase's "
            "start) over RSS at that start (imports, open store excluded); ratios against the in-memory baseline."
        )
        load, cores = os.getloadavg()[0], os.cpu_count()
        results: dict[str, PhaseResult | str] = {}
        for phase in PHASES:
            if phase in args.phases:
                results[phase] = in_fresh_process(phase, job)
        report(results, n_rows, d_model)
        print(
            f"\nLoad average (1 min) before / after the phases: {load:.1f} / {os.getloadavg()[0]:.1f} on {cores} cores."
        )


if __name__ == "__main__":
    main()
