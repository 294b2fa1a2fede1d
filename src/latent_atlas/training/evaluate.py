"""Performance of a family's members (and of pretrained models) on each register's test split.

Every model is scored on the same documents: the test split of each studied register, at most
``max_documents_per_register`` of them (chosen by a stable hash of the document id, so the choice does not
depend on the model or the run). Bits per byte divide nats by the UTF-8 bytes of the raw text, so they
compare across tokenizers; perplexity is per token of each model's own tokenizer.

:func:`specialisation` checks the family's basic sanity property: a member trained on a register has a
lower perplexity on that register's test split than every member that never saw it.

Uncertainty. Every model is scored on the same documents, so the document is the resampling unit: each cell
of the matrix carries the document-bootstrap interval of :func:`latent_atlas.evaluation.summarise_performance`
(``bits_per_byte_ci_low``/``_ci_high``), and :func:`specialisation_intervals` gives the paired difference
"best other member − own member" on a register's documents, the best other chosen anew in every resample.
"""

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from latent_atlas.errors import ConfigError
from latent_atlas.stats import DEFAULT_REPLICATES, bootstrap_statistic

DOCUMENT_UNIT = "document"


def _rank(doc_id: str) -> str:
    """A stable pseudo-random key of a document id."""
    return hashlib.sha256(doc_id.encode()).hexdigest()


def scored_documents(corpus: pl.DataFrame, registers: Sequence[str], split: str, limit: int | None) -> pl.DataFrame:
    """The documents every model is scored on: ``split`` of each register, at most ``limit`` each.

    Raises:
        ConfigError: if a register has no document in ``split``.
    """
    chosen = []
    for register in registers:
        part = corpus.filter((pl.col("split") == split) & (pl.col("label") == register))
        if part.is_empty():
            raise ConfigError(
                f"register {register!r} has no {split!r} documents in the training corpus; "
                "check training.registers and the corpus's splits"
            )
        part = part.with_columns(_rank=pl.col("doc_id").map_elements(_rank, return_dtype=pl.String)).sort("_rank")
        chosen.append(part.head(limit).drop("_rank") if limit is not None else part.drop("_rank"))
    return pl.concat(chosen)


def performance_matrix(tables: Sequence[pl.DataFrame], mixtures: Mapping[str, Mapping[str, float]]) -> pl.DataFrame:
    """One table of every model's per-register performance, with ``kind`` and ``mixture`` (JSON) columns.

    ``mixtures`` maps each member to its weights; any other model is ``pretrained``.
    """
    if not tables:
        raise ValueError("no performance tables to combine")
    matrix = tag_models(pl.concat(tables, how="diagonal_relaxed"), list(mixtures))
    weights = {model: json.dumps(dict(mixture), sort_keys=True) for model, mixture in mixtures.items()}
    return matrix.with_columns(mixture=pl.col("model").replace_strict(weights, default=None, return_dtype=pl.String))


def specialisation(matrix: pl.DataFrame, mixtures: Mapping[str, Mapping[str, float]]) -> pl.DataFrame:
    """Per register: the member trained on it alone against the best member that never saw it.

    Columns: register, trained_member, trained_perplexity, unseen_member, unseen_perplexity, holds
    (``trained_perplexity < unseen_perplexity``). Registers without a single-register member or without a
    member that never saw them are left out.
    """
    members = matrix.filter(pl.col("kind") == "member")
    registers = sorted(set(members["register"].to_list()) - {"all"})
    rows = []
    for register in registers:
        scores = members.filter(pl.col("register") == register)
        trained = scores.filter(pl.col("model").is_in([m for m, w in mixtures.items() if set(w) == {register}]))
        unseen = scores.filter(pl.col("model").is_in([m for m, w in mixtures.items() if w.get(register, 0) == 0]))
        if trained.is_empty() or unseen.is_empty():
            continue
        trained_row = trained.sort("perplexity").row(-1, named=True)
        unseen_row = unseen.sort("perplexity").row(0, named=True)
        rows.append(
            {
                "register": register,
                "trained_member": trained_row["model"],
                "trained_perplexity": trained_row["perplexity"],
                "unseen_member": unseen_row["model"],
                "unseen_perplexity": unseen_row["perplexity"],
                "holds": trained_row["perplexity"] < unseen_row["perplexity"],
            }
        )
    schema = {
        "register": pl.String,
        "trained_member": pl.String,
        "trained_perplexity": pl.Float64,
        "unseen_member": pl.String,
        "unseen_perplexity": pl.Float64,
        "holds": pl.Boolean,
    }
    return pl.DataFrame(rows, schema=schema)


def tag_models(table: pl.DataFrame, members: Sequence[str]) -> pl.DataFrame:
    """Add ``kind`` (``member`` | ``pretrained``) from the model column."""
    return table.with_columns(
        kind=pl.when(pl.col("model").is_in(list(members))).then(pl.lit("member")).otherwise(pl.lit("pretrained"))
    )


