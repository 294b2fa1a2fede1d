"""Steering vectors of METHODS §7, each deterministic given its inputs (and seed, where one is used).

- :func:`actadd_vector`: ActAdd's contrast (Turner et al.), ``resid(p+) − resid(p−)`` at every position
  after a shared start token (:func:`prefix_tokens`), the shorter prompt padded with space tokens;
- :func:`mean_difference_vector`: the mean over contrast pairs of the last-token difference;
- :func:`icv_vectors`: in-context vectors (Liu et al., the published code's form): the first principal
  direction of the demonstration differences plus their mean, one direction per block;
- :func:`head_activations`, :func:`fit_head_probes`, :func:`top_heads`, :func:`iti_heads`: inference-time
  intervention (Li et al.): per-head activations, logistic probes fitted on one split and scored on another,
  the heads of highest accuracy, their mass-mean directions;
- :func:`optimise_vector`: a vector that makes the model decode a target sentence (Subramani et al.).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.hooks import capture_residuals
from latent_atlas.models import LoadedModel
from latent_atlas.steering.interventions import HeadDirection, ResidualAddition, output_projection


@torch.no_grad()
def _states(loaded: LoadedModel, ids: Sequence[int], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``resid.{l}`` of one token sequence for each layer, ``(T, d)`` float32."""
    captured: dict[str, torch.Tensor] = {}
    with capture_residuals(loaded.parts, layers, lambda a, s: captured.update({a: s}), final_norm=False):
        loaded.parts.body(input_ids=torch.tensor([list(ids)], device=loaded.device), use_cache=False)
    return {layer: captured[f"resid.{layer:02d}"][0].float().cpu() for layer in layers}


def _space_id(loaded: LoadedModel) -> int:
    """A padding token for ActAdd prompts: the tokenizer's space, else its pad or EOS token."""
    ids = loaded.tokenizer(" ", add_special_tokens=False)["input_ids"]
    if ids:
        return int(ids[-1])
    return int(loaded.tokenizer.pad_token_id or loaded.tokenizer.eos_token_id or 0)


DOCUMENT_TOKEN = "<|endoftext|>"


