"""The geometry table's intervals: change_rows' bookkeeping on planted draws and states, and the bands drawn."""

from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from latent_atlas.geometry.measure import METRIC_SCHEMA, _pair_replicates, change_rows
from latent_atlas.geometry.metrics import document_draws, random_pairs
from latent_atlas.stats import percentile_interval

DOCUMENTS = 40


def _estimates(values: dict[tuple[int, str, str], float]) -> pl.DataFrame:
    rows = [{key: None for key in METRIC_SCHEMA} | {"layer": layer, "register": "all", "processing": processing,
            "metric": metric, "value": value} for (layer, processing, metric), value in values.items()]  # fmt: skip
    return pl.DataFrame(rows, schema=METRIC_SCHEMA)


def test_a_planted_constant_shift_gives_a_tight_change_interval_at_the_shift():
    base = np.random.default_rng(0).normal(0.3, 0.05, 500)  # a level whose replicates spread widely
    auc = np.random.default_rng(1).normal(0.6, 0.04, 500)
    replicates = {  # layer 12 first: the reference is the first *measured* layer (0), not the first stored key
        (12, "none", "mean_cosine"): base - 0.1,
        (0, "none", "mean_cosine"): base,
        (6, "none", "mean_cosine"): base + 0.2,
        (6, "none", "cosine_top3_share"): base,  # no change is defined for the share
        (6, "none", "passage_register_auc"): auc,
        (6, "whiten", "passage_register_auc"): auc + 0.05,
    }
    estimates = _estimates({key: float(np.mean(values)) for key, values in replicates.items()})
    rows = {(row["layer"], row["processing"], row["metric"]): row for row in change_rows(replicates, estimates, 0.95,
                                                                                           DOCUMENTS)}  # fmt: skip
    shifts = {(6, "none", "mean_cosine_change"): 0.2, (12, "none", "mean_cosine_change"): -0.1,
              (6, "whiten", "passage_register_auc_change"): 0.05}  # fmt: skip
    assert set(rows) == set(shifts)
    for key, shift in shifts.items():
        row = rows[key]
        assert row["value"] == pytest.approx(shift)
        assert row["ci_low"] == pytest.approx(shift) and row["ci_high"] == pytest.approx(shift)  # no spread left
        assert row["ci_low"] <= row["value"] + 1e-12 and row["ci_high"] >= row["value"] - 1e-12
        assert (row["n"], row["documents"], row["unit"], row["register"]) == (DOCUMENTS, DOCUMENTS, "document", "all")
    level = percentile_interval(0.3, base, n=DOCUMENTS, unit="document")
    assert level.high - level.low > 0.15  # each level alone is wide: the tightness comes from pairing


