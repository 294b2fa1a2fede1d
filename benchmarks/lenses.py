"""Benchmark the lenses against baselines measured in the same run.

1. Decoding throughput: (positions x layers) per second of the per-layer evaluation with every lens
   (logits, log-softmax, KL, CE, entropy, ranks), against a plain ``h @ W_U^T`` + top-k over the same
   positions and layers (the least any decoder does), interleaved over rounds.
2. Tuned-lens training at every layer (``--train-layers``): translators trained from the activation store
   (states read once, no forward passes) against the published recipe's way of running the model for every
   step, on the very same documents per step, interleaved over rounds; seconds per step and the held-out KL
   each reaches after the same steps. Both train with the same loss (``latent_atlas.lenses.tuned.fused_kl``),
   whose vocabulary projection and its gradient at every layer bound the ratio (docs/benchmarks.md).
3. With a CUDA device: the logit lens's decoding (final norm, W_U, log-softmax, KL to the stored final
   state's distribution, top-10) on it in float32 and bfloat16, against the same decoding on the CPU in
   float32 in this run, with how far each moves the KL. The pipeline's lenses stay in float32 on the CPU
   (``latent_atlas.lenses.pipeline``); this row measures what a GPU would buy and what bfloat16 would cost.
   Without a CUDA device, it says so.

Usage (after `make run` has built the model and store):
    .venv/bin/python benchmarks/lenses.py [--tokens 512] [--rounds 3] [--steps 6] [--train-layers all]
"""

import argparse
import statistics
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import torch
from harness import Spread, interleaved, peak, rate, ratio

from latent_atlas.config import select_layers
from latent_atlas.hooks import capture_residuals
from latent_atlas.lenses.base import Unembed
from latent_atlas.lenses.evaluate import evaluate_lenses, evaluation_tokens
from latent_atlas.lenses.pipeline import build_lenses
from latent_atlas.lenses.tuned import TrainingBatch, TunedLens, TunedLensTraining, train_tuned_lens
from latent_atlas.models import LoadedModel, load_model
from latent_atlas.store import ActivationStore


def plain_decode(store: ActivationStore, unembed: Unembed, rows: np.ndarray, layers: list[int], chunk: int) -> None:
    """The baseline: one matmul with W_U and a top-10 per (position, layer)."""
    weight = unembed.weight
    for start in range(0, len(rows), chunk):
        for layer in layers:
            states = torch.from_numpy(store.read(layer, rows[start : start + chunk]))
            (states @ weight.T).topk(10, dim=-1)


def decoding(loaded: LoadedModel, store: ActivationStore, args: argparse.Namespace) -> None:
    """Print all-lens evaluation throughput against plain matmul + top-k."""
    unembed = Unembed.from_parts(loaded.parts)
    tuned = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    tuned.trained_layers = list(range(loaded.n_layers))  # untrained translators cost the same to apply
    lenses = build_lenses(loaded, {}, tuned)
    layers = select_layers({"every": 3}, loaded.n_layers)
    tokens = evaluation_tokens(store, "heldout", args.tokens, skip_first_position=True)
    work = len(tokens.rows) * len(layers)
    methods = {
        "all lenses (evaluation)": lambda: evaluate_lenses(store, unembed, lenses, layers, tokens, chunk_size=256),
        "plain matmul + top-k": lambda: plain_decode(store, unembed, tokens.rows, layers, 256),
    }
    with torch.no_grad():
        samples = interleaved(methods, args.rounds)
    base = samples["plain matmul + top-k"]
    print(
        f"\n## Decoding: {len(tokens.rows)} held-out positions x {len(layers)} layers, {len(lenses)} lenses, ", end=""
    )
    print(f"{torch.get_num_threads()} threads, median (range) of {args.rounds} interleaved rounds\n")
    print("| method | positions x layers / s | x plain | x plain, per lens | peak RSS rise (MiB) |")
    print("|---|---|---|---|---|")
    for name, values in samples.items():
        against = ratio(values, base)
        n = len(lenses) if name.startswith("all") else 1
        per_lens = Spread(against.median * n, against.low * n, against.high * n)
        speed = rate(values, work).format(".0f")
        print(f"| {name} | {speed} | {against.format('.3f')} | {per_lens.format()} | {peak(values):.0f} |")


