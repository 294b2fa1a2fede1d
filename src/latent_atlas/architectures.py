"""Where each Hugging Face causal LM keeps the parts the analyses read, and which analyses it supports.

Every analysis asks this module rather than guessing module names: the input embedding, decoder blocks and
final norm (probed in the module tree), the model's own post-head logit transform (Cohere's ``logit_scale``,
Granite's ``logits_scaling``, Gemma 2's ``final_logit_softcapping``, read from the config), the MLP layout
(gated, fused gate-up, two-matrix) and the attention layout (separate, fused QKV in its several orders;
grouped and multi-query heads). :data:`FAMILIES` declares, per tested family, what it supports and why not;
``docs/models.md`` is generated from it (``python -m latent_atlas.architectures``) and a test checks the two
agree, and that each declared cell really runs on a tiny model of the family.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from latent_atlas.errors import ModelAcquisitionError

ANALYSES: dict[str, str] = {
    "extraction": "residual capture into the store (= the model's hidden states)",
    "logit_lens": "logit lens (= the model's logits at the last layer, post-head scaling and soft-cap included)",
    "tuned_lens": "tuned-lens training",
    "semantic_basis": "semantic bases (pseudo-inverse of W_U)",
    "mlp_projections": "MLP key/value projections to the vocabulary",
    "head_projections": "attention OV/QK projections to the vocabulary",
    "patchscope": "patchscope (identity lens)",
    "actadd": "ActAdd steering",
    "mean_difference": "mean-difference steering",
    "icv": "in-context vectors (MLP-output shift)",
    "iti": "inference-time intervention (per-head activations and shifts)",
    "optimised_vector": "optimised steering vectors",
    "readers": "readers (ELM soft tokens, label logits)",
}


class UnsupportedArchitectureError(ModelAcquisitionError):
    """An analysis cannot run on an architecture; the message names both and what is missing."""

    def __init__(self, architecture: str, analysis: str, missing: str) -> None:
        what = f"{analysis} ({ANALYSES[analysis]})" if analysis in ANALYSES else analysis
        super().__init__(
            f"{architecture} does not support {what}: {missing}. See docs/models.md for what each "
            "architecture supports."
        )
        self.architecture, self.analysis, self.missing = architecture, analysis, missing


@dataclass(frozen=True)
class Family:
    """A tested architecture family: its config class, layouts and the analyses it refuses (with why)."""

    name: str
    model_types: tuple[str, ...]
    config_class: str
    mlp: str
    attention: str
    refuses: Mapping[str, str] = field(default_factory=dict)


_MOE = "a mixture-of-experts MLP has no single key/value matrix per block; per-expert projections are not built"
_OPT_350M = (
    "OPT with do_layer_norm_before=False or word_embed_proj_dim != hidden_size (opt-350m) has no final norm on "
    "the residual stream and reads the head through project_out"
)

FAMILIES: tuple[Family, ...] = (
    Family("Llama", ("llama",), "LlamaConfig", "gated", "separate, grouped"),
    Family("Llama (untied head)", (), "LlamaConfig(tie_word_embeddings=False)", "gated", "separate, grouped"),
    Family("Mistral", ("mistral",), "MistralConfig", "gated", "separate, grouped"),
    Family("Qwen2", ("qwen2",), "Qwen2Config", "gated", "separate (biased), grouped"),
    Family("Qwen3", ("qwen3",), "Qwen3Config", "gated", "separate, grouped, per-head q/k norm"),
    Family("Gemma 2", ("gemma2",), "Gemma2Config", "gated", "separate, grouped; final-logit soft-cap"),
    Family("Gemma 3", ("gemma3_text",), "Gemma3TextConfig", "gated", "separate, multi-query, q/k norm"),
    Family("Phi-3", ("phi3",), "Phi3Config", "fused gate-up", "fused QKV (q | k | v), grouped"),
    Family("Phi", ("phi",), "PhiConfig", "two-matrix (fc1/fc2)", "separate, dense output"),
    Family("GPT-2", ("gpt2",), "GPT2Config", "two-matrix (Conv1D c_fc/c_proj)", "fused QKV (Conv1D c_attn)"),
    Family("GPT-NeoX (Pythia)", ("gpt_neox",), "GPTNeoXConfig", "two-matrix", "fused QKV, interleaved per head"),
    Family("GPT-J", ("gptj",), "GPTJConfig", "two-matrix (fc_in/fc_out)", "separate, out_proj"),
    Family("OPT", ("opt",), "OPTConfig", "two-matrix (fc1/fc2 on the block)", "separate, out_proj"),
    Family("Falcon", ("falcon",), "FalconConfig", "two-matrix", "fused QKV, multi-query or grouped"),
    Family("Bloom", ("bloom",), "BloomConfig", "two-matrix", "fused QKV, interleaved per head (ALiBi)"),
    Family("OLMo 2", ("olmo2",), "Olmo2Config", "gated", "separate, grouped, q/k norm"),
    Family("StableLM", ("stablelm",), "StableLmConfig", "gated", "separate, grouped"),
    Family("Cohere", ("cohere",), "CohereConfig", "gated", "separate, grouped; logit_scale"),
    Family(
        "Mixtral (MoE)",
        ("mixtral",),
        "MixtralConfig",
        "mixture of experts",
        "separate, grouped",
        {
            "mlp_projections": _MOE,
        },
    ),
    Family(
        "OPT-350m layout",
        (),
        "OPTConfig(do_layer_norm_before=False, word_embed_proj_dim < hidden)",
        "two-matrix",
        "separate",
        {analysis: _OPT_350M for analysis in ANALYSES},
    ),
)


def family_of(config: Any) -> Family | None:
    """The declared family of a model config (by ``model_type``), or None for an untested architecture."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def architecture_name(model: nn.Module) -> str:
    """The model's class and ``model_type``, for error messages."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return type(model).__name__ if model_type is None else f"{type(model).__name__} (model_type {model_type!r})"


# --------------------------------------------------------------------------------------------------
# Body, embedding, blocks, final norm


LAYER_ATTRS = ("layers", "h", "blocks")
NORM_ATTRS = ("norm", "ln_f", "final_layer_norm", "final_norm", "final_layernorm")
EMBED_ATTRS = ("embed_tokens", "wte", "embed_in", "word_embeddings")


def _containers(body: nn.Module) -> list[nn.Module]:
    """The body and, for encoder-decoder-style naming (OPT's ``model.decoder``), its decoder."""
    decoder = getattr(body, "decoder", None)
    return [body, decoder] if isinstance(decoder, nn.Module) else [body]


def _first_module(containers: Iterable[nn.Module], names: Sequence[str]) -> nn.Module | None:
    """The first attribute among ``names`` that is a module, searching each container in turn; None if none is."""
    for container in containers:
        for name in names:
            found = getattr(container, name, None)
            if isinstance(found, nn.Module):
                return found
    return None


def find_module(body: nn.Module, names: Sequence[str], what: str, model: nn.Module) -> nn.Module:
    """The first of ``names`` found on the body (or its decoder), or an error naming the architecture."""
    found = _first_module(_containers(body), names)
    if found is not None:
        return found
    raise ModelAcquisitionError(
        f"cannot find the {what} of {architecture_name(model)} (looked for {', '.join(names)}); this "
        "architecture is not supported yet: add its module names to latent_atlas.architectures (docs/models.md)"
    )


def check_residual_readout(body: nn.Module, model: nn.Module) -> None:
    """Refuse layouts whose head does not read the residual stream through one final norm (opt-350m)."""
    for container in _containers(body):
        if getattr(container, "project_out", None) is not None or (
            hasattr(container, "final_layer_norm") and container.final_layer_norm is None
        ):
            raise UnsupportedArchitectureError(architecture_name(model), "any analysis", _OPT_350M)


# --------------------------------------------------------------------------------------------------
# The model's own logits: head, then its post-head scaling and soft-capping


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``lm_head(x)`` before returning logits: multiply, divide, then soft-cap."""

    scale: float = 1.0
    divisor: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        """Whether the transform changes nothing."""
        return self.scale == 1.0 and self.divisor == 1.0 and self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the transform in the order the models do (Cohere, Granite, then Gemma's cap)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def logit_transform(config: Any) -> LogitTransform:
    """The post-head transform a config declares: ``logit_scale``, ``logits_scaling``, ``final_logit_softcapping``."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    divisor = getattr(text, "logits_scaling", None)
    cap = getattr(text, "final_logit_softcapping", None)
    return LogitTransform(
        float(scale) if scale is not None else 1.0,
        float(divisor) if divisor is not None else 1.0,
        float(cap) if cap else None,
    )


class ScaledHead(nn.Module):
    """The LM head followed by the model's post-head transform; ``weight`` and ``bias`` are the head's own."""

    def __init__(self, head: nn.Module, transform: LogitTransform) -> None:
        super().__init__()
        self.head = head
        self.transform = transform

    @property
    def weight(self) -> torch.Tensor:
        """W_U, shape ``(V, d)``."""
        return self.head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The head's bias, if any."""
        return getattr(self.head, "bias", None)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """The model's logits of post-final-norm states."""
        return self.transform(self.head(states))


def readout_head(model: nn.Module) -> nn.Module:
    """The LM head as the model uses it: the bare head, or a :class:`ScaledHead` where logits are transformed."""
    head = model.get_output_embeddings()
    if head is None:
        raise ModelAcquisitionError(f"{architecture_name(model)} has no output embeddings (LM head); not a causal LM?")
    config = getattr(model, "config", None)
    transform = LogitTransform() if config is None else logit_transform(config)
    return head if transform.identity else ScaledHead(head, transform)


# --------------------------------------------------------------------------------------------------
# MLP layouts


@dataclass(frozen=True)
class MlpLayout:
    """Key and value vectors of one MLP layer, each ``(d_ff, d)``; ``keys`` maps a kind to its matrix.

    ``writer`` is the module whose input holds the neuron activations ``(..., d_ff)`` (the coefficients the
    value vectors are summed with); ``output`` the module whose output is the MLP's contribution to the stream.
    """

    keys: dict[str, torch.Tensor]
    values: torch.Tensor
    writer: nn.Module
    output: nn.Module


_TWO_MATRIX = (("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("fc_in", "fc_out"), ("fc1", "fc2"))


def _out_in(module: nn.Module) -> torch.Tensor:
    """A projection's weight in ``(out, in)`` layout (GPT-2's Conv1D stores ``(in, out)``)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def mlp_output(block: nn.Module) -> nn.Module:
    """The module whose output is the MLP's contribution to the residual stream (before any post-norm).

    The block's ``mlp`` where it returns just that; its down projection where the MLP adds the residual
    itself (Bloom); the block's ``fc2`` where the block has no MLP module (OPT).
    """
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        if hasattr(block, "fc2"):
            return block.fc2
        raise ModelAcquisitionError(f"no MLP found in {type(block).__name__} (looked for mlp, fc2)")
    if type(mlp).__name__ == "BloomMLP":  # returns dropout_add(mlp(x), residual)
        return mlp.dense_4h_to_h
    return mlp


def mlp_layout(block: nn.Module) -> MlpLayout:
    """Key vectors (rows that read the stream) and value vectors (rows written to it) of a block's MLP."""
    mlp = getattr(block, "mlp", None) or block
    output = mlp_output(block)
    if hasattr(mlp, "gate_proj") and hasattr(mlp, "down_proj"):  # Llama-likes: SwiGLU / GeGLU
        keys = {"key_gate": mlp.gate_proj.weight.detach(), "key_up": mlp.up_proj.weight.detach()}
        return MlpLayout(keys, mlp.down_proj.weight.detach().T, mlp.down_proj, output)
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):  # Phi-3: [gate | up] in one matrix
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2, dim=0)
        return MlpLayout({"key_gate": gate, "key_up": up}, mlp.down_proj.weight.detach().T, mlp.down_proj, output)
    for reader, writer in _TWO_MATRIX:
        if hasattr(mlp, reader) and hasattr(mlp, writer):
            read, write = getattr(mlp, reader), getattr(mlp, writer)
            return MlpLayout({"key": _out_in(read).detach()}, _out_in(write).detach().T, write, output)
    if hasattr(mlp, "experts"):
        raise UnsupportedArchitectureError(type(block).__name__, "mlp_projections", _MOE)
    raise ModelAcquisitionError(
        f"unknown MLP layout {type(mlp).__name__} in {type(block).__name__}: add it to latent_atlas.architectures"
    )


# --------------------------------------------------------------------------------------------------
# Attention layouts


@dataclass(frozen=True)
class HeadShape:
    """Query heads H, key/value heads H_kv (H_kv = 1: multi-query; 1 < H_kv < H: grouped) and head width."""

    n_heads: int
    n_kv_heads: int
    head_dim: int


def head_shape(config: Any) -> HeadShape:
    """The head counts and width a config declares (Falcon's multi-query and grouped variants included)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = int(text.num_attention_heads)
    if getattr(text, "model_type", None) == "falcon":
        n_kv = text.num_kv_heads if text.new_decoder_architecture else 1 if text.multi_query else n_heads
    else:
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return HeadShape(n_heads, int(n_kv), int(head_dim))


_ATTENTION_ATTRS = ("self_attn", "attn", "attention", "self_attention")
_OUTPUT_ATTRS = ("o_proj", "c_proj", "out_proj", "dense")


def attention_module(block: nn.Module) -> nn.Module:
    """A block's attention module."""
    found = _first_module([block], _ATTENTION_ATTRS)
    if found is not None:
        return found
    raise ModelAcquisitionError(
        f"no attention module found in {type(block).__name__} (looked for {', '.join(_ATTENTION_ATTRS)})"
    )


def output_projection(block: nn.Module) -> nn.Module:
    """The attention output projection of a block, whose input holds every head's output side by side."""
    attention = attention_module(block)
    for name in _OUTPUT_ATTRS:
        found = getattr(attention, name, None)
        if isinstance(found, nn.Module):
            return found
    raise ModelAcquisitionError(
        f"no attention output projection found in {type(attention).__name__} (looked for {', '.join(_OUTPUT_ATTRS)})"
    )


@dataclass(frozen=True)
class HeadFactors:
    """Per-head W_Q, W_K, W_V (each ``(d, d_h)``) and W_O (``(d_h, d)``) of one attention block."""

    query: list[torch.Tensor]
    key: list[torch.Tensor]
    value: list[torch.Tensor]
    output: list[torch.Tensor]


def _fused_split(attention: nn.Module, weight: torch.Tensor, shape: HeadShape) -> tuple[torch.Tensor, ...]:
    """Split a fused QKV weight ``(out, d)`` into Q ``(H·d_h, d)``, K and V ``(H_kv·d_h, d)`` as the model does."""
    n, n_kv, width = shape.n_heads, shape.n_kv_heads, shape.head_dim
    d = weight.shape[1]
    kind = type(attention).__name__
    if kind == "FalconAttention" and attention.new_decoder_architecture:  # per group: its queries, key, value
        grouped = weight.reshape(n_kv, n // n_kv + 2, width, d)
        return grouped[:, :-2].reshape(-1, d), grouped[:, -2].reshape(-1, d), grouped[:, -1].reshape(-1, d)
    if kind in ("GPTNeoXAttention", "BloomAttention") or (kind == "FalconAttention" and not attention.multi_query):
        per_head = weight.reshape(n, 3, width, d)  # per head: query, key, value
        return tuple(per_head[:, index].reshape(-1, d) for index in range(3))
    # GPT-2's c_attn, Phi-3's qkv_proj, Falcon multi-query: all queries, then all keys, then all values
    return tuple(weight.split([n * width, n_kv * width, n_kv * width], dim=0))


def _qkv_weights(attention: nn.Module, shape: HeadShape) -> tuple[torch.Tensor, ...]:
    """W_Q, W_K, W_V in ``(out, in)`` layout, whatever the attention's fused or separate form."""
    if all(hasattr(attention, f"{name}_proj") for name in "qkv"):
        return tuple(getattr(attention, f"{name}_proj").weight.detach() for name in "qkv")
    for name in ("c_attn", "query_key_value", "qkv_proj", "Wqkv"):
        fused = getattr(attention, name, None)
        if isinstance(fused, nn.Module):
            return _fused_split(attention, _out_in(fused).detach(), shape)
    raise ModelAcquisitionError(
        f"unknown attention layout {type(attention).__name__}: no q/k/v_proj, c_attn, query_key_value or qkv_proj"
    )


def head_factors(block: nn.Module, shape: HeadShape) -> HeadFactors:
    """Split a block's attention into per-head matrices (grouped: head h uses key/value head h // (H / H_kv))."""
    attention = attention_module(block)
    q, k, v = _qkv_weights(attention, shape)
    o = _out_in(output_projection(block)).detach()
    width, group = shape.head_dim, shape.n_heads // shape.n_kv_heads

    def rows(weight: torch.Tensor, index: int) -> torch.Tensor:
        return weight[index * width : (index + 1) * width].T

    return HeadFactors(
        query=[rows(q, h) for h in range(shape.n_heads)],
        key=[rows(k, h // group) for h in range(shape.n_heads)],
        value=[rows(v, h // group) for h in range(shape.n_heads)],
        output=[o[:, h * width : (h + 1) * width].T for h in range(shape.n_heads)],
    )


def projection_weight(projection: nn.Module) -> torch.Tensor:
    """A projection's weight in ``(out, in)`` layout (GPT-2's Conv1D stores ``(in, out)``)."""
    return _out_in(projection)


# --------------------------------------------------------------------------------------------------
# Support, declared and checked


def require(model: nn.Module, analysis: str) -> None:
    """Fail clearly, before any work, if the model's family declares that it cannot run ``analysis``."""
    if analysis not in ANALYSES:
        raise ValueError(f"unknown analysis {analysis!r}; use one of {', '.join(ANALYSES)}")
    family = family_of(model.config)
    if family is not None and analysis in family.refuses:
        raise UnsupportedArchitectureError(architecture_name(model), analysis, family.refuses[analysis])


def support_matrix() -> list[dict[str, str]]:
    """One row per family: its name, config class, layouts and, per analysis, ``yes`` or ``no: why``."""
    rows = []
    for family in FAMILIES:
        row = {"family": family.name, "config": family.config_class, "mlp": family.mlp, "attention": family.attention}
        for analysis in ANALYSES:
            row[analysis] = f"no: {family.refuses[analysis]}" if analysis in family.refuses else "yes"
        rows.append(row)
    return rows


def render_models_doc() -> str:
    """The text of ``docs/models.md``: the support matrix and what each refusal means."""
    header = ["Family", "Config (tiny model in the test)", "MLP", "Attention", *ANALYSES]
    lines = [
        "# Supported models",
        "",
        "Generated by `python -m latent_atlas.architectures > docs/models.md` from",
        "`latent_atlas.architectures.FAMILIES`;",
        "`tests/unit/test_architectures.py` takes a tiny random model of every family through every analysis the",
        "family claims (each checked against transformers' own outputs) and checks that each refused cell raises",
        "an error naming the architecture, the analysis and what is missing, and that this page is current.",
        "Architectures not listed here work where their module names follow one of the layouts below; an",
        "unknown layout fails at load or at the start of the analysis, naming what it looked for.",
        "",
        "Analyses: " + "; ".join(f"`{name}`: {text}" for name, text in ANALYSES.items()) + ".",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    reasons: dict[str, int] = {}
    for row in support_matrix():
        cells = [row["family"], f"`{row['config']}`", row["mlp"], row["attention"]]
        for analysis in ANALYSES:
            value = row[analysis]
            if value == "yes":
                cells.append("yes")
            else:
                number = reasons.setdefault(value.removeprefix("no: "), len(reasons) + 1)
                cells.append(f"no ({number})")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Why not:", ""]
    lines += [f"{number}. {reason}." for reason, number in reasons.items()]
    lines += [
        "",
        "Caveats of supported cells: head projections read weights as stored (no RoPE, ALiBi or q/k norm: the QK",
        "form is exact at relative offset 0 and without q/k norms); the logit lens applies the model's own",
        "post-head transform (Cohere's `logit_scale`, Granite's `logits_scaling`, Gemma's final-logit soft-cap),",
        "which the semantic-basis lens, being a cosine, does not need.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_models_doc(), end="")
