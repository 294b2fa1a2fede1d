"""Benchmark a batched steering sweep against the one-setting-at-a-time loop, in the same run.

Both continue the same prompts under the same ActAdd settings (every strength of one layer), greedy and
sampled with the same per-row seeds; the table gives generated tokens per second, the ratio to the loop, and
whether the two produced identical tokens (they must).

With a CUDA device, a second table times the batched sweep on it in float32 and in bfloat16 (what
``steering.model_dtype: auto`` picks there) against the CPU float32 batched sweep of the same run, and checks
that strength 0 gives the unsteered model's tokens in that dtype bit for bit (a batch of every strength against
a one-row unsteered run, as the sweep's baselines are; on a GPU, kernels chosen by batch size could break that
in any dtype, which this column would show). Without a CUDA device, it says so.

Usage (after `make run` has built the model):
    .venv/bin/python benchmarks/steering.py [--strengths 0 1 2 4 8] [--tokens 20] [--rounds 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch
from harness import interleaved, peak, rate, ratio, seconds

from latent_atlas.models import load_model
from latent_atlas.steering.data import load_steering_data
from latent_atlas.steering.generate import Decoding, generate
from latent_atlas.steering.interventions import ResidualAddition
from latent_atlas.steering.vectors import actadd_vector


def batched(loaded, prompts, intervention, strengths, tokens, decoding) -> list[torch.Tensor]:  # noqa: ANN001
    """Every strength of a prompt in one batch."""
    return [generate(loaded, p, intervention, len(strengths), tokens, decoding, [i] * len(strengths))
            for i, p in enumerate(prompts)]  # fmt: skip


def one_by_one(loaded, prompts, intervention, strengths, tokens, decoding) -> list[torch.Tensor]:  # noqa: ANN001
    """Each strength of each prompt on its own."""
    results = []
    for index, prompt in enumerate(prompts):
        rows = [generate(loaded, prompt, intervention.with_coefficients([s]), 1, tokens, decoding, [index])[0]
                for s in strengths]  # fmt: skip
        results.append(torch.stack(rows))
    return results


def _timed(rounds: int, run, *args: object) -> tuple[float, list[torch.Tensor]]:  # noqa: ANN001
    """Median seconds of ``run(*args)`` over rounds (CUDA work finished inside each timing), and its output."""
    seconds, output = [], []
    for _ in range(rounds):
        begin = time.perf_counter()
        output = run(*args)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begin)
    return statistics.median(seconds), output


def gpu_rows(args: argparse.Namespace, data, prompts: list[str], cpu_seconds: dict[str, float], work: int) -> None:  # noqa: ANN001
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
        vector = actadd_vector(loaded, data.actadd_positive, data.actadd_negative, args.layer)
        intervention = ResidualAddition(args.layer, vector, args.strengths, positions="front")
        batched(loaded, prompts[:1], intervention, args.strengths, 2, Decoding("greedy"))  # warm-up (kernels)
        for decoding in (Decoding("greedy"), Decoding("sampled")):
            sweep_args = (loaded, prompts, intervention, args.strengths, args.tokens, decoding)
            seconds, outputs = _timed(args.rounds, batched, *sweep_args)
            exact = "-"
            if zero is not None:
                unsteered = [generate(loaded, p, None, 1, args.tokens, decoding, [i])[0] for i, p in enumerate(prompts)]
                exact = str(all(torch.equal(out[zero], u) for out, u in zip(outputs, unsteered, strict=True)))
            ratio = cpu_seconds[decoding.name] / seconds
            print(f"| {decoding.name} | cuda / {dtype} | {work / seconds:.0f} | {ratio:.2f} | {exact} |")
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("results/models/smollm2-135m"))
    parser.add_argument("--data", type=Path, default=Path("config/steering/sentiment.yaml"))
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")  # the baseline: CPU, float32 (GPU rows follow, if any)
    data = load_steering_data(args.data)
    vector = actadd_vector(loaded, data.actadd_positive, data.actadd_negative, args.layer)
    intervention = ResidualAddition(args.layer, vector, args.strengths, positions="front")
    prompts = data.neutral_prompts
    work = len(prompts) * len(args.strengths) * args.tokens
    print(
        f"\n## Steering sweep: {len(prompts)} prompts x {len(args.strengths)} strengths x {args.tokens} tokens, ",
        end="",
    )
    print(
        f"ActAdd at resid.{args.layer}, {args.threads} threads, {loaded.device}, "
        f"median (range) of {args.rounds} interleaved rounds\n"
    )
    print("| decoding | method | tokens / s | x one-by-one | identical tokens | peak RSS rise (MiB) |")
    print("|---|---|---|---|---|---|")
    cpu_seconds = {}
    for decoding in (Decoding("greedy"), Decoding("sampled")):
        sweep = (loaded, prompts, intervention, args.strengths, args.tokens, decoding)
        methods = {
            "one setting at a time": lambda s=sweep: one_by_one(*s),
            "batched sweep": lambda s=sweep: batched(*s),
        }
        samples = interleaved(methods, args.rounds)
        outputs = [values[-1].output for values in samples.values()]
        same = all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
        for name, values in samples.items():
            speed, against = rate(values, work).format(".0f"), ratio(values, samples["one setting at a time"]).format()
            print(f"| {decoding.name} | {name} | {speed} | {against} | {same} | {peak(values):.0f} |")
        cpu_seconds[decoding.name] = statistics.median(seconds(samples["batched sweep"]))
    gpu_rows(args, data, prompts, cpu_seconds, work)


if __name__ == "__main__":
    main()
