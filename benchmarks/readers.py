"""Benchmark ELM adapter training against the bare forward + backward of the frozen LM, in the same run.

Three ways through the same steps of the same ELM batches (a prompt with the soft tokens, a target text):
- ``bare forward+backward``: the frozen LM's loss (HF ``labels``, logits at every position) and ``backward()``
  to ``inputs_embeds`` built beforehand with ``requires_grad`` (the floor: no adapter, no optimiser);
- ``adapter training step``: latent-atlas's :func:`training_step`: the adapter's soft tokens spliced into the
  batch, the LM forward (the head reads the target positions only), backward to the adapter, clipping, AdamW;
- ``train_adapter() (latent-atlas)``: the whole loop, with tokenisation, example order and its held-out
  evaluations (step 0, every ``--eval-every`` steps and the end), counted in training examples.
The table gives training examples per second and the ratio to the bare forward + backward.

Runs on the real SmolLM2 when ``results/models/smollm2-135m`` exists (after `make run`), else on a tiny random
Llama (said in the heading); ``--tiny`` forces the tiny model.

Usage:
    .venv/bin/python benchmarks/readers.py [--steps 4 --batch 8 --target-tokens 16 --rounds 3 --threads 2]
"""

import argparse
import random
from pathlib import Path

import torch
from harness import interleaved, rate, ratio

from latent_atlas.models import LoadedModel, load_model, locate_parts
from latent_atlas.readers import elm
from latent_atlas.testing import tiny_config, tiny_tokenizer

PROMPT = "Passage: <embedding>\nThe passage begins:"
WORDS = ("the", "a", "of", "and", "to", "in", "is", "was", "for", "on", "it", "by", "at", "from",
         "dog", "cat", "house", "river", "city", "old", "new", "small", "red", "light")  # fmt: skip


def tiny_model() -> LoadedModel:
    """A random 4-layer Llama (d=64) with the tiny word-level tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer), 4, 64), dtype=torch.float32)
    return LoadedModel(model.eval(), tokenizer, {"d_model": 64}, locate_parts(model), torch.device("cpu"))


def synthetic_task(n: int, d_w: int, target_words: int) -> tuple[torch.Tensor, list[elm.ElmExample]]:
    """``n`` random domain embeddings, each with a random sentence of ``target_words`` words as target."""
    rng = random.Random(0)
    targets = [" " + " ".join(rng.choice(WORDS) for _ in range(target_words)) for _ in range(n)]
    embeddings = torch.randn(n, d_w, generator=torch.Generator().manual_seed(0))
    return embeddings, elm.make_examples(range(n), targets, PROMPT)


def step_batches(n_examples: int, steps: int, batch: int) -> list[list[int]]:
    """The example indices of each step, as train_adapter orders them (seed 0)."""
    return [elm.example_order(n_examples, 0, step, batch) for step in range(steps)]


def bare(loaded: LoadedModel, inputs: list[elm.ElmBatch]) -> None:
    """The frozen LM's loss and the gradient of its inputs only."""
    with elm.lm_trainable(loaded, False):
        for batch in inputs:
            embeds = batch.inputs_embeds.detach().requires_grad_(True)
            loaded.model(inputs_embeds=embeds, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()


def adapter_steps(loaded: LoadedModel, adapter: elm.EmbeddingAdapter, data: dict, order: list[list[int]]) -> None:
    """latent-atlas's training_step for every batch, the LM frozen."""
    optimiser = elm.adapter_optimiser(loaded, adapter, lr=1e-3)
    encoded = elm.encode_examples(loaded.tokenizer, data["train"])
    with elm.lm_trainable(loaded, False):
        for rows in order:
            indices = [data["train"][i].embedding_index for i in rows]
            elm.training_step(loaded, adapter, optimiser, data["embeddings"], [encoded[i] for i in rows], indices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("results/models/smollm2-135m"))
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama even if the model exists")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target-tokens", type=int, default=16, help="words per target sentence")
    parser.add_argument("--n-soft", type=int, default=1)
    parser.add_argument("--heldout", type=int, default=8, help="held-out examples scored by train_adapter")
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    real = args.model.is_dir() and not args.tiny
    loaded = load_model(args.model, device=args.device) if real else tiny_model()
    n_train = args.steps * args.batch
    embeddings, examples = synthetic_task(n_train + args.heldout, loaded.d_model, args.target_tokens)
    data = {"embeddings": embeddings, "train": examples[:n_train], "heldout": examples[n_train:]}
    order = step_batches(n_train, args.steps, args.batch)
    encoded = elm.encode_examples(loaded.tokenizer, data["train"])
    soft = torch.randn(args.batch, args.n_soft, loaded.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        inputs = [elm.build_batch(loaded, [encoded[i] for i in rows], soft) for rows in order]

    norm = elm.typical_embedding_norm(loaded.parts)

    def fresh() -> elm.EmbeddingAdapter:
        return elm.EmbeddingAdapter(loaded.d_model, loaded.d_model, norm, n_soft=args.n_soft).to(loaded.device)

    runs = {
        "bare forward+backward": lambda: bare(loaded, inputs),
        "adapter training step": lambda: adapter_steps(loaded, fresh(), data, order),
        "train_adapter() (latent-atlas)": lambda: elm.train_adapter(
            loaded,
            fresh(),
            embeddings,
            data["train"],
            data["heldout"],
            args.steps,
            args.batch,
            eval_every=args.eval_every,
            progress=False,
        ),
    }
    samples = interleaved(runs, args.rounds)
    tokens = sum(int(batch.attention_mask.sum()) for batch in inputs) / n_train
    reason = "--tiny" if args.tiny else f"{args.model} not found"
    name = loaded.manifest.get("name", str(args.model)) if real else f"tiny random Llama ({reason})"
    evaluations = len({0, args.steps, *range(args.eval_every, args.steps + 1, args.eval_every)})
    print(
        f"\n## ELM adapter training: {name} (d={loaded.d_model}, {loaded.n_layers} layers), {args.steps} steps x "
        f"{args.batch} examples of ~{tokens:.0f} tokens ({args.n_soft} soft token(s)), {args.threads} thread(s), "
        f"{loaded.device}, median of {args.rounds} rounds; train_adapter() also scores {args.heldout} held-out "
        f"examples {evaluations} times\n"
    )
    print("| run | examples / s, median (range) | x bare forward+backward, median (range) |")
    print("|---|---|---|")
    for run, values in samples.items():
        speed, against = rate(values, n_train).format(".1f"), ratio(values, samples["bare forward+backward"]).format()
        print(f"| {run} | {speed} | {against} |")


if __name__ == "__main__":
    main()
