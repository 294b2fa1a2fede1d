"""Benchmark the batched steering sweep against one setting at a time, in the same run.

All three continue the same prompts (after the sweep's start token) under the same ActAdd settings (every
strength of one layer), greedy and sampled with the pipeline's per-(prompt, sample) seeds:

- one setting at a time: one ``generate`` call per (prompt, sample, strength), a batch of one row;
- per prompt: one call per (prompt, sample) with every strength as a row (the pipeline before the batched sweep);
- batched sweep: the pipeline's batches (:func:`sweep_batches`): prompts of one length x samples x strengths.

The table gives generated tokens per second, the ratio to one setting at a time, and how many rows (settings)
of each differ in any token from one setting at a time (they must not).

With a CUDA device, a second table times the batched sweep on it in float32 and in bfloat16 (what
``steering.model_dtype: auto`` picks there) against the CPU float32 batched sweep of the same run, and checks
that strength 0 gives the unsteered model's tokens in that dtype bit for bit (the sweep's batches against
one-row unsteered runs; on a GPU, kernels chosen by batch size could break that in any dtype, which this column
would show). Without a CUDA device, it says so.

Usage (after `make run` has built the model):
    .venv/bin/python benchmarks/steering.py [--prompts 8] [--samples 2] [--strengths 0 2 4 8] [--tokens 16]
"""

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from harness import interleaved, peak, rate, ratio, seconds

from latent_atlas.models import LoadedModel, load_model
from latent_atlas.steering.data import load_steering_data
from latent_atlas.steering.generate import Decoding, generate
from latent_atlas.steering.interventions import Intervention, ResidualAddition
from latent_atlas.steering.pipeline import SweepSettings, _row_seed, generate_rows, sweep_batches
from latent_atlas.steering.vectors import actadd_vector, encode_after, prefix_tokens

Tokens = dict[tuple[int, int, int], torch.Tensor]  # (prompt, sample, strength) -> the row's new tokens


def one_setting_at_a_time(loaded, intervention, strengths, prompts, decoding, settings) -> Tokens:  # noqa: ANN001
    """One row per call."""
    out = {}
    for p, prompt in enumerate(prompts):
        for s in range(settings.samples if decoding.sampled else 1):
            for c, strength in enumerate(strengths):
                alone = intervention.with_coefficients([strength])
                seeds = [_row_seed(settings.seed, p, s)]
                out[p, s, c] = generate(loaded, prompt, alone, 1, settings.max_new_tokens, decoding, seeds)[0]
    return out


def per_prompt(loaded, intervention, strengths, prompts, decoding, settings) -> Tokens:  # noqa: ANN001
    """Every strength of one (prompt, sample) per call."""
    out = {}
    for p, prompt in enumerate(prompts):
        for s in range(settings.samples if decoding.sampled else 1):
            seeds = [_row_seed(settings.seed, p, s)] * len(strengths)
            tokens = generate(loaded, prompt, intervention, len(strengths), settings.max_new_tokens, decoding, seeds)
            out |= {(p, s, c): row for c, row in enumerate(tokens)}
    return out


def batched_sweep(loaded, intervention, strengths, prompts, decoding, settings) -> Tokens:  # noqa: ANN001
    """The pipeline's batches: prompts of one length x samples x strengths."""
    out = {}
    samples = settings.samples if decoding.sampled else 1
    for rows in sweep_batches([len(p) for p in prompts], samples, len(strengths), settings.batch_size):
        tokens = generate_rows(loaded, intervention, strengths, prompts, rows, decoding, settings)
        out |= dict(zip(rows, tokens, strict=True))
    return out


def differing(tokens: Tokens, reference: Tokens) -> int:
    """How many rows differ from the reference in any token."""
    return sum(not torch.equal(tokens[key], reference[key]) for key in reference)


def sweep_setup(args: argparse.Namespace, loaded: LoadedModel, data) -> tuple[Intervention, list[list[int]]]:  # noqa: ANN001
    """ActAdd at ``args.layer`` after the model's start token, and the prompts' ids after it, as the sweep has."""
    prefix = prefix_tokens(loaded.tokenizer, "auto")
    vector = actadd_vector(loaded, data.actadd_positive, data.actadd_negative, args.layer, prefix)
    intervention = ResidualAddition(args.layer, vector, args.strengths, "front", start=len(prefix))
    prompts = [encode_after(loaded.tokenizer, text, prefix) for text in data.neutral_prompts[: args.prompts]]
    return intervention, prompts