def _logit_lens_kl(
    unembed: Unembed, states: dict[int, torch.Tensor], final: torch.Tensor, device: str, chunk: int
) -> torch.Tensor:
    """Mean KL(final || logit lens) per layer, ``(n_layers,)`` float64, decoding ``chunk`` positions at a time."""
    dtype = unembed.weight.dtype
    totals = torch.zeros(len(states), dtype=torch.float64)
    for start in range(0, len(final), chunk):
        target = torch.log_softmax(unembed.lm_head(final[start : start + chunk].to(device, dtype)).float(), -1)
        for index, layer_states in enumerate(states.values()):
            logits = unembed(layer_states[start : start + chunk].to(device, dtype))
            lens = torch.log_softmax(logits.float(), -1)
            logits.topk(10, dim=-1)
            totals[index] += float((target.exp() * (target - lens)).sum(-1).sum(dtype=torch.float64))
    return totals / len(final)


def gpu_decoding(loaded: LoadedModel, store: ActivationStore, args: argparse.Namespace) -> None:
    """Print the logit lens's decoding on CUDA (float32, bfloat16) against the CPU float32 of this run."""
    if not torch.cuda.is_available():
        print("\nGPU rows skipped: no CUDA device found (torch.cuda.is_available() is False).")
        return
    layers = select_layers({"every": 3}, loaded.n_layers)
    tokens = evaluation_tokens(store, "heldout", args.tokens, skip_first_position=True)
    states = {layer: torch.from_numpy(store.read(layer, tokens.rows)) for layer in layers}
    final = torch.from_numpy(store.read("ln_final", tokens.rows))
    work = len(tokens.rows) * len(layers)
    variants = {"cpu / float32": ("cpu", torch.float32), "cuda / float32": ("cuda", torch.float32),
                "cuda / bfloat16": ("cuda", torch.bfloat16)}  # fmt: skip
    speeds: dict[str, list[float]] = {name: [] for name in variants}
    kls: dict[str, torch.Tensor] = {}
    unembeds = {name: Unembed.from_parts(loaded.parts).to(*variant) for name, variant in variants.items()}
    with torch.no_grad():
        for name, (device, _) in variants.items():  # warm-up (CUDA kernels, allocator)
            _logit_lens_kl(unembeds[name], {0: states[layers[0]][:8]}, final[:8], device, 256)
        for _ in range(args.rounds):
            for name, (device, _) in variants.items():
                torch.cuda.synchronize()
                begin = time.perf_counter()
                kls[name] = _logit_lens_kl(unembeds[name], states, final, device, 256)
                torch.cuda.synchronize()
                speeds[name].append(work / (time.perf_counter() - begin))
    base = statistics.median(speeds["cpu / float32"])
    print(f"\n## Logit-lens decoding on {torch.cuda.get_device_name()}: {len(tokens.rows)} positions x ", end="")
    print(f"{len(layers)} layers, against the CPU (float32) of this run\n")
    print("| device / dtype | positions x layers / s (median) | x CPU float32 | max abs. change of mean KL per layer |")
    print("|---|---|---|---|")
    for name, values in speeds.items():
        change = float((kls[name] - kls["cpu / float32"]).abs().max())
        print(f"| {name} | {statistics.median(values):.0f} | {statistics.median(values) / base:.2f} | {change:.2e} |")


def step_documents(store: ActivationStore, steps: int, tokens_per_step: int, seed: int) -> list[list[int]]:
    """For each step, random training documents (store doc rows) holding about ``tokens_per_step`` tokens."""
    docs = store.docs()
    counts = docs["token_count"].to_numpy()
    train = np.flatnonzero(docs["split"].to_numpy() == "train")
    generator = np.random.default_rng(seed)
    schedule = []
    for _ in range(steps):
        chosen, total = [], 0
        for doc in generator.permutation(train):
            chosen.append(int(doc))
            total += int(counts[doc])
            if total >= tokens_per_step:
                break
        schedule.append(chosen)
    return schedule


def stored_batches(store: ActivationStore, schedule: list[list[int]], layers: list[int]) -> list[TrainingBatch]:
    """Batches read from the store (each layer's training rows read once, then indexed per step)."""
    docs = store.docs()
    rows_of = {
        doc: np.arange(docs["token_start"][doc], docs["token_start"][doc] + docs["token_count"][doc])
        for step in schedule
        for doc in step
    }
    everything = np.unique(np.concatenate(list(rows_of.values())))
    position = {row: index for index, row in enumerate(everything)}
    data = {layer: torch.from_numpy(store.read(layer, everything)) for layer in [*layers, "ln_final"]}
    batches = []
    for step in schedule:
        index = torch.tensor([position[row] for doc in step for row in rows_of[doc]])
        batches.append(TrainingBatch({layer: data[layer][index] for layer in layers}, data["ln_final"][index]))
    return batches


