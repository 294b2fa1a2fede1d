"""Benchmark a batched steering sweep against the one-setting-at-a-time loop, in the same run.

Both continue the same prompts under the same ActAdd settings (every strength of one layer), greedy and
sampled with the same per-row seeds; the table gives generated tokens per second, the ratio to the loop, and
whether the two produced identical tokens (they must).

Usage (after `make run` has built the model):
    .venv/bin/python benchmarks/steering.py [--strengths 0 1 2 4 8] [--tokens 20] [--rounds 3]
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

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
    loaded = load_model(args.model, device="auto")
    data = load_steering_data(args.data)
    vector = actadd_vector(loaded, data.actadd_positive, data.actadd_negative, args.layer)
    intervention = ResidualAddition(args.layer, vector, args.strengths, positions="front")
    prompts = data.neutral_prompts
    work = len(prompts) * len(args.strengths) * args.tokens
    print(
        f"\n## Steering sweep: {len(prompts)} prompts x {len(args.strengths)} strengths x {args.tokens} tokens, ",
        end="",
    )
    print(f"ActAdd at resid.{args.layer}, {args.threads} threads, {loaded.device}, median of {args.rounds} rounds\n")
    print("| decoding | method | tokens / s | x one-by-one | identical tokens |")
    print("|---|---|---|---|---|")
    for decoding in (Decoding("greedy"), Decoding("sampled")):
        timings: dict[str, list[float]] = {"one setting at a time": [], "batched sweep": []}
        outputs = {}
        for round_index in range(args.rounds):
            order = list(timings) if round_index % 2 == 0 else list(reversed(timings))
            for name in order:
                run = batched if name == "batched sweep" else one_by_one
                begin = time.perf_counter()
                outputs[name] = run(loaded, prompts, intervention, args.strengths, args.tokens, decoding)
                timings[name].append(time.perf_counter() - begin)
        same = all(torch.equal(a, b) for a, b in zip(*outputs.values(), strict=True))
        base = statistics.median(timings["one setting at a time"])
        for name, values in timings.items():
            seconds = statistics.median(values)
            print(f"| {decoding.name} | {name} | {work / seconds:.0f} | {base / seconds:.2f} | {same} |")


if __name__ == "__main__":
    main()
