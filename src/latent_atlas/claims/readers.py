"""Claims of the learned readers: Gu et al.'s semantic clustering and Tennenholtz et al.'s ELM.

Which table holds a reader's claims: each task (and the ELM's task) names its own corpus; its claims go into
the claims table of that corpus when it is one of ``run.corpora``, else into the first corpus's (the
sentiment task's corpus is read by the readers only), so every task's claims appear exactly once per model.
"""

import math
from collections.abc import Mapping
from typing import Any

import polars as pl

from latent_atlas.claims import Claim
from latent_atlas.config import analysis_models
from latent_atlas.readers.uncertainty import (
    CLUSTERING_METHODS,
    GU_BASELINES,
    ITEM_UNIT,
    PAPER_INPUT,
    elm_controls,
    has_items,
    paper_comparisons,
)

GU = "Gu et al., arXiv 2401.16184"
TENNENHOLTZ = "Tennenholtz et al., ICLR 2024"
CLUSTERING_KEY = "semantic_clustering_beats_baselines"
ELM_KEY = "elm_own_embedding_beats_controls"
CLUSTERING_PREFIX = "clustering_"
ELM_TABLE = "elm"
BASELINE_LABELS = {"in_context": "in-context learning", "knn_prompting": "kNN prompting"}
LOSS_LABELS = {"reconstruction_nll": "reconstruction", "register_nll": "register word"}


def home_corpus(config: Mapping[str, Any], corpus: str) -> str:
    """The claims table a table of ``corpus`` belongs to: its own when studied, else the first studied corpus."""
    studied = list(config["run"]["corpora"])
    return corpus if corpus in studied else studied[0]


def _tasks(config: Mapping[str, Any]) -> list[str]:
    """The tasks semantic clustering is compared on: readers.clustering.tasks, else every task."""
    readers = config["readers"]
    chosen = (readers.get("clustering") or {}).get("tasks")
    return list(readers.get("tasks") or {}) if chosen is None else list(chosen)


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """Each compared task's table and the ELM evaluation whose home corpus is ``corpus`` (none off readers.models)."""
    readers = config.get("readers") or {}
    if not readers.get("tasks") or model not in analysis_models(config, "readers"):
        return {}
    tasks = readers["tasks"]
    paths = {
        f"{CLUSTERING_PREFIX}{task}": f"results/readers/{model}/clustering/{task}.parquet"
        for task in _tasks(config)
        if home_corpus(config, tasks[task]["corpus"]) == corpus
    }
    elm = readers.get("elm") or {}
    if (
        elm.get("enabled", True)
        and elm.get("task") in tasks
        and home_corpus(config, tasks[elm["task"]]["corpus"]) == corpus
    ):
        paths[ELM_TABLE] = f"results/readers/{model}/elm/evaluation.parquet"
    return paths


def clustering_claims(table: pl.DataFrame, task: str, corpus: str) -> list[Claim]:
    """Gu et al.: each clustering variant beats in-context learning and kNN prompting, paired Δ accuracy > 0."""
    where = f"task {task} (corpus {corpus})"
    if has_items(table):
        rows = paper_comparisons(table).iter_rows(named=True)
        note = (
            f"{where}; accuracy over test items × seeds, each seed-averaged per item; each reader on its paper's input"
        )
        return [_clustering_claim(r["task"], r["method"], r["baseline"], r["difference"], r["ci_low"], r["ci_high"],
                                  r["n"], note) for r in rows]  # fmt: skip
    note = f"{where}; the table predates per-item correctness (re-run compare_readers): mean over seeds, no interval"
    claims = []
    for method in CLUSTERING_METHODS:
        for baseline in GU_BASELINES:
            means = [_mean_accuracy(table, name) for name in (method, baseline)]
            if not any(math.isnan(mean) for mean in means):
                nan = float("nan")
                claims.append(_clustering_claim(task, method, baseline, means[0] - means[1], nan, nan, 0, note))
    return claims


def _mean_accuracy(table: pl.DataFrame, method: str) -> float:
    """Mean accuracy over seeds of a method on its paper's input (NaN when absent)."""
    rows = table.filter((pl.col("method") == method) & (pl.col("input") == PAPER_INPUT[method]))
    return float(rows["accuracy"].mean()) if rows.height else float("nan")


def _clustering_claim(
    task: str, method: str, baseline: str, estimate: float, low: float, high: float, n: int, note: str
) -> Claim:
    variant = method.removeprefix("clustering_").replace("_", " ")
    return Claim(
        claim=CLUSTERING_KEY,
        paper=GU,
        finding="semantic clustering beats in-context learning and kNN prompting, each reader on its proper input",
        statistic=f"Δ accuracy (clustering, {variant}, − {BASELINE_LABELS[baseline]}), paired by test item",
        estimate=estimate,
        ci_low=low,
        ci_high=high,
        n=n,
        unit=ITEM_UNIT,
        threshold=0.0,
        holds_when="above",
        detail=f"{task} · {variant} − {BASELINE_LABELS[baseline]}",
        note=note,
    )


def elm_claims(evaluation: pl.DataFrame, task: str) -> list[Claim]:
    """Tennenholtz et al.: the own embedding's held-out loss is below each control's, paired Δ (control − own) > 0."""
    rows = elm_controls(evaluation).iter_rows(named=True)
    return [
        Claim.from_row(
            r,
            estimate="difference",
            claim=ELM_KEY,
            paper=TENNENHOLTZ,
            finding="the ELM's own embedding beats the shuffled and no-embedding controls",
            statistic=f"Δ held-out {LOSS_LABELS[r['measure']]} loss (control − own), nats/token, paired by passage",
            threshold=0.0,
            holds_when="above",
            detail=f"{r['condition']} · {LOSS_LABELS[r['measure']]}",
            note=f"held-out passages of task {task}; adapter trained with the model frozen (stage 1)",
        )
        for r in rows
    ]


def claims(tables: Mapping[str, pl.DataFrame], config: Mapping[str, Any], model: str, corpus: str) -> list[Claim]:
    """Every reader claim decidable from ``tables`` (keys as :func:`inputs` gives them)."""
    tasks = config["readers"]["tasks"]
    found: list[Claim] = []
    for key, table in tables.items():
        if key.startswith(CLUSTERING_PREFIX):
            task = key.removeprefix(CLUSTERING_PREFIX)
            found += clustering_claims(table, task, tasks[task]["corpus"])
    if ELM_TABLE in tables:
        found += elm_claims(tables[ELM_TABLE], config["readers"]["elm"]["task"])
    return found
