"""Benchmark the training loop against the bare forward + backward of the same model, in the same run.

Three ways through the same steps of the same packed batches:
- ``bare forward+backward``: the model's loss and ``backward()`` only, no optimiser (the floor);
- ``forward+backward+AdamW``: plus clipping, the optimiser and schedule steps, still no bookkeeping;
- ``train()`` (latent-atlas): the full loop, with its loss log, validation losses and atomic checkpoints
  at the configured intervals.
The table gives training tokens per second and the ratio to the bare forward + backward, so the cost of
the loop's bookkeeping shows as the gap between the last two rows.

Usage (no model or corpus needed: random tokens, a freshly initialised member):
    .venv/bin/python benchmarks/training.py [--hidden 64 --layers 4 --vocab 4096 --steps 40 --rounds 3]
"""

import argparse
import tempfile
from types import SimpleNamespace

import numpy as np
import torch
from harness import interleaved, rate, ratio

from latent_atlas.training.loop import Architecture, Optimiser, Recipe, build_model, learning_rate_factor, train


class _Vocabulary(SimpleNamespace):
    """What build_model reads of a tokenizer: its special ids and its length."""

    def __len__(self) -> int:
        return self.size


def bare(model: torch.nn.Module, data: torch.Tensor, recipe: Recipe) -> None:
    """Loss and gradients only."""
    batch = recipe.batch_size
    for step in range(recipe.steps):
        inputs = data[step * batch : (step + 1) * batch]
        model(input_ids=inputs, labels=inputs, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)


def with_optimiser(model: torch.nn.Module, data: torch.Tensor, recipe: Recipe) -> None:
    """Loss, gradients, clipping, AdamW and the schedule: the loop without logging or checkpoints."""
    settings = recipe.optimiser
    optimiser = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: learning_rate_factor(step, recipe))
    batch = recipe.batch_size
    for step in range(recipe.steps):
        inputs = data[step * batch : (step + 1) * batch]
        model(input_ids=inputs, labels=inputs, use_cache=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip_grad_norm)
        optimiser.step()
        scheduler.step()
        optimiser.zero_grad(set_to_none=True)


def full_loop(model: torch.nn.Module, data: torch.Tensor, recipe: Recipe, validation: np.ndarray) -> None:
    """latent-atlas's train(), checkpoints written to a temporary folder."""
    with tempfile.TemporaryDirectory() as checkpoints:
        train(model, data.numpy(), validation, recipe, checkpoints, {"run": "benchmark"}, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--sequence", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="as config.yaml's training section")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="1, as the default family's jobs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    architecture = Architecture(args.hidden, args.layers, args.heads, 4 * args.hidden, args.sequence)
    recipe = Recipe(
        architecture,
        Optimiser(),
        tokens=args.steps * args.batch * args.sequence,
        batch_size=args.batch,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
    )
    vocabulary = _Vocabulary(size=args.vocab, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    rng = np.random.default_rng(0)
    data = torch.from_numpy(rng.integers(0, args.vocab, size=(recipe.train_sequences, args.sequence)))
    validation = rng.integers(0, args.vocab, size=(recipe.validation_sequences, args.sequence))
    runs = {
        "bare forward+backward": lambda model: bare(model, data, recipe),
        "forward+backward+AdamW": lambda model: with_optimiser(model, data, recipe),
        "train() (latent-atlas)": lambda model: full_loop(model, data, recipe, validation),
    }
    fresh = {
        name: lambda run=run: run(build_model(architecture, vocabulary, seed=0).train()) for name, run in runs.items()
    }
    samples = interleaved(fresh, args.rounds)  # building the 0.5 M-parameter model takes milliseconds
    tokens = recipe.steps * recipe.tokens_per_step
    n_params = sum(p.numel() for p in build_model(architecture, vocabulary, seed=0).parameters())
    print(
        f"\n## Training throughput: {n_params / 1e6:.2f}M-parameter Llama (d={args.hidden}, {args.layers} layers, "
        f"V={args.vocab}), {recipe.steps} steps x {recipe.tokens_per_step} tokens, {args.threads} thread(s), "
        f"CPU, median of {args.rounds} rounds; train() validates every {args.eval_every} and checkpoints every "
        f"{args.checkpoint_every} steps\n"
    )
    print("| run | tokens / s, median (range) | x bare forward+backward, median (range) |")
    print("|---|---|---|")
    for name, values in samples.items():
        speed, against = rate(values, tokens).format(".0f"), ratio(values, samples["bare forward+backward"]).format()
        print(f"| {name} | {speed} | {against} |")


if __name__ == "__main__":
    main()