def model_batches(
    loaded: LoadedModel, store: ActivationStore, schedule: list[list[int]], layers: list[int]
) -> Iterator[TrainingBatch]:
    """Batches computed by running the model on each step's documents (the published recipe's way)."""
    tokens, docs = store.tokens(), store.docs()
    for step in schedule:
        captured: dict[str, list[torch.Tensor]] = {}
        for doc in step:
            start, count = int(docs["token_start"][doc]), int(docs["token_count"][doc])
            ids = torch.tensor([tokens["token_id"][start : start + count].to_list()])

            def keep(address: str, states: torch.Tensor, captured: dict = captured) -> None:
                captured.setdefault(address, []).append(states[0])

            with torch.no_grad(), capture_residuals(loaded.parts, layers, keep):
                loaded.parts.body(input_ids=ids, use_cache=False)
        joined = {address: torch.cat(parts) for address, parts in captured.items()}
        yield TrainingBatch({layer: joined[f"resid.{layer:02d}"] for layer in layers}, joined["ln_final"])


def training(loaded: LoadedModel, store: ActivationStore, args: argparse.Namespace) -> None:
    """Print tuned-lens training time and held-out KL, from the store and from forward passes, interleaved."""
    layers = [layer for layer in select_layers(args.train_layers, loaded.n_layers) if layer < loaded.n_layers]
    settings = TunedLensTraining(steps=args.steps, tokens_per_step=args.tokens_per_step)
    schedule = step_documents(store, args.steps, args.tokens_per_step, seed=0)
    unembed = Unembed.from_parts(loaded.parts)

    def train(batches: Callable[[], Iterable[TrainingBatch]]) -> TunedLens:
        lens = TunedLens(unembed, loaded.n_layers, loaded.d_model)
        train_tuned_lens(lens, batches(), layers, settings)
        return lens

    methods = {
        "from the store": lambda: train(lambda: stored_batches(store, schedule, layers)),
        "re-running the model": lambda: train(lambda: model_batches(loaded, store, schedule, layers)),
    }
    samples = interleaved(methods, args.rounds)
    heldout = evaluation_tokens(store, "heldout", args.tokens, skip_first_position=True)
    base = samples["re-running the model"]
    tokens = sum(int(store.docs()["token_count"][doc]) for step in schedule for doc in step)
    print(f"\n## Tuned-lens training: {args.steps} steps, {tokens} tokens in all, {len(layers)} layers ", end="")
    print(f"({layers[0]}..{layers[-1]}), {torch.get_num_threads()} threads, median (range) of {args.rounds} ", end="")
    print("interleaved rounds; held-out KL of the last round's lens, mean over the layers\n")
    print("| method | s / step | x faster than re-running | held-out KL (mean over layers) |")
    print("|---|---|---|---|")
    for name, values in samples.items():
        table = evaluate_lenses(store, unembed, {"tuned": values[-1].output}, layers, heldout)
        kl = table.filter(pl.col("metric") == "kl_to_final")["value"].mean()
        per_step = Spread.of([sample.seconds / args.steps for sample in values])
        print(f"| {name} | {per_step.format()} | {ratio(values, base).format()} | {kl:.5f} |")


def _layers(text: str) -> str | dict[str, int]:
    """``all`` or ``every:k`` as :func:`~latent_atlas.config.select_layers` takes them."""
    return {"every": int(text.split(":")[1])} if text.startswith("every:") else text


def main() -> None:
    """Run both benchmarks on the default model and store."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="results/models/smollm2-135m")
    parser.add_argument("--store", default="results/activations/smollm2-135m/registers.h5")
    parser.add_argument("--tokens", type=int, default=512, help="held-out positions decoded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="tuned-lens training steps")
    parser.add_argument("--train-layers", type=_layers, default="all", help="tuned-lens layers: all, or every:k")
    parser.add_argument("--tokens-per-step", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", nargs="+", default=["decoding", "training", "gpu"], help="which tables to print")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    with ActivationStore(args.store) as store:
        for part in args.parts:
            {"decoding": decoding, "training": training, "gpu": gpu_decoding}[part](loaded, store, args)


if __name__ == "__main__":
    main()
