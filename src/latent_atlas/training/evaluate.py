"""Performance of a family's members (and of pretrained models) on each register's test split.

Every model is scored on the same documents: the test split of each studied register, at most
``max_documents_per_register`` of them (chosen by a stable hash of the document id, so the choice does not
depend on the model or the run). Bits per byte divide nats by the UTF-8 bytes of the raw text, so they
compare across tokenizers; perplexity is per token of each model's own tokenizer.

:func:`specialisation` checks the family's basic sanity property: a member trained on a register has a
lower perplexity on that register's test split than every member that never saw it.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence

import polars as pl

from latent_atlas.errors import ConfigError


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