def zero_is_unsteered(loaded, prompts, output: Tokens, zero: int, decoding: Decoding, settings) -> bool:  # noqa: ANN001
    """Whether every strength-0 row equals a one-row unsteered run of its (prompt, sample) bit for bit."""
    for (p, s, c), tokens in output.items():
        seeds = [_row_seed(settings.seed, p, s)]
        if c == zero and not torch.equal(
            tokens, generate(loaded, prompts[p], None, 1, len(tokens), decoding, seeds)[0]
        ):
            return False
    return True


def gpu_rows(args: argparse.Namespace, data, settings: SweepSettings, cpu_seconds: dict[str, float]) -> None:  # noqa: ANN001
    """The batched sweep on CUDA in float32 and bfloat16, against the CPU float32 batched sweep of this run."""
    if not torch.cuda.is_available():
        print("\nGPU rows skipped: no CUDA device found (torch.cuda.is_available() is False).")
        return
    print(f"\n## Batched sweep on {torch.cuda.get_device_name()} against the CPU (float32) of this run\n")
    print("| decoding | device / dtype | tokens / s | x CPU float32 | strength 0 = unsteered (same dtype) |")
    print("|---|---|---|---|---|")
    zero = args.strengths.index(0.0) if 0.0 in args.strengths else None
    for dtype in ("float32", "bfloat16"):
        loaded = load_model(args.model, device="cuda", dtype=dtype)
        intervention, prompts = sweep_setup(args, loaded, data)
        batched_sweep(loaded, intervention, args.strengths, prompts[:1], Decoding("greedy"), settings)  # warm-up
        for decoding in (Decoding("greedy"), Decoding("sampled")):
            sweep = (loaded, intervention, args.strengths, prompts, decoding, settings)
            samples = interleaved({"batched": lambda s=sweep: batched_sweep(*s)}, args.rounds, torch.cuda.synchronize)
            output = samples["batched"][-1].output
            exact = "-" if zero is None else str(zero_is_unsteered(loaded, prompts, output, zero, decoding, settings))
            gpu = statistics.median(seconds(samples["batched"]))
            work = len(output) * settings.max_new_tokens
            against = cpu_seconds[decoding.name] / gpu
            print(f"| {decoding.name} | cuda / {dtype} | {work / gpu:.0f} | {against:.2f} | {exact} |")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("results/models/smollm2-135m"))
    parser.add_argument("--data", type=Path, default=Path("config/steering/sentiment.yaml"))
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=SweepSettings.batch_size)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")  # the baseline: CPU, float32 (GPU rows follow, if any)
    data = load_steering_data(args.data)
    intervention, prompts = sweep_setup(args, loaded, data)
    settings = SweepSettings(args.tokens, samples=args.samples, batch_size=args.batch_size)
    lengths = sorted({len(p) for p in prompts})
    print(
        f"\n## Steering sweep: {len(prompts)} prompts ({len(lengths)} lengths) x (1 greedy | {args.samples} sampled) x "
        f"{len(args.strengths)} strengths x {args.tokens} tokens, ActAdd at resid.{args.layer}, batches of at most "
        f"{args.batch_size} rows, {args.threads} threads, {loaded.device}, median (range) of {args.rounds} "
        "interleaved rounds\n"
    )
    print("| decoding | method | tokens / s | x one setting at a time | rows differing | peak RSS rise (MiB) |")
    print("|---|---|---|---|---|---|")
    cpu_seconds = {}
    runs: dict[str, Callable[..., Tokens]] = {
        "one setting at a time": one_setting_at_a_time,
        "per prompt (before)": per_prompt,
        "batched sweep": batched_sweep,
    }
    for decoding in (Decoding("greedy"), Decoding("sampled")):
        sweep = (loaded, intervention, args.strengths, prompts, decoding, settings)
        samples = interleaved({name: lambda r=run, s=sweep: r(*s) for name, run in runs.items()}, args.rounds)
        reference = samples["one setting at a time"][-1].output
        work = len(reference) * args.tokens
        for name, values in samples.items():
            speed, against = rate(values, work).format(".0f"), ratio(values, samples["one setting at a time"]).format()
            differ = f"{differing(values[-1].output, reference)} of {len(reference)}"
            print(f"| {decoding.name} | {name} | {speed} | {against} | {differ} | {peak(values):.0f} |")
        cpu_seconds[decoding.name] = statistics.median(seconds(samples["batched sweep"]))
    gpu_rows(args, data, settings, cpu_seconds)


if __name__ == "__main__":
    main()