def prefix_tokens(tokenizer: Any, prefix: str | None = "auto", key: str = "steering.prefix") -> list[int]:
    """The start tokens put before every steered prompt (and optimised vectors' targets), left unedited.

    ``auto``: the token the tokenizer itself puts first (its BOS), if it adds one; else the document separator
    ``<|endoftext|>`` where the vocabulary has it as one token (GPT-2; SmolLM2, id 0, whose declared BOS is the
    chat token ``<|im_start|>``); else the declared BOS, else EOS token. ``none`` (or null): no prefix. Any
    other string: its tokens (special tokens are recognised). ``key`` names the setting in errors.
    """
    if prefix is None or prefix == "none":
        return []
    if prefix != "auto":
        ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ConfigError(f"{key} {prefix!r} encodes to no token; use auto, none or a non-empty string")
        return ids
    bare, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    if tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] != bare[:1]:
        return [int(tokenizer.bos_token_id)]
    document = tokenizer.convert_tokens_to_ids(DOCUMENT_TOKEN) if DOCUMENT_TOKEN in tokenizer.get_vocab() else None
    for token in (document, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return [int(token)]
    raise ConfigError(f"{key}: auto found no BOS, {DOCUMENT_TOKEN} or EOS token; set a string or none")


def encode_after(tokenizer: Any, text: str, prefix: Sequence[int]) -> list[int]:
    """``prefix`` followed by the tokens of ``text`` (no special tokens of the tokenizer's own)."""
    return [*prefix, *tokenizer(text, add_special_tokens=False)["input_ids"]]


def actadd_vector(
    loaded: LoadedModel, positive: str, negative: str, layer: int, prefix: Sequence[int] = ()
) -> torch.Tensor:
    """``resid.{layer}(prefix + p+) − resid.{layer}(prefix + p−)`` after the prefix, ``(T_s, d)``.

    The shorter prompt is space-padded (Turner et al.'s code). The prefix rows, identical in both prompts and
    hence 0, are dropped: the vector is added from the position after the prefix (:class:`ResidualAddition`'s
    ``start = len(prefix)``). ``resid.{layer}`` is the state after block ``layer`` = the input of the next
    block, TransformerLens's ``blocks.{layer}.hook_resid_pre`` = HF ``hidden_states[layer]``.
    """
    plus, minus = (encode_after(loaded.tokenizer, text, prefix) for text in (positive, negative))
    for role, text, ids in (("positive", positive, plus), ("negative", negative, minus)):
        if len(ids) == len(prefix):
            raise ValueError(
                f"the ActAdd {role} prompt {text!r} encodes to no tokens; set actadd.{role} in the steering data "
                "to text the model's tokenizer reads"
            )
    width = max(len(plus), len(minus))
    plus, minus = (ids + [_space_id(loaded)] * (width - len(ids)) for ids in (plus, minus))
    difference = _states(loaded, plus, [layer])[layer] - _states(loaded, minus, [layer])[layer]
    return difference[len(prefix) :]


def _encode(loaded: LoadedModel, text: str, prefix: Sequence[int] | None) -> list[int]:
    """``text``'s ids after ``prefix``, or with the tokenizer's own special tokens when ``prefix`` is None.

    Raises:
        ValueError: naming the text, when it encodes to no tokens at all.
    """
    ids = loaded.tokenizer(text)["input_ids"] if prefix is None else encode_after(loaded.tokenizer, text, prefix)
    if not ids:
        raise ValueError(f"the steering text {text!r} encodes to no tokens; give it text the model's tokenizer reads")
    return ids


def last_token_states(
    loaded: LoadedModel, texts: Sequence[str], layers: Sequence[int], prefix: Sequence[int] | None = None
) -> torch.Tensor:
    """``resid.{l}`` at the last token of each text (after ``prefix``, if given), ``(n_texts, n_layers, d)``."""
    rows = []
    for text in texts:
        states = _states(loaded, _encode(loaded, text, prefix), layers)
        rows.append(torch.stack([states[layer][-1] for layer in layers]))
    return torch.stack(rows)


def mean_difference_vector(
    loaded: LoadedModel, pairs: Sequence[Sequence[str]], layer: int, prefix: Sequence[int] | None = None
) -> torch.Tensor:
    """Mean over pairs of ``resid.{layer}(positive) − resid.{layer}(negative)`` at the last token, ``(d,)``.

    With ``prefix``, each text follows it, as the steered prompts do (:func:`prefix_tokens`).
    """
    positive = last_token_states(loaded, [pair[0] for pair in pairs], [layer], prefix)[:, 0]
    negative = last_token_states(loaded, [pair[1] for pair in pairs], [layer], prefix)[:, 0]
    return (positive - negative).mean(0)


def icv_vectors(
    loaded: LoadedModel,
    demonstrations: Sequence[Sequence[str]],
    variant: str = "pca+mean",
    prefix: Sequence[int] | None = None,
) -> torch.Tensor:
    """In-context vectors, one per block, ``(L, d)``.

    As the published code (``tasks/base.py::obtain_icv``, ``task_style_vector.py``): H(s) concatenates the
    embedding output and the block outputs (``resid.0 .. resid.L``) at the last token; ΔH_i = H(y_i) − H(x_i).
    ``pca+mean``: the first principal direction of the centred ΔH (unit norm over (L+1)·d, sign fixed so that
    its largest-magnitude score is positive, the code's ``svd_flip``) plus the mean ΔH; ``pca``: the direction
    alone (the paper's description). The embedding entry is dropped after the PCA (``icv[1:]``). Computed in
    float64 by a full SVD (deterministic). With ``prefix``, each demonstration follows it (the published code's
    LLaMA tokenizer puts its BOS first).
    """
    layers = list(range(0, loaded.n_layers + 1))
    sources = last_token_states(loaded, [pair[0] for pair in demonstrations], layers, prefix).double()
    targets = last_token_states(loaded, [pair[1] for pair in demonstrations], layers, prefix).double()
    differences = (targets - sources).reshape(len(demonstrations), -1)
    mean = differences.mean(0)
    centred = differences - mean
    u, _, vh = torch.linalg.svd(centred, full_matrices=False)
    sign = torch.sign(u[u[:, 0].abs().argmax(), 0]) if centred.abs().max() > 0 else torch.tensor(1.0)
    direction = vh[0] * (sign if sign != 0 else 1.0)
    if centred.abs().max() == 0:  # identical differences (e.g. x = y for every pair): no direction
        direction = torch.zeros_like(mean)
    if variant not in ("pca+mean", "pca"):
        raise ValueError(f"unknown ICV variant {variant!r}; use 'pca+mean' or 'pca'")
    vector = direction + mean if variant == "pca+mean" else direction
    return vector.reshape(loaded.n_layers + 1, loaded.d_model)[1:].float()


@torch.no_grad()
def head_activations(loaded: LoadedModel, texts: Sequence[str], head_dim: int, batch_size: int = 32) -> torch.Tensor:
    """Every head's output before the output projection at the last token, ``(n_texts, L, H, d_h)``.

    Texts are right-padded in batches: a causal model's states at real tokens ignore the padding after them.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for index, block in enumerate(loaded.parts.layers, start=1):

        def hook(module: torch.nn.Module, args: tuple, block: int = index) -> None:
            captured[block] = args[0].float()

        handles.append(output_projection(block).register_forward_pre_hook(hook))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    rows = []
    try:
        for start in range(0, len(texts), batch_size):
            encoded = [loaded.tokenizer(text)["input_ids"] for text in texts[start : start + batch_size]]
            lengths = torch.tensor([len(ids) for ids in encoded])
            ids = torch.full((len(encoded), int(lengths.max())), pad, dtype=torch.long)
            for row, tokens in enumerate(encoded):
                ids[row, : len(tokens)] = torch.tensor(tokens)
            mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
            loaded.parts.body(input_ids=ids.to(loaded.device), attention_mask=mask.to(loaded.device), use_cache=False)
            last = (lengths - 1).to(loaded.device)
            per_block = [captured[block][torch.arange(len(encoded)), last] for block in sorted(captured)]
            rows.append(torch.stack(per_block, 1).reshape(len(encoded), len(per_block), -1, head_dim).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


@dataclass(frozen=True)
class HeadProbes:
    """Per-head logistic probes fitted on one set of statements, and their shuffled-label twins (chance control).

    A head's probe reads its activations standardised by the fitting rows' ``mean`` and ``std`` ``(L, H, d_h)``;
    ``weights`` ``(L, H, d_h)`` and ``bias`` ``(L, H)`` are fitted to the labels, ``shuffled_weights`` and
    ``shuffled_bias`` to the same labels permuted.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weights: torch.Tensor
    bias: torch.Tensor
    shuffled_weights: torch.Tensor
    shuffled_bias: torch.Tensor

    def correct(self, activations: torch.Tensor, labels: torch.Tensor, shuffled: bool = False) -> torch.Tensor:
        """Per row and head, whether the probe reads the row right: ``(n, L, H)`` booleans."""
        weights, bias = (self.shuffled_weights, self.shuffled_bias) if shuffled else (self.weights, self.bias)
        standard = (activations.double() - self.mean) / self.std
        predictions = torch.einsum("nlhf,lhf->nlh", standard, weights) + bias > 0
        return predictions == labels.bool()[:, None, None]

    def accuracy(self, activations: torch.Tensor, labels: torch.Tensor, shuffled: bool = False) -> torch.Tensor:
        """Accuracy ``(L, H)`` of every head's probe on ``activations`` ``(n, L, H, d_h)`` with ``labels`` ``(n,)``."""
        return self.correct(activations, labels, shuffled).double().mean(0).float()


def _fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, weight_decay: float, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Many independent L2-regularised logistic regressions at once by full-batch L-BFGS.

    ``features`` is ``(P, n, f)`` (P problems), ``labels`` ``(n,)`` in {0, 1}; returns weights ``(P, f)`` and
    biases ``(P,)``. The loss is the mean log-loss plus ``weight_decay/2 · ‖w‖²`` (summed over problems,
    which are independent, so one optimiser serves all).
    """
    weights = torch.zeros(features.shape[0], features.shape[2], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(features.shape[0], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], max_iter=steps, line_search_fn="strong_wolfe")
    target = labels.double().expand(features.shape[0], -1)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        logits = torch.einsum("pnf,pf->pn", features, weights) + bias[:, None]
        loss = functional.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
        total = (loss + weight_decay / 2 * (weights**2).sum(1)).sum()
        total.backward()
        return total

    optimiser.step(closure)
    return weights.detach(), bias.detach()


def fit_head_probes(
    activations: torch.Tensor, labels: torch.Tensor, seed: int = 0, weight_decay: float = 1e-2, steps: int = 100
) -> HeadProbes:
    """One logistic probe per head fitted on every row given, and one on the labels shuffled by ``seed``.

    ``activations`` is ``(n, L, H, d_h)``, ``labels`` ``(n,)``: the training split only (the caller splits by
    item, so both statements of an item fall on one side). Features are standardised by these rows.
    """
    n, n_layers, n_heads, head_dim = activations.shape
    values = activations.double()
    mean, std = values.mean(0), values.std(0).clamp_min(1e-6)
    features = ((values - mean) / std).permute(1, 2, 0, 3).reshape(n_layers * n_heads, n, head_dim)
    shuffled = labels[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    fitted = [_fit_logistic(features, target, weight_decay, steps) for target in (labels, shuffled)]
    (weights, bias), (shuffled_weights, shuffled_bias) = (
        (w.reshape(n_layers, n_heads, head_dim), b.reshape(n_layers, n_heads)) for w, b in fitted
    )
    return HeadProbes(mean, std, weights, bias, shuffled_weights, shuffled_bias)


def top_heads(accuracy: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` (layer index from 0, head) of highest ``accuracy`` ``(L, H)``; ties go to the earlier head."""
    order = torch.argsort(accuracy.flatten(), descending=True, stable=True)[:k]
    return [divmod(int(flat), accuracy.shape[1]) for flat in order]


def iti_heads(activations: torch.Tensor, labels: torch.Tensor, heads: Sequence[tuple[int, int]]) -> list[HeadDirection]:
    """Each chosen head with its mass-mean direction and std, from the rows given (train and validation).

    θ = mean(a | true) − mean(a | false), normalised; σ = std of a·θ over the same rows. ``heads`` are
    (layer index from 0, head) pairs, as :func:`top_heads` returns them.
    """
    directions = []
    for layer, head in heads:
        values = activations[:, layer, head].double()
        positive, negative = values[labels == 1], values[labels == 0]
        direction = functional.normalize(positive.mean(0) - negative.mean(0), dim=0)
        std = float((values @ direction).std())
        directions.append(HeadDirection(layer + 1, head, direction.float(), std))
    return directions


@dataclass(frozen=True)
class OptimisedVector:
    """A vector that steers greedy decoding towards a target, and how far it got."""

    vector: torch.Tensor
    steps: int
    recovered: list[int]
    exact: bool
    losses: list[float]


def start_token(tokenizer: Any, prefix: Sequence[int] = ()) -> int:
    """The token an optimised vector's decoding starts from: BOS, else EOS, preferring one unlike the prefix's last.

    A repeated document token right after the prefix is a second attention sink on SmolLM2 (its resid.10 norm
    equals position 0's), from which no target was recovered; ``<|im_start|>`` there is not.
    """
    candidates = [t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None]
    if not candidates:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start optimised vectors from")
    unlike = [t for t in candidates if not prefix or t != prefix[-1]]
    return int((unlike or candidates)[0])


def optimise_vector(
    loaded: LoadedModel,
    target: str,
    layer: int,
    steps: int = 300,
    learning_rate: float = 0.05,
    check_every: int = 1,
    prefix: Sequence[int] = (),
) -> OptimisedVector:
    """Subramani et al.: z added at ``resid.{layer}`` at every position from the start token on.

    The input is ``prefix`` (left unedited, e.g. SmolLM2's ``<|endoftext|>``, so that the attention sink is not
    the position that must predict the first target token) followed by the start token (:func:`start_token`).
    z starts at zero and maximises the teacher-forced log-likelihood of ``target`` after the start token
    with Adam. Greedy decoding reproduces the target exactly as soon as the teacher-forced argmax equals the
    target at every position (then each greedy step sees exactly the target prefix), which costs nothing to
    check on the logits of the step; optimisation stops there (checked every ``check_every`` steps). The
    returned ``recovered`` is a real greedy decoding with the final z.
    """
    start = start_token(loaded.tokenizer, prefix)
    target_ids = loaded.tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*prefix, start, *target_ids]], device=loaded.device)
    first = len(prefix)  # the start token's position, the first edited one
    vector = torch.zeros(loaded.d_model, device=loaded.device, requires_grad=True)
    optimiser = torch.optim.Adam([vector], lr=learning_rate)
    loaded.model.requires_grad_(False)
    losses: list[float] = []
    step = 0
    for step in range(1, steps + 1):
        addition = ResidualAddition(layer, vector, [1.0], positions="all", start=first)
        with addition.attach(loaded.parts):
            logits = loaded.model(input_ids=ids, use_cache=False).logits[0, first:-1]
        loss = functional.cross_entropy(logits.float(), ids[0, first + 1 :])
        losses.append(float(loss.detach()))
        if step % check_every == 0 and torch.equal(logits.argmax(-1), ids[0, first + 1 :]):
            break
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    recovered = greedy_from_start(loaded, vector.detach(), layer, len(target_ids), prefix)
    return OptimisedVector(vector.detach().cpu(), step, recovered, recovered == target_ids, losses)


