"""Baselines for semantic clustering (METHODS §4): zero-shot, kNN prompting, a linear probe, and ICL.

Zero-shot, kNN prompting and the linear probe read the same :class:`~latent_atlas.readers.clustering.LabelledSplit`
as the clustering module (post-final-norm states; of each raw text's last token, or of its templated query's
answer position, :func:`query_token_ids`), so they use the same split by construction. ICL runs the model on
prompts and needs the texts.

The head is taken to be linear, logits = r W_U^T (+ b): true of the project's models (Gemma 3 has no final
soft-capping); a model that soft-caps its logits would need it applied before the softmax of kNN prompting.
"""

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from latent_atlas.architectures import LogitTransform
from latent_atlas.readers.clustering import LabelledSplit, label_token_ids

# --------------------------------------------------------------------------------------------------
# Readings of cached states


def zero_shot_from_states(
    test_x: torch.Tensor,
    lm_head_weight: torch.Tensor,
    label_token_ids: Sequence[int],
    *,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's own next-token preference among the label words after the text, ``(n,)`` class indices.

    The model's post-head transform (scale, soft-cap) is monotone, so it cannot change the preference and is left out.

    Args:
        test_x: post-final-norm states ``(n, d)``: of the texts' last tokens, or of their templated queries'
            answer positions (then this is zero-shot prompting with the template).
        lm_head_weight: W_U, ``(V, d)``.
        label_token_ids: first token of each class's label word, in class order.
        bias: the head's bias ``(V,)``, if it has one.
    """
    ids = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=lm_head_weight.device)
    with torch.no_grad():
        logits = test_x.to(lm_head_weight) @ lm_head_weight[ids].T
        if bias is not None:
            logits = logits + bias[ids]
    return logits.argmax(dim=-1).cpu()


def knn_prompting(
    split: LabelledSplit,
    lm_head_weight: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    transform: LogitTransform | None = None,
    vocab_chunk: int = 8192,
) -> torch.Tensor:
    """The kNN prompting baseline (Xu et al. 2023): nearest training "anchors" by KL of next-token distributions.

    Each example's feature is its next-token distribution p = softmax(T(r W_U^T + b)) over the whole vocabulary,
    T the model's own post-head transform (``transform``: Gemma 2's soft-cap, Cohere's scale; none for most).
    The distance of a test example t to an anchor a is KL(p_a ‖ p_t) = Σ_v p_a(v) (log p_a(v) − log p_t(v)),
    the anchor first, as in the paper and its code (``utils/anchor.py`` of BenfengXu/KNNPrompting). The test
    example takes the majority class of its k nearest anchors; a tie goes to the tied class whose member is
    nearest. The paper reads the state at the template's answer position with demonstrations in front of
    every example; here the split's states are read with no demonstrations (the raw text's last token, or its
    templated query's answer position).

    The vocabulary is processed in chunks of ``vocab_chunk`` (memory ``(n_train + n_test) x vocab_chunk``
    plus the ``(n_test, n_train)`` distances), in float64, on ``lm_head_weight``'s device.

    Returns:
        Predicted classes of ``split.test_x``, ``(n_test,)``.
    """
    if not 1 <= k <= split.train_x.shape[0]:
        raise ValueError(f"k must lie in 1..{split.train_x.shape[0]} (the number of anchors), got {k}")
    distances = kl_to_anchors(
        split.train_x, split.test_x, lm_head_weight, bias=bias, transform=transform, vocab_chunk=vocab_chunk
    )
    order = distances.topk(k, dim=1, largest=False).indices  # (n_test, k), nearest first
    neighbour_classes = split.train_y[order.cpu()]
    votes = torch.zeros(len(order), split.n_classes, dtype=torch.long)
    votes.scatter_add_(1, neighbour_classes, torch.ones_like(neighbour_classes))
    winners = votes == votes.max(dim=1, keepdim=True).values
    first_winner = winners.gather(1, neighbour_classes).to(torch.int8).argmax(dim=1)  # first True = nearest
    return neighbour_classes.gather(1, first_winner[:, None])[:, 0]


def kl_to_anchors(
    anchor_x: torch.Tensor,
    test_x: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    transform: LogitTransform | None = None,
    vocab_chunk: int = 8192,
) -> torch.Tensor:
    """KL(p_anchor ‖ p_test) of next-token distributions, shape ``(n_test, n_anchor)``, float64.

    Written as Σ p_a log p_a − log p_t · p_a, accumulated over vocabulary chunks after a first pass that
    finds each example's log-normaliser. ``transform`` (elementwise, so chunk by chunk) is applied to the logits.
    """
    device = lm_head_weight.device
    anchors, tests = anchor_x.to(device, torch.float64), test_x.to(device, torch.float64)
    chunks = [
        (
            lm_head_weight[i : i + vocab_chunk].double(),
            None if bias is None else bias[i : i + vocab_chunk].double(),
            transform,
        )
        for i in range(0, lm_head_weight.shape[0], vocab_chunk)
    ]
    with torch.no_grad():
        anchor_norm, test_norm = (_log_normaliser(states, chunks) for states in (anchors, tests))
        neg_entropy = torch.zeros(len(anchors), dtype=torch.float64, device=device)
        cross = torch.zeros(len(tests), len(anchors), dtype=torch.float64, device=device)
        for chunk in chunks:
            log_p_anchor = _chunk_logits(anchors, *chunk) - anchor_norm[:, None]
            log_p_test = _chunk_logits(tests, *chunk) - test_norm[:, None]
            p_anchor = log_p_anchor.exp()
            neg_entropy += (p_anchor * log_p_anchor).sum(dim=1)
            cross += log_p_test @ p_anchor.T
    return neg_entropy[None, :] - cross


Chunk = tuple[torch.Tensor, torch.Tensor | None, LogitTransform | None]


def _chunk_logits(
    states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transform: LogitTransform | None
) -> torch.Tensor:
    logits = states @ weight.T
    logits = logits if bias is None else logits + bias
    return logits if transform is None else transform(logits)


def _log_normaliser(states: torch.Tensor, chunks: list[Chunk]) -> torch.Tensor:
    """The log-sum-exp over the whole vocabulary of each state's logits, one chunk at a time."""
    parts = [_chunk_logits(states, *chunk).logsumexp(dim=1) for chunk in chunks]
    return torch.stack(parts, dim=1).logsumexp(dim=1)


def linear_probe(split: LabelledSplit, weight_decay: float = 1e-2, max_iter: int = 100) -> torch.Tensor:
    """Multinomial logistic regression on train-standardised features; predicted classes of the test rows.

    Fitted by full-batch L-BFGS (strong-Wolfe line search) in float64 from zero weights (deterministic) on
    mean cross-entropy + ``weight_decay`` / 2 · ‖W‖² (bias unpenalised); features are standardised by the
    training rows' mean and standard deviation.
    """
    train, test = split.train_x.double(), split.test_x.double()
    mean, std = train.mean(dim=0), train.std(dim=0).clamp_min(1e-8)
    x, x_test = (train - mean) / std, (test - mean) / std
    weights = torch.zeros(split.d_model, split.n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(split.n_classes, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weights, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = functional.cross_entropy(x @ weights + bias, split.train_y) + weight_decay / 2 * weights.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return (x_test @ weights + bias).argmax(dim=1)


# --------------------------------------------------------------------------------------------------
# In-context learning


def choose_demonstrations(train_y: Any, shots_per_class: int, seed: int) -> list[int]:
    """Indices of ``shots_per_class`` training rows of every class present, in a seeded random order."""
    labels = np.asarray(train_y, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < shots_per_class:
            raise ValueError(f"class {label} has {len(rows)} training rows, fewer than {shots_per_class} shots")
        chosen.append(rng.choice(rows, size=shots_per_class, replace=False))
    order = rng.permutation(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
    return [int(i) for i in order]


def truncate_text(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens, decoded back to text (unchanged when short enough)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def render_example(template: str, text: str, label_word: str) -> str:
    """Fill ``{text}`` and ``{label}`` of ``template``; with ``label_word=""`` the query stops at ``{label}``.

    Substitution is literal (no ``str.format``), so braces in texts or templates are harmless.
    """
    if template.count("{text}") != 1 or template.count("{label}") != 1:
        raise ValueError(f"an ICL template needs exactly one {{text}} and one {{label}}, got {template!r}")
    head, tail = template.split("{label}")
    if "{text}" not in head:
        raise ValueError(f"{{text}} must come before {{label}} in the ICL template {template!r}")
    before, after = head.split("{text}")
    return before + text + after + (label_word + tail if label_word else "")


@torch.no_grad()
def icl_predict(
    model: nn.Module,
    tokenizer: Any,
    demonstrations: Sequence[tuple[str, int]],
    test_texts: Sequence[str],
    label_words: Sequence[str],
    template: str,
    separator: str = "\n\n",
    max_tokens: int = 256,
    batch_size: int = 8,
    task: str = "icl",
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-context learning: predict the label word whose first token the model finds most likely next.

    The prompt is the demonstrations, each rendered by ``template`` with its label word and followed by
    ``separator``, then the test text rendered up to ``{label}`` (:func:`icl_prompts`). Every text is first cut
    to its first ``max_tokens`` tokens and decoded back to text (:func:`truncate_text`). Each prompt is
    tokenised whole (with the tokenizer's special tokens, e.g. BOS), so every example sees exactly the tokens
    of its own prompt; the longest token prefix common to all prompts (the demonstrations, unless a BPE merge
    crosses into the query) is run ONCE and its KV cache, repeated along the batch, is reused for every test
    example. The rest of each prompt is batched with right padding and an attention mask; the logits are read
    at each example's last real token. No demonstrations is the prompted zero-shot reading of the template.

    Args:
        model: an HF causal LM (runs on its own device and dtype).
        tokenizer: its tokenizer.
        demonstrations: ``(text, class index)`` pairs, in prompt order.
        test_texts: the texts to classify.
        label_words: the label word of each class, in class order (e.g. `` story``).
        template: with ``{text}`` before ``{label}``, e.g. a text, a newline, ``Type:{label}``; anything after
            ``{label}`` ends demonstrations only.
        separator: between demonstrations, and between them and the query.
        max_tokens: per-text truncation.
        batch_size: test examples per forward pass.
        task: the task's config name, for label-word errors.

    Returns:
        Predicted classes ``(n,)`` and the label words' next-token logits ``(n, n_classes)`` (float32, CPU).
    """
    ids = label_token_ids(tokenizer, {str(c): word for c, word in enumerate(label_words)}, task)
    device = next(model.parameters()).device
    prompts = icl_prompts(tokenizer, demonstrations, test_texts, label_words, template, separator, max_tokens)
    if not prompts:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, len(ids))
    encoded = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    shared = _shared_prefix_length(encoded)
    prefix_cache = None
    if shared:
        prefix = torch.tensor([encoded[0][:shared]], device=device)
        prefix_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
    queries = [tokens[shared:] for tokens in encoded]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [
        _query_logits(model, queries[i : i + batch_size], prefix_cache, shared, pad, device)[:, ids]
        for i in range(0, len(queries), batch_size)
    ]
    logits = torch.cat(scores).float().cpu()
    return logits.argmax(dim=1), logits


def icl_prompts(
    tokenizer: Any,
    demonstrations: Sequence[tuple[str, int]],
    test_texts: Sequence[str],
    label_words: Sequence[str],
    template: str,
    separator: str,
    max_tokens: int,
) -> list[str]:
    """The ICL prompt of every test text: rendered demonstrations, ``separator``, the query up to ``{label}``."""
    rendered = [
        render_example(template, truncate_text(tokenizer, text, max_tokens), label_words[label])
        for text, label in demonstrations
    ]
    prefix = "".join(example + separator for example in rendered)
    return [prefix + render_example(template, truncate_text(tokenizer, text, max_tokens), "") for text in test_texts]


def query_token_ids(tokenizer: Any, texts: Sequence[str], template: str, max_tokens: int) -> list[list[int]]:
    """Token ids of each text's zero-shot query; its last token is the template's answer position.

    The text is cut to ``max_tokens`` tokens, rendered by ``template`` up to ``{label}`` and tokenised whole
    with the tokenizer's special tokens, exactly as :func:`icl_predict` encodes a prompt without demonstrations.
    """
    prompts = icl_prompts(tokenizer, [], texts, [], template, "", max_tokens)
    return [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]


def _shared_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest token prefix common to all sequences, leaving each at least one own token."""
    shared = min(len(tokens) for tokens in sequences) - 1
    for position in range(max(shared, 0)):
        if any(tokens[position] != sequences[0][position] for tokens in sequences):
            return position
    return max(shared, 0)


def _query_logits(
    model: nn.Module, queries: list[list[int]], prefix_cache: Any, prefix_len: int, pad: int, device: torch.device
) -> torch.Tensor:
    """Next-token logits ``(B, V)`` at each query's last token, the queries following a cached prefix."""
    lengths = torch.tensor([len(q) for q in queries], device=device)
    if int(lengths.min()) == 0:
        raise ValueError("an ICL query encodes to no tokens; the template must put text before {label}")
    width = int(lengths.max())
    input_ids = torch.tensor([q + [pad] * (width - len(q)) for q in queries], device=device)
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    cache = None
    if prefix_cache is not None:
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(queries))
        mask = torch.cat([torch.ones(len(queries), prefix_len, dtype=torch.long, device=device), mask], dim=1)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=(lengths - 1)[:, None],
    )
    return out.logits[:, 0]
