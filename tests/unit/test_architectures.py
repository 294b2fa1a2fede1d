"""The support matrix as code: a tiny random model of every family through every analysis it claims.

Each family of :data:`latent_atlas.architectures.FAMILIES` has a tiny model built here from transformers'
own config class, acquired (``source: local``) and loaded as a user's would be. Every cell the family claims
is checked against an independent computation (the model's own hidden states, logits, KV cache and attention
probabilities, or a closed form); every cell it refuses must raise an error naming the architecture, the
analysis and what is missing. ``docs/models.md`` must equal what the registry renders.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch
import transformers as hf

from latent_atlas import architectures
from latent_atlas.architectures import ANALYSES, FAMILIES, UnsupportedArchitectureError, head_shape, mlp_output
from latent_atlas.extract import ExtractionSettings, extract_activations
from latent_atlas.lenses import LogitLens, SemanticBasisLens, TunedLens, Unembed
from latent_atlas.lenses.patchscope import patched_last_logits
from latent_atlas.lenses.projections import head_factors, mlp_vectors, project_heads, project_mlp
from latent_atlas.lenses.tuned import TunedLensTraining, sampled_batches, train_tuned_lens
from latent_atlas.models import LoadedModel, acquire_model, load_model
from latent_atlas.readers.elm.batching import head_logits
from latent_atlas.readers.lora import label_logits
from latent_atlas.steering.interventions import HeadDirection, HeadShift, MlpShift, ResidualAddition, output_projection
from latent_atlas.steering.vectors import (
    actadd_vector,
    head_activations,
    icv_vectors,
    mean_difference_vector,
    optimise_vector,
    prefix_tokens,
)
from latent_atlas.store import ActivationStore
from latent_atlas.testing import tiny_tokenizer
from tests.conftest import STORE_ATTRS

REPO = Path(__file__).resolve().parents[2]
D, HEADS, LAYERS = 32, 4, 2
TEXTS = ["the dog saw the cat at night .", "a small red house was by the river .", "one day the light came ."]
PAIRS = [("the dog saw a cat", "the cat saw a dog"), ("a red house", "a blue house"), ("the old way", "the new way")]
COMMON = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}


def _llama_like(config_class: type, **extra: Any) -> Callable[[int], Any]:
    """A builder of a small grouped-query config of a Llama-like family."""

    def build(vocab: int) -> Any:
        fields = {
            "vocab_size": vocab,
            "hidden_size": D,
            "intermediate_size": 2 * D,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            **COMMON,
            **extra,
        }
        return config_class(**{key: value for key, value in fields.items() if value is not None})

    return build


def _gpt_like(config_class: type, **fields: Any) -> Callable[[int], Any]:
    """A builder of a small config whose fields are named as given (GPT-2, GPT-J, Bloom, ...)."""
    return lambda vocab: config_class(vocab_size=vocab, **{**COMMON, **fields})


# test name -> (family name in the registry, config builder, std of the LM head's weights or None for 1)
ARCHITECTURES: dict[str, tuple[str, Callable[[int], Any], float | None]] = {
    "llama": ("Llama", _llama_like(hf.LlamaConfig, tie_word_embeddings=True), None),
    "llama_untied": ("Llama (untied head)", _llama_like(hf.LlamaConfig, tie_word_embeddings=False), None),
    "mistral": ("Mistral", _llama_like(hf.MistralConfig), None),
    "qwen2": ("Qwen2", _llama_like(hf.Qwen2Config), None),
    "qwen3": ("Qwen3", _llama_like(hf.Qwen3Config, head_dim=8), None),
    # final_logit_softcapping 30 (the released value) with a head scaled so the raw logits reach far beyond it
    "gemma2": ("Gemma 2", _llama_like(hf.Gemma2Config, head_dim=8, final_logit_softcapping=30.0), 25.0),
    "gemma3": ("Gemma 3", _llama_like(hf.Gemma3TextConfig, head_dim=8, num_key_value_heads=1, sliding_window=16), None),
    "phi3": ("Phi-3", _llama_like(hf.Phi3Config), None),
    "phi": ("Phi", _llama_like(hf.PhiConfig, num_key_value_heads=HEADS), None),
    "gpt2": ("GPT-2", _gpt_like(hf.GPT2Config, n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=128), None),
    "gpt_neox": ("GPT-NeoX (Pythia)", _llama_like(hf.GPTNeoXConfig, num_key_value_heads=None), None),
    "gptj": ("GPT-J", _gpt_like(hf.GPTJConfig, n_embd=D, n_layer=LAYERS, n_head=HEADS, rotary_dim=4), None),
    "opt": (
        "OPT",
        _gpt_like(hf.OPTConfig, hidden_size=D, ffn_dim=2 * D, num_hidden_layers=LAYERS, num_attention_heads=HEADS),
        None,
    ),
    "falcon": (
        "Falcon",
        _gpt_like(hf.FalconConfig, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS),
        None,
    ),
    "falcon_grouped": (
        "Falcon",
        _gpt_like(
            hf.FalconConfig,
            hidden_size=D,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            new_decoder_architecture=True,
            num_kv_heads=2,
        ),
        None,
    ),
    "falcon_interleaved": (
        "Falcon",
        _gpt_like(
            hf.FalconConfig,
            hidden_size=D,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            multi_query=False,
            bias=True,
        ),
        None,
    ),
    "bloom": ("Bloom", _gpt_like(hf.BloomConfig, hidden_size=D, n_layer=LAYERS, n_head=HEADS), None),
    "olmo2": ("OLMo 2", _llama_like(hf.Olmo2Config), None),
    "stablelm": ("StableLM", _llama_like(hf.StableLmConfig), None),
    "cohere": ("Cohere", _llama_like(hf.CohereConfig, logit_scale=4.0), 1.0),
    "mixtral": ("Mixtral (MoE)", _llama_like(hf.MixtralConfig, num_local_experts=2, num_experts_per_tok=1), None),
    "opt_350m": (
        "OPT-350m layout",
        _gpt_like(
            hf.OPTConfig,
            hidden_size=D,
            ffn_dim=2 * D,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
        ),
        None,
    ),
}
FAMILY = {family.name: family for family in FAMILIES}


def _build(arch: str, root: Path) -> Path:
    """Save a seeded tiny model of ``arch`` with the tiny tokenizer; return its directory."""
    _, build, head_scale = ARCHITECTURES[arch]
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = hf.AutoModelForCausalLM.from_config(build(len(tokenizer)), dtype=torch.float32)
    with torch.no_grad():  # weights at a trained scale, so every block and the head matter (not near-identity)
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                parameter.normal_(0.0, 0.2)
        # a peaked head; Gemma 2's raw logits far beyond its soft-cap, Cohere's scale far from 1
        model.get_output_embeddings().weight.normal_(0.0, head_scale or 1.0)
    source = root / f"source-{arch}"
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    return source


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LoadedModel]:
    """Each architecture acquired (``source: local``) and loaded once, as a user's model would be."""
    root = tmp_path_factory.mktemp("architectures")
    cache: dict[str, LoadedModel] = {}

    def get(arch: str) -> LoadedModel:
        if arch not in cache:
            spec = {"source": "local", "path": str(_build(arch, root))}
            acquire_model(f"tiny-{arch}", spec, root / arch, root / "downloads")
            loaded = load_model(root / arch, device="cpu")
            # transformers 5 reads a generic tokenizer saved beside a Qwen2 config as Qwen2's own BPE class,
            # which splits the tiny word-level vocabulary wrongly; the tokenizer is not what is tested here
            loaded.tokenizer = tiny_tokenizer()
            cache[arch] = loaded
        return cache[arch]

    return get


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, models: Callable[[str], LoadedModel]) -> Callable[[str], Path]:
    """An extracted activation store of the tiny corpus per architecture, built once."""
    root = tmp_path_factory.mktemp("architecture-stores")
    cache: dict[str, Path] = {}
    corpus = pl.DataFrame(
        {
            "doc_id": [f"d{i}" for i in range(len(TEXTS) * 4)],
            "text": TEXTS * 4,
            "label": ["x"] * (len(TEXTS) * 4),
            "split": ["train"] * (len(TEXTS) * 4),
            "source": ["test"] * (len(TEXTS) * 4),
        }
    )

    def get(arch: str) -> Path:
        if arch not in cache:
            settings = ExtractionSettings(dtype="float32", device="cpu", splits=("train",))
            extract_activations(models(arch), corpus, root / f"{arch}.h5", settings, STORE_ATTRS, progress=False)
            cache[arch] = root / f"{arch}.h5"
        return cache[arch]

    return get


