"""The readers' intervals: accuracies and paired differences over test items, ELM losses over passages.

Readers. Every method is scored on the same held-out texts, and methods with randomness (semantic clustering,
in-context learning, LoRA) on several seeds. The independent unit is the test item: an interval resamples
items with all their seeds together (a two-level design: items drawn, seeds averaged within each), so that
seeds never count as fresh evidence about the items. Accuracy here is the fraction of correct (item, seed)
predictions; on the balanced held-out splits of the shipped tasks it equals balanced accuracy. A comparison of
two readers is paired: each item's seed-averaged correctness under one minus under the other, resampled by
item.

ELM. One row per held-out passage and condition (its own embedding ``true``, another passage's ``shuffled``,
``none``): per-condition means resample passages; controls are paired on the passage (control − own).
"""

import polars as pl

from latent_atlas.stats import DEFAULT_REPLICATES, bootstrap_mean, paired_differences, summarise, summarise_paired

ITEM_UNIT = "test item"
PASSAGE_UNIT = "passage"
# The input each method's paper reads (Gu et al. build on in-context prompts and kNN prompting; Xu et al. read
# the answer position of the prompt; a linear probe has no paper of its own here).
PAPER_INPUT = {
    "clustering_all_bases": "template",
    "clustering_gt_only": "template",
    "semantic_bases": "template",
    "zero_shot": "template",
    "in_context": "template",
    "knn_prompting": "template",
    "linear_probe": "either",
    "lora": "template",
}
CLUSTERING_METHODS = ("clustering_gt_only", "clustering_all_bases")
GU_BASELINES = ("in_context", "knn_prompting")
ELM_LOSSES = ("reconstruction_nll", "register_nll")
ELM_CONDITIONS = ("true", "shuffled", "none")


def has_items(table: pl.DataFrame) -> bool:
    """Whether a comparison table keeps per-item correctness (tables written before it did not)."""
    return {"doc_id", "correct"} <= set(table.columns)


