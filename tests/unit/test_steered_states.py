"""Generated tokens' states captured during batched, KV-cached generation equal a re-run of the whole sequence."""

import numpy as np
import pytest
import torch

from latent_atlas.steering.generate import Decoding, StateCapture, generate, read_states, write_states
from latent_atlas.steering.interventions import Intervention, MlpShift, ResidualAddition
from tests.conftest import reference_states


def _block_inputs(loaded, ids: list[int]) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """One plain forward pass of a whole sequence: what each block (and the final norm) reads, by pre-hooks, and
    transformers' own ``hidden_states`` (the raw last-block output by a hook)."""
    read: dict[int, torch.Tensor] = {}
    readers = [*loaded.parts.layers[1:], loaded.parts.final_norm]
    handles = [
        module.register_forward_pre_hook(lambda m, args, layer=layer: read.update({layer: args[0][0]}))
        for layer, module in enumerate(readers, start=1)
    ]
    try:
        states, _ = reference_states(loaded, torch.tensor(ids))
    finally:
        for handle in handles:
            handle.remove()
    return read, states


def _rerun(loaded, ids: list[int], intervention: Intervention | None, coefficient: float) -> tuple[dict, list]:
    """:func:`_block_inputs` of one sequence run alone under the row's coefficient (no cache, no padding)."""
    if intervention is None:
        return _block_inputs(loaded, ids)
    alone = intervention.with_coefficients([coefficient])
    alone.prompt_pass = True  # a full pass: what the prompt pass edited, and every later position
    with alone.attach(loaded.parts):
        return _block_inputs(loaded, ids)


def _check_against_rerun(loaded, capture, prompts, tokens, intervention, coefficients, layers) -> None:
    """Captured states equal what the next block reads in a re-run, and transformers' ``hidden_states`` where no
    hook edits the block's output (its ``hidden_states`` at an edited ``resid.LL`` are taken before the edit)."""
    table, arrays = capture.table(), capture.arrays()
    n_new = tokens.shape[1]
    edited = getattr(intervention, "layer", None)
    for row, (prompt, coefficient) in enumerate(zip(prompts, coefficients, strict=True)):
        sequence = [*prompt, *tokens[row].tolist()]
        read, hidden = _rerun(loaded, sequence, intervention, coefficient)
        records = table.filter(table["row"] == row).sort("step")
        assert records["step"].to_list() == list(range(n_new))
        assert records["token_id"].to_list() == tokens[row].tolist()
        positions = np.arange(len(prompt), len(sequence))  # the generated tokens' own positions
        for layer in layers:
            captured = torch.from_numpy(arrays[layer][records["state"].to_numpy()])
            torch.testing.assert_close(captured, read[layer][positions].float(), atol=2e-4, rtol=2e-4)
            if layer != edited and getattr(intervention, "site", "mlp") == "mlp":
                torch.testing.assert_close(captured, hidden[layer][positions].float(), atol=2e-4, rtol=2e-4)


LAYERS = (1, 2, 3)  # the tiny models have 3 blocks: resid.03 is the raw last-block output


def _interventions(loaded, coefficients) -> dict[str, Intervention]:
    generator = torch.Generator().manual_seed(1)
    d = loaded.d_model
    return {
        "actadd": ResidualAddition(1, torch.randn(2, d, generator=generator), coefficients, "front", start=1),
        "mean_difference": ResidualAddition(2, torch.randn(d, generator=generator), coefficients, "all", start=1),
        "icv": MlpShift(0.3 * torch.randn(loaded.n_layers, d, generator=generator), coefficients),
    }


@pytest.mark.parametrize("decoding", [Decoding("greedy"), Decoding("sampled")])
def test_one_prompt_under_every_strength_equals_a_rerun(tiny_loaded, decoding):
    coefficients = [0.0, 1.5, 4.0]
    prompt = tiny_loaded.tokenizer("the dog saw a cat")["input_ids"]
    for name, intervention in _interventions(tiny_loaded, coefficients).items():
        capture = StateCapture(LAYERS, context={"method": name})
        tokens = generate(tiny_loaded, prompt, intervention, 3, 5, decoding, [3, 3, 3], capture)
        _check_against_rerun(tiny_loaded, capture, [prompt] * 3, tokens, intervention, coefficients, LAYERS)
        table = capture.table()
        assert table.height == 3 * 5 and set(table["method"]) == {name}
        assert sorted(set(table["coefficient"])) == coefficients
        if not decoding.sampled:  # the model's own next token is the next greedy token
            for row in range(3):
                records = table.filter(table["row"] == row).sort("step")
                assert records["model_top1_id"].to_list()[:-1] == tokens[row, 1:].tolist()


def test_several_prompts_left_padded_under_a_steering_intervention_equal_a_rerun(tiny_loaded):
    texts = ["the dog", "a small red house was by the", "one day the light"]
    prompts = [tiny_loaded.tokenizer(text)["input_ids"] for text in texts]
    assert len({len(prompt) for prompt in prompts}) == 3  # three lengths: two rows are left-padded
    coefficients = [2.0, 0.0, 5.0]
    for name in ("icv", "plain_addition"):
        if name == "icv":
            intervention = _interventions(tiny_loaded, coefficients)["icv"]
        else:
            vector = torch.randn(tiny_loaded.d_model, generator=torch.Generator().manual_seed(2))
            intervention = ResidualAddition(2, vector, coefficients, "all")
        capture = StateCapture(LAYERS)
        tokens = generate(tiny_loaded, prompts, intervention, 3, 4, capture=capture)
        _check_against_rerun(tiny_loaded, capture, prompts, tokens, intervention, coefficients, LAYERS)
    capture = StateCapture((2,))
    tokens = generate(tiny_loaded, prompts, None, 3, 4, capture=capture)
    _check_against_rerun(tiny_loaded, capture, prompts, tokens, None, [0.0] * 3, (2,))


def test_padding_is_refused_for_a_position_indexed_intervention(tiny_loaded):
    prompts = [tiny_loaded.tokenizer(text)["input_ids"] for text in ("the dog", "a small red house was")]
    actadd = _interventions(tiny_loaded, [1.0, 2.0])["actadd"]
    with pytest.raises(ValueError, match="position-indexed"):
        generate(tiny_loaded, prompts, actadd, 2, 3)


def test_capture_changes_no_token_and_round_trips_through_the_file(tiny_model_dirs, tmp_path):
    from latent_atlas.models import load_model

    loaded = load_model(tiny_model_dirs["llama"], device="cpu")
    intervention = _interventions(loaded, [0.0, 3.0])["mean_difference"]
    plain = generate(loaded, "the dog saw", intervention, 2, 6)
    capture = StateCapture((1, 3), context={"prompt_id": 0, "layer": 2})
    assert torch.equal(generate(loaded, "the dog saw", intervention, 2, 6, capture=capture), plain)
    eos = loaded.tokenizer.eos_token_id
    tokens = torch.tensor([[5, eos, 6], [5, 6, 7]])
    table = StateCapture((1,))
    seen = {1: [torch.zeros(2, loaded.d_model)] * 4}
    table.add(seen, tokens, tokens, [0.0, 1.0], eos)
    assert table.table()["after_eos"].to_list() == [False, False, True, False, False, False]
    write_states(tmp_path / "s.h5", capture, {"method": "mean_difference"})
    records, states, meta = read_states(tmp_path / "s.h5")
    assert records.equals(capture.table()) and meta == {"method": "mean_difference"}
    for layer, array in capture.arrays().items():
        np.testing.assert_allclose(states[layer], array.astype(np.float16).astype(np.float32))