def _ids(loaded: LoadedModel, text: str) -> torch.Tensor:
    return torch.tensor([loaded.tokenizer(text)["input_ids"]])


@torch.no_grad()
def _output(loaded: LoadedModel, ids: torch.Tensor, **kwargs: Any) -> Any:
    return loaded.model(input_ids=ids, use_cache=False, output_hidden_states=True, **kwargs)


# --------------------------------------------------------------------------------------------------
# One check per analysis, each against an independent computation


@torch.no_grad()
def check_extraction(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Stored resid.l (l < L) and ln_final equal the model's own hidden states, document by document."""
    with ActivationStore(stores(arch)) as store:
        for index, text in enumerate(TEXTS):
            rows = store.doc_rows(f"d{index}")
            hidden = _output(loaded, _ids(loaded, text)).hidden_states
            for layer in range(loaded.n_layers):
                expected = hidden[layer][0].numpy()
                np.testing.assert_allclose(store.read(layer, rows), expected, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(store.read("ln_final", rows), hidden[-1][0].numpy(), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def check_logit_lens(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """The lens of the raw last block output equals the model's logits (its scaling and soft-cap included)."""
    ids = _ids(loaded, TEXTS[0])
    captured: dict[str, torch.Tensor] = {}
    handle = loaded.parts.layers[-1].register_forward_hook(
        lambda _m, _a, out: captured.update(raw=out[0] if isinstance(out, tuple) else out)
    )
    try:
        logits = _output(loaded, ids).logits
    finally:
        handle.remove()
    lens = LogitLens(Unembed.from_parts(loaded.parts))
    torch.testing.assert_close(lens.logits(captured["raw"], loaded.n_layers), logits, atol=1e-4, rtol=1e-5)


def check_tuned_lens(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Training on the store lowers the KL to the model's distribution; the last layer stays the model."""
    unembed = Unembed.from_parts(loaded.parts)
    lens = TunedLens(unembed, loaded.n_layers, loaded.d_model)
    settings = TunedLensTraining(steps=8, tokens_per_step=10_000, lr_scale=1.0)  # full batch: every store row
    with ActivationStore(stores(arch)) as store:
        rows = slice(0, store.n_tokens)
        final = torch.from_numpy(store.read("ln_final", rows))
        last = torch.from_numpy(store.read(loaded.n_layers, rows))
        batches = sampled_batches(lambda layer: torch.from_numpy(store.read(layer, rows)), final, [0], settings)
        losses = train_tuned_lens(lens, batches, [0], settings)
    assert losses[-1] < losses[0], losses
    with torch.no_grad():
        torch.testing.assert_close(
            lens.logits(last, loaded.n_layers), loaded.parts.lm_head(final), atol=1e-4, rtol=1e-5
        )


@torch.no_grad()
def check_semantic_basis(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """W S = I_d for the bases S = W^+ of W = W_U^T (full row rank), and the lens reads states."""
    lens = SemanticBasisLens(Unembed.from_parts(loaded.parts))
    w = loaded.parts.lm_head.weight.detach().double().T
    torch.testing.assert_close(w @ lens.bases, torch.eye(loaded.d_model, dtype=torch.float64), atol=1e-8, rtol=0)
    logits = lens.logits(torch.randn(3, loaded.d_model), 1)
    assert logits.shape == (3, w.shape[1]) and bool(torch.isfinite(logits).all())


def _activation(block: torch.nn.Module) -> torch.nn.Module:
    """The MLP's own activation module, as transformers names it in each family."""
    for owner in (getattr(block, "mlp", None), block):
        for name in ("act_fn", "act", "activation_fn", "gelu_impl"):
            if isinstance(getattr(owner, name, None), torch.nn.Module):
                return getattr(owner, name)
    raise AssertionError(f"no activation found in {type(block).__name__}")


@torch.no_grad()
def check_mlp_projections(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """The neuron activations the model computes are act(x K_gate^T) * x K_up^T (gated) or act(x K^T + b),
    and the MLP's output is their sum of value vectors: keys and values as the model uses them."""
    tokens, alignment = project_mlp(loaded, [1, 2], k=3, overlap_k=5)
    assert set(tokens["layer"].unique()) == {1, 2} and len(alignment) >= 2
    block = loaded.parts.layers[0]
    layout = mlp_vectors(block)
    first = block.mlp if hasattr(block, "mlp") else block.fc1  # the module that reads the MLP's input
    found: dict[str, torch.Tensor] = {}
    handles = [
        first.register_forward_pre_hook(
            lambda _m, args, kwargs: found.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        ),
        layout.writer.register_forward_pre_hook(lambda _m, args: found.update(a=args[0])),
        layout.writer.register_forward_hook(lambda _m, _a, out: found.update(out=out.clone())),  # Falcon adds in place
    ]
    try:
        _output(loaded, _ids(loaded, TEXTS[1]))
    finally:
        for handle in handles:
            handle.remove()
    x, a = found["x"][0], found["a"][0]
    act = _activation(block)
    if "key_gate" in layout.keys:
        expected = act(x @ layout.keys["key_gate"].T) * (x @ layout.keys["key_up"].T)
    else:
        owner = block.mlp if hasattr(block, "mlp") else block
        reader = next(getattr(owner, n) for n in ("c_fc", "dense_h_to_4h", "fc_in", "fc1") if hasattr(owner, n))
        bias = reader.bias if getattr(reader, "bias", None) is not None else 0.0
        expected = act(x @ layout.keys["key"].T + bias)
    torch.testing.assert_close(a, expected, atol=1e-5, rtol=1e-4)
    bias = layout.writer.bias if getattr(layout.writer, "bias", None) is not None else 0.0
    torch.testing.assert_close(found["out"][0], a @ layout.values + bias, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def _attention_run(
    loaded: LoadedModel, ids: torch.Tensor
) -> tuple[Any, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """An eager pass with attention probabilities and the KV cache; the attention inputs and output projections."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(loaded.parts.layers):
        attention = architectures.attention_module(block)
        handles.append(
            attention.register_forward_pre_hook(
                lambda _m, args, kwargs, i=index: inputs.update({i: args[0] if args else kwargs["hidden_states"]}),
                with_kwargs=True,
            )
        )
        handles.append(
            output_projection(block).register_forward_hook(lambda _m, _a, out, i=index: outputs.update({i: out}))
        )
    previous = loaded.model.config._attn_implementation
    loaded.model.set_attn_implementation("eager")
    try:
        result = loaded.model(input_ids=ids, use_cache=True, output_attentions=True)
    finally:
        loaded.model.set_attn_implementation(previous)
        for handle in handles:
            handle.remove()
    return result, inputs, outputs


def _per_head_outputs(result: Any, layer: int, n_heads: int) -> torch.Tensor:
    """Each head's output P_h V_h from the model's own attention probabilities and cached values, ``(B, T, H, d_h)``."""
    cache = getattr(result, "cache", None) or result.past_key_values
    values = cache.layers[layer].values  # (B, H_kv, T, d_h)
    group = n_heads // values.shape[1]
    values = values.repeat_interleave(group, dim=1)
    return (result.attentions[layer] @ values).transpose(1, 2)


@torch.no_grad()
def check_head_projections(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Per-head W_V and W_K reproduce the model's cached values and (unrotated, position-0) keys; W_O maps the
    heads' outputs P·V to the output projection's output."""
    shape = head_shape(loaded.model.config)
    ids = torch.tensor([loaded.tokenizer(text)["input_ids"][:4] for text in TEXTS[:2]])
    result, inputs, outputs = _attention_run(loaded, ids)
    cache = getattr(result, "cache", None) or result.past_key_values
    for layer, block in enumerate(loaded.parts.layers):
        heads = head_factors(block, shape.n_heads, shape.n_kv_heads, shape.head_dim)
        x, group = inputs[layer], shape.n_heads // shape.n_kv_heads
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        attention = architectures.attention_module(block)
        for head in range(shape.n_heads):
            kv = head // group
            # differences cancel the biases: between positions for values, between prompts at position 0 for keys
            torch.testing.assert_close(
                (x[:, 1:] - x[:, :1]) @ heads.value[head], values[:, kv, 1:] - values[:, kv, :1], atol=1e-5, rtol=1e-4
            )
            if not hasattr(attention, "k_norm"):  # q/k norms are not part of the stored weights
                torch.testing.assert_close(
                    (x[1, 0] - x[0, 0]) @ heads.key[head], keys[1, kv, 0] - keys[0, kv, 0], atol=1e-5, rtol=1e-4
                )
        per_head = _per_head_outputs(result, layer, shape.n_heads)
        projection = output_projection(block)
        bias = projection.bias if getattr(projection, "bias", None) is not None else 0.0
        mixed = sum(per_head[:, :, h] @ heads.output[h] for h in range(shape.n_heads)) + bias
        torch.testing.assert_close(mixed, outputs[layer], atol=1e-5, rtol=1e-4)
    table = project_heads(loaded, [1], k=3)
    assert set(table["head"].unique()) == set(range(shape.n_heads))


@torch.no_grad()
def check_patchscope(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Patching a prompt's own last state back in at any layer leaves the model's next-token logits."""
    ids = _ids(loaded, TEXTS[0])[0]
    output = _output(loaded, ids[None])
    for layer in range(loaded.n_layers):  # hidden_states[l] = resid.l below the last layer
        state = output.hidden_states[layer][0, -1:]
        patched = patched_last_logits(loaded, ids, layer, state)
        torch.testing.assert_close(patched[0], output.logits[0, -1], atol=1e-4, rtol=1e-5)


@torch.no_grad()
def check_actadd(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """ActAdd of (p+ − p−) at resid.1 turns the model on p− into the model on p+ (equal lengths); 0 is a no-op."""
    positive, negative = "the dog saw", "a cat went"
    prefix = prefix_tokens(loaded.tokenizer)
    vector = actadd_vector(loaded, positive, negative, 1, prefix)
    plus, minus = (
        torch.tensor([[*prefix, *loaded.tokenizer(t, add_special_tokens=False)["input_ids"]]])
        for t in (positive, negative)
    )
    for strength, expected in ((1.0, _output(loaded, plus).logits), (0.0, _output(loaded, minus).logits)):
        addition = ResidualAddition(1, vector, [strength], positions="front", start=len(prefix))
        with addition.attach(loaded.parts):
            steered = _output(loaded, minus).logits
        if strength == 0.0:
            assert torch.equal(steered, expected)
        else:
            torch.testing.assert_close(steered, expected, atol=1e-3, rtol=1e-4)
    with pytest.raises(ValueError, match="positive prompt '' encodes to no tokens"):
        actadd_vector(loaded, "", negative, 1, prefix)


@torch.no_grad()
def check_mean_difference(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """The vector is the mean last-token difference of the model's own hidden_states[1]."""
    vector = mean_difference_vector(loaded, PAIRS, 1)
    expected = torch.stack(
        [
            _output(loaded, _ids(loaded, p)).hidden_states[1][0, -1]
            - _output(loaded, _ids(loaded, n)).hidden_states[1][0, -1]
            for p, n in PAIRS
        ]
    ).mean(0)
    torch.testing.assert_close(vector, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def check_icv(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """ICV at strength 0 is bit-identical; otherwise it moves the logits and keeps the MLP output's norm."""
    vectors = icv_vectors(loaded, PAIRS)
    assert vectors.shape == (loaded.n_layers, loaded.d_model)
    ids = _ids(loaded, TEXTS[2])
    plain = _output(loaded, ids).logits
    module = mlp_output(loaded.parts.layers[0])
    seen: list[torch.Tensor] = []
    for strength in (0.0, 0.5):
        shift = MlpShift(vectors, [strength])
        with shift.attach(loaded.parts):
            handle = module.register_forward_hook(
                lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out).clone())
            )
            try:
                steered = _output(loaded, ids).logits
            finally:
                handle.remove()
        assert torch.equal(steered, plain) if strength == 0 else not torch.allclose(steered, plain)
    torch.testing.assert_close(seen[1].norm(dim=-1), seen[0].norm(dim=-1), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def check_iti(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Per-head activations equal P_h V_h from the model's attention and cache; a head shift of 0 is a no-op."""
    shape = head_shape(loaded.model.config)
    activations = head_activations(loaded, TEXTS, shape.head_dim)
    assert activations.shape == (len(TEXTS), loaded.n_layers, shape.n_heads, shape.head_dim)
    for row, text in enumerate(TEXTS):
        result, _, _ = _attention_run(loaded, _ids(loaded, text))
        for layer in range(loaded.n_layers):
            expected = _per_head_outputs(result, layer, shape.n_heads)[0, -1]
            torch.testing.assert_close(activations[row, layer], expected, atol=1e-5, rtol=1e-4)
    heads = [HeadDirection(1, 1, torch.nn.functional.normalize(torch.randn(shape.head_dim), dim=0), 2.0)]
    ids = _ids(loaded, TEXTS[0])
    plain = _output(loaded, ids).logits
    for strength in (0.0, 3.0):
        with HeadShift(heads, shape.head_dim, [strength]).attach(loaded.parts):
            steered = _output(loaded, ids).logits
        # (bit-identity at strength 0 is tested in test_steering; Mixtral's grouped experts are not bitwise stable)
        assert torch.allclose(steered, plain, atol=1e-6) != (strength != 0)
        torch.testing.assert_close(steered[0, :-1], plain[0, :-1], atol=1e-6, rtol=0)  # the last position only


def check_optimised_vector(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Optimising a vector lowers the target's loss on the model."""
    result = optimise_vector(loaded, "the dog saw a cat", 1, steps=6, learning_rate=0.2)
    assert result.vector.shape == (loaded.d_model,) and result.losses[-1] < result.losses[0], result.losses


@torch.no_grad()
def check_readers(loaded: LoadedModel, arch: str, stores: Callable[[str], Path]) -> None:
    """Soft tokens live where the input embedding writes (inputs_embeds = the ids' run), and the ELM's head
    logits of the body's states are the model's logits."""
    ids = _ids(loaded, TEXTS[0])
    expected = _output(loaded, ids).logits
    embedded = loaded.model(inputs_embeds=loaded.parts.embed(ids), use_cache=False).logits
    torch.testing.assert_close(embedded, expected, atol=1e-4, rtol=1e-5)
    states = loaded.parts.body(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(head_logits(loaded, states), expected, atol=1e-4, rtol=1e-5)
    labels = [1, 2, 3]  # the LoRA baseline's label-word logits are the model's logits of those words
    found = label_logits(loaded, [ids[0].tolist()], labels, pad_id=0)
    torch.testing.assert_close(found, expected[:, -1, labels].float(), atol=1e-4, rtol=1e-5)


CHECKS: dict[str, Callable[[LoadedModel, str, Callable[[str], Path]], None]] = {
    name: globals()[f"check_{name}"] for name in ANALYSES
}
CELLS = [(arch, analysis) for arch in ARCHITECTURES for analysis in ANALYSES]


@pytest.mark.parametrize(("arch", "analysis"), CELLS, ids=[f"{a}-{b}" for a, b in CELLS])
def test_support_matrix_cell(arch: str, analysis: str, models, stores) -> None:
    family = FAMILY[ARCHITECTURES[arch][0]]
    if analysis not in family.refuses:
        CHECKS[analysis](models(arch), arch, stores)
        return
    with pytest.raises(UnsupportedArchitectureError) as refused:
        CHECKS[analysis](models(arch), arch, stores)
    message = str(refused.value)
    model_class = hf.AutoModelForCausalLM._model_mapping[type(ARCHITECTURES[arch][1](8))].__name__
    assert family.refuses[analysis] in message and model_class in message
    assert analysis in message or "any analysis" in message


@pytest.mark.parametrize("arch", ["gemma2", "cohere"])
@torch.no_grad()
def test_the_post_head_transform_bites(arch: str, models) -> None:
    """Gemma 2's soft-cap and Cohere's scale move the logits far beyond the tolerance the logit lens meets."""
    loaded = models(arch)
    output = _output(loaded, _ids(loaded, TEXTS[0]))
    raw = loaded.model.get_output_embeddings()(output.hidden_states[-1])
    assert float((raw - output.logits).abs().max()) > 10.0
    if arch == "gemma2":
        assert float(raw.abs().max()) > 2 * loaded.model.config.final_logit_softcapping


def test_every_family_has_a_tiny_model_and_at_least_sixteen_pass_everything() -> None:
    families = {family for family, _build, _scale in ARCHITECTURES.values()}
    assert families == set(FAMILY)
    complete = [family for family in FAMILIES if not family.refuses]
    assert len(complete) >= 16


def test_models_doc_is_generated_from_the_registry() -> None:
    path = REPO / "docs" / "models.md"
    assert path.read_text() == architectures.render_models_doc(), (
        "docs/models.md is stale: run `python -m latent_atlas.architectures > docs/models.md`"
    )
