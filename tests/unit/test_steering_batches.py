"""A sweep batched over prompts x samples x strengths gives the table of the same settings run one at a time."""

from dataclasses import replace

import numpy as np
import polars as pl
import torch

from latent_atlas.steering.generate import (
    Decoding,
    StateCapture,
    continuation_log_probs,
    cut_at_eos,
    generate,
    perplexity,
)
from latent_atlas.steering.interventions import Intervention, MlpShift, ResidualAddition
from latent_atlas.steering.pipeline import SweepSettings, _row_seed, continuations_table, sweep_batches

# two prompts of one length and one shorter: batches mix prompts, and lengths differ
PROMPTS = ["the dog saw a", "one day the cat", "the house was"]
COEFFICIENTS = [0.0, 1.5, 4.0]
LAYERS = (1, 3)
SETTINGS = SweepSettings(4, (Decoding("greedy"), Decoding("sampled")), samples=2, seed=5, batch_size=5)


def _interventions(loaded) -> dict[str, Intervention]:
    generator = torch.Generator().manual_seed(1)
    d = loaded.d_model
    return {
        "actadd": ResidualAddition(1, torch.randn(2, d, generator=generator), COEFFICIENTS, "front", start=1),
        "mean_difference": ResidualAddition(2, torch.randn(d, generator=generator), COEFFICIENTS, "all", start=1),
        "icv": MlpShift(0.3 * torch.randn(loaded.n_layers, d, generator=generator), COEFFICIENTS),
    }


def _one_at_a_time(loaded, intervention: Intervention) -> tuple[list[dict], StateCapture]:
    """Every setting alone (one row per generate call), as the sweep once ran; its rows and its captured states."""
    capture, rows = StateCapture(LAYERS), []
    eos = loaded.tokenizer.eos_token_id
    for prompt_id, prompt in enumerate(PROMPTS):
        ids = loaded.tokenizer(prompt)["input_ids"]
        for decoding in SETTINGS.decodings:
            for sample in range(SETTINGS.samples if decoding.sampled else 1):
                seed = _row_seed(SETTINGS.seed, prompt_id, sample)
                for coefficient in COEFFICIENTS:
                    capture.context.update(prompt_id=prompt_id, decoding=decoding.name, sample=sample)
                    alone = intervention.with_coefficients([coefficient])
                    tokens = generate(loaded, ids, alone, 1, SETTINGS.max_new_tokens, decoding, [seed], capture)
                    cut = cut_at_eos(tokens, eos)
                    score = continuation_log_probs(loaded, ids, cut)[0]
                    text = loaded.tokenizer.decode(cut[0], skip_special_tokens=True)
                    rows.append({"coefficient": coefficient, "decoding": decoding.name, "prompt_id": prompt_id})
                    rows[-1] |= {"sample": sample, "seed": seed, "continuation": text, "perplexity": perplexity(score)}
    return rows, capture


def test_rows_are_batched_by_prompt_length_and_bounded():
    batches = sweep_batches([3, 5, 3, 4], samples=2, strengths=2, batch_size=6)
    assert batches[0] == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (2, 0, 0), (2, 0, 1)]
    assert batches[1] == [(2, 1, 0), (2, 1, 1)]
    assert [{prompt for prompt, _, _ in batch} for batch in batches[2:]] == [{1}, {3}]
    every = sorted(row for batch in batches for row in batch)
    assert every == [(p, s, c) for p in range(4) for s in range(2) for c in range(2)]


def test_the_batched_table_equals_every_setting_run_alone(tiny_loaded):
    lengths = [len(tiny_loaded.tokenizer(prompt)["input_ids"]) for prompt in PROMPTS]
    assert lengths[0] == lengths[1] != lengths[2]
    for name, intervention in _interventions(tiny_loaded).items():
        capture = StateCapture(LAYERS)
        table = continuations_table(
            tiny_loaded, intervention, COEFFICIENTS, PROMPTS, SETTINGS, lambda text: 0.0, capture=capture
        )
        rows, alone = _one_at_a_time(tiny_loaded, intervention)
        expected = pl.DataFrame(rows)
        assert table.height == len(PROMPTS) * 3 * len(COEFFICIENTS)  # greedy + 2 samples
        keys = ["coefficient", "decoding", "prompt_id", "sample", "seed", "continuation"]
        assert table.select(keys).equals(expected.select(keys)), name  # same rows, same order, same tokens
        np.testing.assert_allclose(table["perplexity"], expected["perplexity"], rtol=1e-5)
        _check_capture(capture, alone, name)


def _check_capture(batched: StateCapture, alone: StateCapture, name: str) -> None:
    """Each (prompt, decoding, sample, strength) carries the tokens and states it had when run alone."""
    keys = ["prompt_id", "decoding", "sample", "coefficient", "step"]
    got, want = batched.table().sort(keys), alone.table().sort(keys)
    assert got.schema == want.schema, name  # per-row labels typed as one-value labels are
    assert got.drop("state", "row").equals(want.drop("state", "row")), name
    for layer in LAYERS:
        states = batched.arrays()[layer][got["state"].to_numpy()]
        reference = alone.arrays()[layer][want["state"].to_numpy()]
        np.testing.assert_allclose(states, reference, rtol=1e-5, atol=1e-5, err_msg=name)


def test_the_batch_size_changes_no_token(tiny_model_dirs):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    intervention = _interventions(loaded)["mean_difference"]
    tables = [
        continuations_table(loaded, intervention, COEFFICIENTS, PROMPTS, replace(SETTINGS, batch_size=size), len)
        for size in (1, 4, 64)  # every row alone; batches cut across prompts and samples; one batch per length
    ]
    for table in tables[1:]:
        assert table.drop("perplexity").equals(tables[0].drop("perplexity"))
        np.testing.assert_allclose(table["perplexity"], tables[0]["perplexity"], rtol=1e-5)
