"""Benchmark of ``latent-atlas probe``: the first text and each further text, against one call per text.

Three ways to read the same texts, each timed from a fresh process (imports and the model load included):

* ``one call per text, every core, nothing cached``: what the probe cost before: every call loads the model
  and recomputes the head's float64 pseudo-inverse (an empty cache folder per call), on torch's default threads;
* ``one call per text, one thread, cached``: every call loads the model, the pseudo-inverse comes from the
  cache, one thread (the command's default now);
* ``one call, --texts-file``: one process loads the model and the lenses once and reads every text; the
  first text's time includes the process start, the model and the lenses, each further text is timed alone.

Usage (the model directory must exist; nothing is written outside a temporary folder)::

    nice python benchmarks/probe.py --model results/models/smollm2-135m --texts 4 --layer 12

Prints a Markdown table of the first text's time and the median of the further texts' times, per way.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXTS = [
    "The Eiffel Tower is located in the city of",
    "Barack Obama was born in the state of",
    "The capital of Japan is",
    "Water boils at a temperature of one hundred degrees",
    "The largest planet in the solar system is",
    "Shakespeare wrote the play Romeo and",
]


def cli_call(model: str, text: str, layer: int, cache: Path, threads: int = 1) -> float:
    """Seconds one ``latent-atlas probe`` process takes for one text (its output discarded)."""
    command = [sys.executable, "-m", "latent_atlas.cli", "probe", "--model", model, "--text", text]
    command += ["--layer", str(layer), "--device", "cpu", "--json", "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "LATENT_ATLAS_CACHE": str(cache)})
    return time.perf_counter() - start


def one_call(model: str, texts: list[str], layer: int, cache: Path) -> list[float]:
    """Per-text seconds of one process that reads every text (the first includes start, load and lenses)."""
    command = [sys.executable, __file__, "--inner", "--model", model, "--layer", str(layer), "--texts", *texts]
    start = time.perf_counter()
    result = subprocess.run(
        command, check=True, capture_output=True, text=True, env={**os.environ, "LATENT_ATLAS_CACHE": str(cache)}
    )
    total = time.perf_counter() - start
    inner = json.loads(result.stdout.strip().splitlines()[-1])
    return [total - sum(inner["further"]), *inner["further"]]


def inner(model: str, texts: list[str], layer: int) -> None:
    """Run inside the timed process: what ``probe --texts-file`` does, timing each text after the first."""
    import torch

    from latent_atlas.lenses.pipeline import build_lenses
    from latent_atlas.lenses.probe import model_pinvs, probe_points
    from latent_atlas.models import load_model

    torch.set_num_threads(1)  # as the command does by default (--threads)
    loaded = load_model(model, device="cpu")
    lenses = build_lenses(loaded, {}, None, pinvs=model_pinvs(loaded))
    probe_points(loaded, lenses, texts[:1], [layer])
    further = []
    for text in texts[1:]:
        start = time.perf_counter()
        probe_points(loaded, lenses, [text], [layer])
        further.append(time.perf_counter() - start)
    print(json.dumps({"further": further}))


def row(name: str, times: list[float]) -> str:
    """One table row: first text, median of the further texts (and their range)."""
    further = times[1:]
    spread = f" ({min(further):.1f}-{max(further):.1f})" if len(further) > 1 else ""
    return f"| {name} | {times[0]:.1f} | {statistics.median(further):.1f}{spread} |"


def main() -> None:
    """Measure the three ways on the same texts and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--texts", nargs="+", default=None, help="(with --inner) the texts; else a count")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        inner(args.model, args.texts, args.layer)
        return
    count = int(args.texts[0]) if args.texts else 4
    if not 2 <= count <= len(TEXTS):
        parser.error(f"--texts must be 2..{len(TEXTS)}")
    texts = TEXTS[:count]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        every_core = os.cpu_count() or 1  # torch's default before the command set one thread
        cold = [cli_call(args.model, text, args.layer, root / f"cold-{i}", every_core) for i, text in enumerate(texts)]
        cli_call(args.model, texts[0], args.layer, root / "warm")  # fills the cache, not timed
        warm = [cli_call(args.model, text, args.layer, root / "warm") for text in texts]
        together = one_call(args.model, texts, args.layer, root / "warm")
    load = " / ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"latent-atlas probe, {args.model}, resid.{args.layer:02d}, {count} texts, {os.cpu_count()} CPUs (seconds);")
    print(f"load average at the end {load} (1 / 5 / 15 min): a busy machine inflates every row alike\n")
    print("| way | first text | each further text, median (range) |\n|---|---|---|")
    print(row("one call per text, every core, nothing cached (as before)", cold))
    print(row("one call per text, one thread, cached pseudo-inverse", warm))
    print(row("one call, --texts-file", together))


if __name__ == "__main__":
    main()
