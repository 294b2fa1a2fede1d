"""The benchmarks' shared harness: interleaved rounds, medians with their spread, peak RSS, a synthetic store.

Every benchmark times its methods side by side in one run: :func:`interleaved` runs each method once per round,
in reversed order every other round (this machine's speed drifts between runs), and keeps seconds and the rise
of peak RSS of every call; :class:`Spread` prints a median with the lowest and highest round, and
:func:`ratio` takes each ratio within a round before the median. Peak memory is the rise of the process's peak
RSS (Linux VmHWM, reset through /proc/self/clear_refs) over its RSS at the start of the call.
"""

import contextlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIB = 2**20


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM), so a peak excludes what came before."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def rss_mib(field: str = "VmRSS") -> float:
    """A memory field of /proc/self/status in MiB (VmRSS now, VmHWM the peak since the last reset); NaN elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class PeakMeter:
    """Peak RSS rise of a stretch of code: VmHWM at the end minus VmRSS at the start (VmHWM reset there)."""

    start_mib: float = 0.0

    def start(self) -> None:
        """Reset the peak and remember the current RSS."""
        reset_peak_rss()
        self.start_mib = rss_mib("VmRSS")

    def rise(self) -> float:
        """MiB above the starting RSS at the peak since :meth:`start`."""
        return rss_mib("VmHWM") - self.start_mib


@dataclass(frozen=True)
class Sample:
    """One timed call: seconds, peak-RSS rise (MiB) and what it returned."""

    seconds: float
    peak_mib: float
    output: object = None


def measure(function: Callable[[], object], synchronise: Callable[[], None] | None = None) -> Sample:
    """Time one call of ``function`` (``synchronise`` run before the clock stops, e.g. CUDA) and its peak RSS."""
    meter = PeakMeter()
    meter.start()
    begin = time.perf_counter()
    output = function()
    if synchronise is not None:
        synchronise()
    return Sample(time.perf_counter() - begin, meter.rise(), output)


def interleaved(
    methods: Mapping[str, Callable[[], object]], rounds: int, synchronise: Callable[[], None] | None = None
) -> dict[str, list[Sample]]:
    """Each method once per round, in the given order on even rounds and reversed on odd ones."""
    samples: dict[str, list[Sample]] = {name: [] for name in methods}
    for round_index in range(rounds):
        order = list(methods) if round_index % 2 == 0 else list(reversed(methods))
        for name in order:
            samples[name].append(measure(methods[name], synchronise))
    return samples


@dataclass(frozen=True)
class Spread:
    """A median over rounds with the lowest and highest value."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        """The median, minimum and maximum of ``values``."""
        return cls(statistics.median(values), min(values), max(values))

    def format(self, spec: str = ".2f") -> str:
        """``median (low–high)``."""
        return f"{self.median:{spec}} ({self.low:{spec}}–{self.high:{spec}})"


def seconds(samples: Sequence[Sample]) -> list[float]:
    """The seconds of each round."""
    return [sample.seconds for sample in samples]


def rate(samples: Sequence[Sample], work: float) -> Spread:
    """Work per second over rounds."""
    return Spread.of([work / sample.seconds for sample in samples])


def ratio(samples: Sequence[Sample], baseline: Sequence[Sample]) -> Spread:
    """Speed against the baseline (baseline seconds / seconds), taken within each round."""
    return Spread.of([base.seconds / sample.seconds for sample, base in zip(samples, baseline, strict=True)])


def peak(samples: Sequence[Sample]) -> float:
    """The largest peak-RSS rise over rounds (MiB)."""
    return max(sample.peak_mib for sample in samples)


def synthetic_store(
    path: Path,
    n_rows: int,
    d_model: int = 576,
    dtype: str = "float16",
    block_rows: int = 8192,
    seed: int = 0,
    with_final: bool = False,
) -> Path:
    """Write a random store of ``n_rows`` token rows at resid.01 (and the same at ln_final), block by block.

    Documents of 64-512 tokens, a fifth of them held out; anisotropic states (decaying scales, two rogue
    dimensions) and position 0 twenty times larger, as attention sinks are.
    """
    import polars as pl

    from latent_atlas.store import StoreWriter
    from latent_atlas.testing import tiny_tokenizer

    rng = np.random.default_rng(seed)
    lengths = rng.integers(64, 513, size=n_rows // 64 + 1)
    n_docs = int(np.searchsorted(np.cumsum(lengths), n_rows)) + 1
    lengths = lengths[:n_docs]
    lengths[-1] -= int(lengths.sum()) - n_rows
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    docs = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(n_docs)],
            "label": rng.choice(["news", "fiction", "forum"], n_docs).tolist(),
            "split": np.where(rng.random(n_docs) < 0.2, "heldout", "train").tolist(),
            "token_start": starts,
            "token_count": lengths,
        }
    )
    doc = np.repeat(np.arange(n_docs), lengths)
    pos = np.arange(n_rows) - starts[doc]
    ids = rng.integers(4, len(tiny_tokenizer()), n_rows)  # every word and punctuation, no special tokens
    scales = (2.0 * (1.0 + np.arange(d_model)) ** -0.4).astype(np.float32)
    offset = np.zeros(d_model, dtype=np.float32)
    offset[[3, d_model // 7]] = [6.0, -4.0]  # two rogue dimensions
    attrs = {"model": "synthetic", "model_sha256": "0" * 64, "corpus": "random", "corpus_sha256": "0" * 64}
    attrs |= {"config_hash": "-", "code_version": "-", "n_layers": 1, "created": "-"}
    with StoreWriter(path, n_rows, d_model, [1], dtype, attrs) as writer:
        writer.write_tokens(ids, doc, pos)
        writer.write_docs(docs)
        for start in range(0, n_rows, block_rows):
            stop = min(start + block_rows, n_rows)
            block = rng.standard_normal((stop - start, d_model), dtype=np.float32)
            block *= scales
            block += offset
            block[pos[start:stop] == 0] *= 20.0  # attention-sink norms at position 0
            writer.write_states("resid.01", start, block.astype(dtype))
            if with_final:
                writer.write_states("ln_final", start, block.astype(dtype))
    return path