def item_rows(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (task, method, input, seed, test item): ``correct`` as 0/1.

    Raises:
        ValueError: if the table has no per-item columns (re-run compare_readers).
    """
    if not has_items(table):
        raise ValueError("the comparison table has no per-item correctness (doc_id, correct): re-run compare_readers")
    return (
        table.select("task", "method", "input", "seed", "doc_id", "correct")
        .explode("doc_id", "correct")
        .with_columns(pl.col("correct").cast(pl.Float64))
    )


def accuracy_intervals(table: pl.DataFrame, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> pl.DataFrame:
    """Per (task, method, input): accuracy over items × seeds, its 95 % item-bootstrap interval and the seeds.

    Columns: task, method, input, accuracy, ci_low, ci_high, n (test items), unit, seeds.
    """
    rows = item_rows(table)
    keys = ["task", "method", "input"]
    summary = summarise(rows, "correct", keys, "doc_id", unit=ITEM_UNIT, replicates=replicates, seed=seed)
    seeds = rows.group_by(keys).agg(pl.col("seed").n_unique().alias("seeds"))
    return summary.rename({"correct": "accuracy"}).join(seeds, on=keys, how="left")


def _item_means(rows: pl.DataFrame, method: str, read: str) -> pl.DataFrame:
    """Each item's correctness under one reader, averaged over its seeds."""
    part = rows.filter((pl.col("method") == method) & (pl.col("input") == read))
    means = part.group_by("doc_id", maintain_order=True).agg(pl.col("correct").mean())  # one order every run
    return means.with_columns(reader=pl.lit(f"{method}/{read}"))


def reader_difference(
    rows: pl.DataFrame,
    treated: tuple[str, str],
    baseline: tuple[str, str],
    *,
    replicates: int = DEFAULT_REPLICATES,
    seed: int = 0,
) -> dict[str, object]:
    """Paired accuracy difference ``treated − baseline`` (each a (method, input)) of one task's item rows."""
    both = pl.concat([_item_means(rows, *treated), _item_means(rows, *baseline)])
    names = (f"{treated[0]}/{treated[1]}", f"{baseline[0]}/{baseline[1]}")
    differences = paired_differences(both, "correct", "reader", names[0], names[1], ["doc_id"])
    interval = bootstrap_mean(
        differences["correct"].to_numpy(), differences["doc_id"].to_numpy(), unit=ITEM_UNIT,
        replicates=replicates, seed=seed,
    )  # fmt: skip
    return {"difference": interval.estimate, **interval.columns()}


def paper_comparisons(table: pl.DataFrame, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> pl.DataFrame:
    """Gu et al.'s comparisons per task: each semantic-clustering variant minus in-context learning and kNN prompting.

    Every reader reads its paper's input (:data:`PAPER_INPUT`); differences are paired on the test items.

    Columns: task, method, baseline, input (the clustering's), baseline_input, difference (accuracy), ci_low,
    ci_high, n, unit. Pairs whose reader is missing from the table are left out.
    """
    records = []
    for (task,), part in item_rows(table).group_by("task", maintain_order=True):
        present = set(part.select("method", "input").unique().iter_rows())
        for method in CLUSTERING_METHODS:
            for baseline in GU_BASELINES:
                treated, control = (method, PAPER_INPUT[method]), (baseline, PAPER_INPUT[baseline])
                if treated not in present or control not in present:
                    continue
                result = reader_difference(part, treated, control, replicates=replicates, seed=seed)
                records.append({"task": task, "method": method, "baseline": baseline, "input": treated[1],
                                "baseline_input": control[1], **result})  # fmt: skip
    schema = {"task": pl.String, "method": pl.String, "baseline": pl.String, "input": pl.String,
              "baseline_input": pl.String, "difference": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
              "n": pl.Int64, "unit": pl.String}  # fmt: skip
    return pl.DataFrame(records, schema=schema)


def _ordered(table: pl.DataFrame) -> pl.DataFrame:
    order = {condition: i for i, condition in enumerate(ELM_CONDITIONS)}
    return table.sort(pl.col("condition").replace_strict(order, default=len(order)))


def elm_intervals(
    evaluation: pl.DataFrame, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0
) -> dict[str, pl.DataFrame]:
    """Per condition: each held-out loss and the rate of the register named, with passage-bootstrap intervals.

    Keys: the two losses and ``register_correct`` (a rate), each a table of condition, value, ci_low, ci_high,
    n (passages), unit, in the order own, shuffled, none.
    """
    rows = evaluation.with_columns(pl.col("register_correct").cast(pl.Float64))
    return {
        column: _ordered(
            summarise(rows, column, ["condition"], "doc_id", unit=PASSAGE_UNIT, replicates=replicates, seed=seed)
        )
        for column in (*ELM_LOSSES, "register_correct")
        if column in rows.columns
    }


def elm_controls(evaluation: pl.DataFrame, *, replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> pl.DataFrame:
    """Paired held-out loss ``control − own`` per control (shuffled, none) and loss, resampling passages.

    Positive: the passage's own embedding gives the lower loss. Columns: condition (the control), measure,
    difference, ci_low, ci_high, n, unit.
    """
    tables = []
    for measure in ELM_LOSSES:
        if measure not in evaluation.columns:
            continue
        paired = summarise_paired(
            evaluation.select("doc_id", "condition", measure), measure, "condition", "true", [], "doc_id",
            ["doc_id"], unit=PASSAGE_UNIT, replicates=replicates, seed=seed,
        )  # fmt: skip
        tables.append(paired.rename({measure: "difference"}).with_columns(measure=pl.lit(measure)))
    if not tables:
        raise ValueError(f"the ELM evaluation has none of the losses {', '.join(ELM_LOSSES)}")
    return _ordered(pl.concat(tables)).select("condition", "measure", "difference", "ci_low", "ci_high", "n", "unit")
