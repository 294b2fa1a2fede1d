"""Language-model performance on a corpus split: perplexity and bits-per-byte, overall and per register.

Accounting. Each document is tokenised without special tokens and every one of its tokens is scored exactly
once, as a next-token prediction. So that the first text token has a conditional probability too, the model
sees one context token in front of the text (:func:`context_token`: the tokenizer's own leading special
token, e.g. Gemma's ``<bos>``, else ``bos_token``, else ``eos_token``); the context token itself is never
scored. A document's summed negative log-likelihood (nats) is then the code length of exactly its text, and
dividing by ``ln 2`` times the text's UTF-8 byte count gives bits-per-byte, which is comparable across
tokenizers (perplexity and bits-per-token are not). Aggregates sum nats, tokens and bytes over documents
first and take ratios last: corpus-level figures, not means of per-document ratios.

Uncertainty: the unit is the document (its tokens share a topic and a style). Perplexity and bits-per-byte
carry a 95 % percentile bootstrap over the documents of each row (``perplexity_ci_low`` ...,
``bits_per_byte_ci_low`` ..., ``n`` documents, ``unit``), each replicate again a ratio of sums; with fewer
than three documents the interval is NaN.

Documents longer than ``max_length - 1`` tokens are cut into consecutive non-overlapping windows of at most
``max_length - 1`` tokens, each prefixed by the context token. Later windows lose their left context, so
long documents score slightly pessimistically (higher NLL than a sliding window would give); every token is
still scored exactly once.
"""

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn
from torch.nn import functional

from latent_atlas.errors import ConfigError
from latent_atlas.models import LoadedModel
from latent_atlas.stats import DEFAULT_REPLICATES, Interval, bootstrap_mean

ALL = "all"
NO_LABEL = "(none)"
_PROBE = "a"