@torch.no_grad()
def greedy_from_start(
    loaded: LoadedModel, vector: torch.Tensor, layer: int, length: int, prefix: Sequence[int] = ()
) -> list[int]:
    """Greedy decoding of ``length`` tokens after ``prefix`` and the start token, ``vector`` added from the start."""
    from latent_atlas.steering.generate import generate

    addition = ResidualAddition(layer, vector, [1.0], positions="all", start=len(prefix))
    return generate(loaded, [*prefix, start_token(loaded.tokenizer, prefix)], addition, 1, length)[0].tolist()


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def sentence_bleu(reference: Sequence[int], hypothesis: Sequence[int], max_n: int = 4) -> float:
    """BLEU (0-100) of one hypothesis against one reference (token ids), add-one smoothed for n > 1."""
    if not hypothesis:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        hyp, ref = _ngrams(hypothesis, n), _ngrams(reference, n)
        matches = sum(min(hyp.count(gram), ref.count(gram)) for gram in set(hyp))
        smoothing = 0 if n == 1 else 1
        precision = (matches + smoothing) / (len(hyp) + smoothing) if hyp or smoothing else 0.0
        if precision == 0:
            return 0.0
        log_precision += np.log(precision) / max_n
    brevity = min(1.0, np.exp(1 - len(reference) / len(hypothesis)))
    return float(100 * brevity * np.exp(log_precision))