def _states(rng: np.random.Generator, d: int = 16, tokens: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Documents that differ a lot (each its own direction, of its own strength) around a shared mean."""
    groups = np.repeat(np.arange(DOCUMENTS), tokens)
    strength = rng.uniform(0.2, 3.0, DOCUMENTS)[groups, None]
    own = rng.normal(size=(DOCUMENTS, d))[groups]
    states = np.ones(d) + strength * own + 0.3 * rng.normal(size=(len(groups), d))
    return states, groups


def test_paired_document_draws_make_a_change_narrower_than_either_level():
    rng = np.random.default_rng(2)
    states, groups = _states(rng)
    later = states + 0.8 * np.ones(states.shape[1])  # a later "layer": every state moved along the shared mean
    selection = SimpleNamespace(passage_docs=np.arange(DOCUMENTS))
    pairs = random_pairs(groups, 4000, seed=3)

    def cosine(x: np.ndarray) -> float:
        u, v = x[pairs[:, 0]], x[pairs[:, 1]]
        return float(np.mean((u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))))

    # with every document drawn once, a replicate is the plain mean cosine of the pairs
    ones = np.ones((1, DOCUMENTS))
    assert _pair_replicates(states, pairs, groups, selection, ones, "none")["mean_cosine"][0] == pytest.approx(
        cosine(states)
    )
    draws = document_draws(DOCUMENTS, 1000, seed=0)
    first = _pair_replicates(states, pairs, groups, selection, draws, "none")["mean_cosine"]
    second = _pair_replicates(later, pairs, groups, selection, draws, "none")["mean_cosine"]
    replicates = {(0, "none", "mean_cosine"): first, (6, "none", "mean_cosine"): second}
    estimates = _estimates({(0, "none", "mean_cosine"): cosine(states), (6, "none", "mean_cosine"): cosine(later)})
    (row,) = change_rows(replicates, estimates, 0.95, DOCUMENTS)
    assert row["value"] == pytest.approx(cosine(later) - cosine(states))
    assert row["ci_low"] < row["value"] < row["ci_high"]
    change = row["ci_high"] - row["ci_low"]
    levels = [percentile_interval(0.0, values, n=DOCUMENTS, unit="document") for values in (first, second)]
    assert change < 0.5 * min(level.high - level.low for level in levels)
    # the same two levels resampled with independent draws: the difference's interval is far wider
    other = document_draws(DOCUMENTS, 1000, seed=1)
    unpaired = _pair_replicates(later, pairs, groups, selection, other, "none")["mean_cosine"] - first
    independent = percentile_interval(0.0, unpaired, n=DOCUMENTS, unit="document")
    assert change < 0.5 * (independent.high - independent.low)


def _figure_table() -> pl.DataFrame:
    rows = []
    for processing, offset in (("none", 0.0), ("standardise", -0.3)):
        for layer in (0, 6, 12):
            level = 0.4 + offset + 0.01 * layer
            rows.append({"layer": layer, "processing": processing, "metric": "mean_cosine", "value": level,
                         "ci_low": level - 0.02, "ci_high": level + 0.03})  # fmt: skip
            rows.append({"layer": layer, "processing": processing, "metric": "cosine_top3_share", "value": 0.5,
                         "ci_low": 0.45, "ci_high": 0.55})  # fmt: skip
            if layer:
                change = 0.01 * layer
                rows.append({"layer": layer, "processing": processing, "metric": "mean_cosine_change",
                             "value": change, "ci_low": change - 0.005, "ci_high": change + 0.005})  # fmt: skip
    return pl.DataFrame(
        [{key: None for key in METRIC_SCHEMA} | {"register": "all", "documents": 36, "unit": "document"} | row
         for row in rows], schema=METRIC_SCHEMA,
    )  # fmt: skip


def _bands_of(axis) -> list[tuple[float, float]]:
    """(lowest, highest) y of each filled band on an axis."""
    from matplotlib.collections import PolyCollection

    found = []
    for collection in axis.collections:
        if isinstance(collection, PolyCollection) and collection.get_paths():
            y = np.concatenate([path.vertices[:, 1] for path in collection.get_paths()])
            found.append((float(y.min()), float(y.max())))
    return found


def test_geometry_line_figures_draw_each_processings_band(monkeypatch, tmp_path):
    import latent_atlas.plots.geometry as plots

    drawn = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, *args: drawn.__setitem__("figure", figure))
    table = _figure_table()
    plots.plot_processing(table, tmp_path / "p.pdf", tmp_path / "p.png", "tiny")
    axes = {axis.get_title().split("\n")[0]: axis for axis in drawn["figure"].axes if axis.get_visible()}
    cosine = axes["mean cosine (random pairs)"]
    assert "percentile bootstrap over 36 documents" in cosine.get_title()
    # one band per processing, spanning its own rows' bounds (none: 0.38 at layer 0 to 0.55 at layer 12)
    assert sorted(_bands_of(cosine)) == [pytest.approx((0.08, 0.25)), pytest.approx((0.38, 0.55))]
    change = axes["mean cosine − first measured layer's"]
    assert sorted(_bands_of(change)) == [pytest.approx((0.055, 0.125))] * 2
    rogue = pl.DataFrame({"layer": [0, 6], "processing": ["none"] * 2, "kind": ["cosine"] * 2, "rank": [1, 1],
                          "dimension": [3, 3], "share": [0.4, 0.5]})  # fmt: skip
    plots.plot_rogue(rogue, tmp_path / "r.pdf", tmp_path / "r.png", "tiny", table)
    share = [axis for axis in drawn["figure"].axes if axis.get_title().startswith("top-3 dimensions' share")]
    assert len(share) == 1 and _bands_of(share[0]) == [pytest.approx((0.45, 0.55))] * 2
    plots.plot_rogue(rogue, tmp_path / "r.pdf", tmp_path / "r.png", "tiny")  # without the table: bars alone
    assert not [axis for axis in drawn["figure"].axes if axis.get_title().startswith("top-3")]