def context_token(tokenizer: Any) -> tuple[int, str]:
    """The token every scored sequence starts with, and a name for it for the provenance.

    The tokenizer's own leading special token if it adds one (detected by tokenising a probe text with and
    without special tokens), else its BOS token, else its EOS token.

    Raises:
        ValueError: if the tokenizer has neither a BOS nor an EOS token.
    """
    plain = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    special = tokenizer(_PROBE)["input_ids"]
    if len(special) > len(plain) and special[1 : 1 + len(plain)] == plain:
        return int(special[0]), f"tokenizer_prefix={tokenizer.convert_ids_to_tokens(int(special[0]))}"
    for kind in ("bos", "eos"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            return int(token_id), f"{kind}_token={tokenizer.convert_ids_to_tokens(int(token_id))}"
    raise ValueError(
        "the model's tokenizer has no BOS/EOS token to condition the first token on (and adds no leading "
        "special token itself); cannot score the first token of a document"
    )


def _windows(documents: Sequence[Sequence[int]], width: int) -> list[tuple[int, list[int]]]:
    """Consecutive non-overlapping windows of at most ``width`` tokens, as (document index, token ids)."""
    windows = []
    for index, ids in enumerate(documents):
        if not ids:
            raise ValueError(f"document {index} has no tokens (empty text?); it cannot be scored")
        windows.extend((index, list(ids[start : start + width])) for start in range(0, len(ids), width))
    return windows


def _batches(lengths: Sequence[int], vocab_size: int, max_logit_elements: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that rows × padded length × vocab ≤ the budget (≥ 1 row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] * vocab_size <= max_logit_elements:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _vocab_size(model: nn.Module) -> int:
    """Width of the model's logits."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def _sequence_nll(model: nn.Module, sequences: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Summed NLL (nats, float64, on the CPU) of tokens 1.. of each sequence given the ones before it.

    Sequences are right-padded into one batch; the model's own forward gives the logits (soft-capping and
    the like included), normalised with ``log_softmax`` in float32.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        ids[row, : len(sequence)] = torch.tensor(sequence)
    mask = torch.arange(ids.shape[1]) < lengths[:, None]
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask.long(), use_cache=False).logits[:, :-1]
    log_probs = functional.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    scored = torch.where(mask[:, 1:], log_probs, torch.zeros_like(log_probs))
    return -scored.double().sum(-1).cpu()


def score_documents(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int = 1024,
    max_logit_elements: int = 2**26,
) -> pl.DataFrame:
    """Score every token of every text once; one row per text: ``tokens``, ``bytes``, ``nll`` (nats).

    Args:
        model: a causal LM in eval mode.
        tokenizer: its tokenizer.
        texts: the documents.
        max_length: the longest sequence fed to the model, context token included (≥ 2).
        max_logit_elements: cap on batch tokens × vocabulary size per forward pass (logit memory).

    Raises:
        ValueError: for an empty document (naming its index), a tokenizer without BOS/EOS, or
            ``max_length < 2``.
    """
    if max_length < 2:
        raise ValueError(f"max_length is {max_length}; it must be at least 2 (context token + one text token)")
    context, _ = context_token(tokenizer)
    documents = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    windows = _windows(documents, max_length - 1)
    sequences = [[context, *ids] for _, ids in windows]
    nll = torch.zeros(len(texts), dtype=torch.float64)
    with torch.inference_mode():
        for batch in _batches([len(s) for s in sequences], _vocab_size(model), max_logit_elements):
            batch_nll = _sequence_nll(model, [sequences[i] for i in batch], context)
            nll.index_add_(0, torch.tensor([windows[i][0] for i in batch]), batch_nll)
    return pl.DataFrame(
        {
            "tokens": [len(ids) for ids in documents],
            "bytes": [len(text.encode("utf-8")) for text in texts],
            "nll": nll.tolist(),
        },
        schema={"tokens": pl.Int64, "bytes": pl.Int64, "nll": pl.Float64},
    )


def summarise_performance(scores: pl.DataFrame, labels: Sequence[str], seed: int = 0) -> pl.DataFrame:
    """Corpus-level performance for ``all`` documents and per register (label, sorted).

    Columns ``register, documents, tokens, bytes, nll, perplexity, bits_per_token, bits_per_byte``, with
    nats, tokens and bytes summed over documents before the ratios: perplexity = exp(nll / tokens),
    bits_per_token = nll / (ln 2 · tokens), bits_per_byte = nll / (ln 2 · bytes); then the document-bootstrap
    intervals of :func:`performance_intervals` (``n`` = documents).
    """
    if len(labels) != scores.height:
        raise ValueError(f"{len(labels)} labels for {scores.height} scored documents")
    if ALL in labels:
        raise ValueError(f"a register is named {ALL!r}, which is reserved for the row over all documents")
    totals = [
        pl.len().cast(pl.Int64).alias("documents"),
        pl.col("tokens").sum(),
        pl.col("bytes").sum(),
        pl.col("nll").sum(),
    ]
    frame = scores.select("tokens", "bytes", "nll").with_columns(pl.Series("register", list(labels), pl.String))
    overall = frame.select(pl.lit(ALL, pl.String).alias("register"), *totals)
    per_register = frame.group_by("register").agg(*totals).sort("register")
    summary = pl.concat([overall, per_register]).with_columns(
        perplexity=(pl.col("nll") / pl.col("tokens")).exp(),
        bits_per_token=pl.col("nll") / (math.log(2) * pl.col("tokens")),
        bits_per_byte=pl.col("nll") / (math.log(2) * pl.col("bytes")),
    )
    intervals = [
        performance_intervals(frame if register == ALL else frame.filter(pl.col("register") == register), seed)
        for register in summary["register"]
    ]
    return summary.with_columns(pl.DataFrame(intervals, schema=INTERVAL_SCHEMA))


INTERVAL_SCHEMA = {
    "perplexity_ci_low": pl.Float64,
    "perplexity_ci_high": pl.Float64,
    "bits_per_byte_ci_low": pl.Float64,
    "bits_per_byte_ci_high": pl.Float64,
    "n": pl.Int64,
    "unit": pl.String,
}


def performance_intervals(scores: pl.DataFrame, seed: int = 0, replicates: int = DEFAULT_REPLICATES) -> dict:
    """Document-bootstrap intervals of perplexity and bits-per-byte of scored documents (``nll, tokens, bytes``).

    A replicate's ratio of sums Σ nll / Σ tokens is the mean over the drawn documents' tokens of their mean
    NLL per token, so each document enters :func:`bootstrap_mean` as ``tokens`` copies of that mean (and as
    ``bytes`` copies of its NLL per byte); the exponential keeps a percentile interval's order.
    """
    ids = np.arange(scores.height)
    nll, tokens, size = (scores[name].to_numpy() for name in ("nll", "tokens", "bytes"))

    def ratio(denominator: np.ndarray) -> Interval:
        values = np.repeat(nll / np.maximum(denominator, 1), denominator)
        return bootstrap_mean(values, np.repeat(ids, denominator), unit="document", replicates=replicates, seed=seed)

    per_token, per_byte = ratio(tokens), ratio(size)
    return {
        "perplexity_ci_low": math.exp(per_token.low) if math.isfinite(per_token.low) else math.nan,
        "perplexity_ci_high": math.exp(per_token.high) if math.isfinite(per_token.high) else math.nan,
        "bits_per_byte_ci_low": per_byte.low / math.log(2),
        "bits_per_byte_ci_high": per_byte.high / math.log(2),
        "n": scores.height,
        "unit": "document",
    }


def evaluate_corpus(
    loaded: LoadedModel,
    corpus: pl.DataFrame,
    split: str | None,
    max_length: int,
    max_logit_elements: int = 2**26,
) -> pl.DataFrame:
    """Score a corpus split (``None``: every document) and summarise it overall and per register.

    Documents without a label count under the register ``(none)``. The table gains ``model`` (the
    manifest's name, when it has one) and ``split`` (``all`` for ``None``) columns in front.

    Raises:
        ValueError: if ``split`` is not among the corpus's splits, or nothing is left to score.
    """
    if split is not None:
        present = sorted(corpus["split"].unique().drop_nulls().to_list())
        if split not in present:
            raise ConfigError(
                f"split {split!r} is not in the corpus; it has {', '.join(present) or 'no splits'}: "
                "set evaluation.split to one of them"
            )
        corpus = corpus.filter(pl.col("split") == split)
    if corpus.height == 0:
        raise ValueError("the corpus has no documents to score")
    scores = score_documents(loaded.model, loaded.tokenizer, corpus["text"].to_list(), max_length, max_logit_elements)
    summary = summarise_performance(scores, corpus["label"].fill_null(NO_LABEL).to_list())
    front = [pl.lit(split or ALL, pl.String).alias("split")]
    if loaded.manifest.get("name") is not None:
        front.insert(0, pl.lit(str(loaded.manifest["name"]), pl.String).alias("model"))
    return summary.select(*front, pl.all())