def lens_depths(lenses: pl.DataFrame, n_layers: Mapping[str, int]) -> pl.DataFrame:
    """Add ``relative_depth`` = layer / number of blocks of each model (0 = embeddings, 1 = last block)."""
    missing = sorted(set(lenses["model"].unique().to_list()) - set(n_layers))
    if missing:
        raise ValueError(f"no layer count for models {missing}")
    return lenses.with_columns(
        relative_depth=pl.col("layer") / pl.col("model").replace_strict(dict(n_layers), return_dtype=pl.Float64)
    )


def add_rank_fraction(geometry: pl.DataFrame, d_model: Mapping[str, int]) -> pl.DataFrame:
    """Add ``effective_rank_fraction`` rows: effective rank / model width, comparable across widths."""
    ranks = geometry.filter(pl.col("metric") == "effective_rank")
    width = pl.col("model").replace_strict(dict(d_model), return_dtype=pl.Float64)
    scaled = [column for column in ("value", "ci_low", "ci_high") if column in ranks.columns]  # the interval too
    fraction = ranks.with_columns(metric=pl.lit("effective_rank_fraction"), **{c: pl.col(c) / width for c in scaled})
    return pl.concat([geometry, fraction])


# -- uncertainty -----------------------------------------------------------------------------------------------


def evaluate_documents(
    loaded: Any, documents: pl.DataFrame, split: str, max_length: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Score ``documents`` once: the per-register summary and one row per document.

    The summary is :func:`latent_atlas.evaluation.summarise_performance`'s (``split`` in front); the
    document rows are ``split, doc_id, register, tokens, bytes, nll, bits_per_byte``.
    """
    from latent_atlas.evaluation import score_documents, summarise_performance  # torch: not for the summaries

    scores = score_documents(loaded.model, loaded.tokenizer, documents["text"].to_list(), max_length)
    labels = documents["label"].to_list()
    summary = summarise_performance(scores, labels).select(pl.lit(split, pl.String).alias("split"), pl.all())
    rows = pl.concat(
        [documents.select(pl.lit(split, pl.String).alias("split"), "doc_id", pl.col("label").alias("register")),
         scores], how="horizontal",
    )  # fmt: skip
    return summary, rows.with_columns(bits_per_byte=pl.col("nll") / (math.log(2) * pl.col("bytes")))


def _bits_per_byte(rows: pl.DataFrame) -> float:
    """Bits per byte of a set of documents: summed nats over summed bytes (the matrix's ratio of sums)."""
    return float(rows["nll"].sum() / (math.log(2) * rows["bytes"].sum()))


def single_register_members(mixtures: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Register -> the member trained on it alone (registers without one are absent)."""
    return {next(iter(weights)): member for member, weights in mixtures.items() if len(weights) == 1}


def specialisation_intervals(
    documents: pl.DataFrame,
    mixtures: Mapping[str, Mapping[str, float]],
    *,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> pl.DataFrame:
    """Per register with a single-register member: bits per byte of the best other member − the own member.

    Paired on the register's test documents (every member scores the same ones): the statistic is
    min over the other members of (their bits per byte − the own member's), each a ratio of sums, so the best
    other member is chosen anew in every resample. Positive: the own member is best. Columns: register,
    own_member, own_bits_per_byte, best_other_member (at the estimate), delta_bits_per_byte, ci_low, ci_high,
    n (documents), unit.
    """
    members = documents.filter(pl.col("model").is_in(list(mixtures)))
    records = []
    for register, own in single_register_members(mixtures).items():
        rows = members.filter(pl.col("register") == register)
        others = [m for m in rows["model"].unique(maintain_order=True).to_list() if m != own]
        if own not in set(rows["model"]) or not others:
            continue
        wide = rows.pivot(on="model", index=["doc_id", "bytes"], values="nll")

        def gaps(table: pl.DataFrame, own: str = own, others: list[str] = others) -> np.ndarray:
            scale = math.log(2) * table["bytes"].sum()
            return np.array([(table[m].sum() - table[own].sum()) / scale for m in others])

        estimate = gaps(wide)
        interval = bootstrap_statistic(
            wide, lambda table, gaps=gaps: float(gaps(table).min()), "doc_id", unit=DOCUMENT_UNIT,
            replicates=replicates, seed=seed,
        )  # fmt: skip
        records.append({
            "register": register, "own_member": own, "own_bits_per_byte": _bits_per_byte(
                rows.filter(pl.col("model") == own)), "best_other_member": others[int(np.argmin(estimate))],
            "delta_bits_per_byte": interval.estimate, **interval.columns(),
        })  # fmt: skip
    schema = {"register": pl.String, "own_member": pl.String, "own_bits_per_byte": pl.Float64,
              "best_other_member": pl.String, "delta_bits_per_byte": pl.Float64, "ci_low": pl.Float64,
              "ci_high": pl.Float64, "n": pl.Int64, "unit": pl.String}  # fmt: skip
    return pl.DataFrame(records, schema=schema)
