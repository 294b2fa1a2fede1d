"""The neighbourhood, lens-agreement and family figures carry their 95 % intervals: summarised, then drawn."""

import numpy as np
import polars as pl
import pytest
from matplotlib.collections import PolyCollection

from latent_atlas.neighbourhood.stability import stability_summary
from latent_atlas.stats import bootstrap_mean

FAMILIES = ("isotropic", "rogue")
RADII = (0.0, 0.1, 0.4)
DIRECTIONS = 8
MODEL_DIRECTIONS = 3


def _bands_of(axis) -> list[tuple[float, float]]:
    """(lowest, highest) y of each filled band on an axis."""
    found = []
    for collection in axis.collections:
        if isinstance(collection, PolyCollection) and collection.get_paths():
            y = np.concatenate([path.vertices[:, 1] for path in collection.get_paths()])
            y = y[np.isfinite(y)]
            found.append((float(y.min()), float(y.max())))
    return found


def _captured(monkeypatch, module) -> dict:
    drawn: dict = {}
    monkeypatch.setattr(module, "save_figure", lambda figure, *args: drawn.__setitem__("figure", figure))
    return drawn


# -- neighbourhood stability ---------------------------------------------------------------------------------


def _neighbourhood() -> pl.DataFrame:
    """A point's table: per (decoder, family, radius, direction) metrics, the model reading fewer directions."""
    rng = np.random.default_rng(3)
    rows = []
    for decoder, directions in (("logit", DIRECTIONS), ("model", MODEL_DIRECTIONS)):
        for family in FAMILIES:
            for radius in RADII:
                for sample in range(directions):
                    rows.append({
                        "kind": "sample", "layer": 9, "decoder": decoder, "family": family, "radius": radius,
                        "sample": sample, "top1_retained": float(radius == 0 or rng.random() < 0.6),
                        "jaccard_topk": 1.0 - radius * rng.random(), "kl_to_reference": radius * rng.random(),
                        "nn_distance": 0.3 + radius * rng.random(),
                    })  # fmt: skip
    data = [{"kind": "data", "layer": 9, "decoder": decoder, "family": "data", "radius": 0.5, "sample": k,
             "top1_retained": 0.0, "jaccard_topk": 0.0, "kl_to_reference": 1.0, "nn_distance": 0.35}
            for decoder in ("logit", "model") for k in range(4)]  # fmt: skip
    identity = {"model": "m", "corpus": "c", "point": "p", "seed": 0}
    return pl.DataFrame(rows + data).with_columns(**{key: pl.lit(value) for key, value in identity.items()})


def test_stability_summary_is_the_direction_bootstrap():
    table = _neighbourhood()
    summary = stability_summary(table)
    assert summary.height == 2 * len(FAMILIES) * len(RADII) * 4  # decoders x families x radii x metrics
    samples = table.filter(pl.col("kind") == "sample")
    for decoder, family, radius, metric in [
        ("logit", "rogue", 0.4, "top1_retained"),
        ("model", "isotropic", 0.1, "kl_to_reference"),
        ("logit", "isotropic", 0.1, "nn_distance"),
    ]:
        planted = samples.filter(pl.col("decoder") == decoder, pl.col("family") == family, pl.col("radius") == radius)
        expected = bootstrap_mean(planted[metric].to_numpy(), planted["sample"].to_numpy(), unit="direction")
        row = summary.filter(pl.col("decoder") == decoder, pl.col("family") == family, pl.col("radius") == radius,
                             pl.col("metric") == metric).row(0, named=True)  # fmt: skip
        assert row["value"] == pytest.approx(planted[metric].mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
        assert row["n"] == (DIRECTIONS if decoder == "logit" else MODEL_DIRECTIONS) and row["unit"] == "direction"
    at_centre = summary.filter(pl.col("radius") == 0.0, pl.col("metric") == "top1_retained")
    assert (at_centre["ci_low"] == 1.0).all() and (at_centre["ci_high"] == 1.0).all()


def test_stability_summary_refuses_a_direction_counted_twice():
    table = _neighbourhood()
    with pytest.raises(ValueError, match="several rows"):
        stability_summary(pl.concat([table, table.filter(pl.col("kind") == "sample").head(1)]))


def test_stability_figure_draws_each_familys_band(monkeypatch, tmp_path):
    import latent_atlas.plots.neighbourhood as plots

    drawn = _captured(monkeypatch, plots)
    table = _neighbourhood()
    plots.plot_stability(table, tmp_path / "s.pdf", tmp_path / "s.png", "p")
    summary = stability_summary(table)
    axis = next(axis for axis in drawn["figure"].axes if axis.get_ylabel() == "top-1 retained"
                and axis.get_title(loc="left").startswith("logit"))  # fmt: skip
    assert axis.get_title(loc="left") == f"logit (n = {DIRECTIONS} directions per family)"
    bands = _bands_of(axis)
    assert len(bands) == len(FAMILIES)
    for family in FAMILIES:
        rows = summary.filter(pl.col("decoder") == "logit", pl.col("family") == family,
                              pl.col("metric") == "top1_retained")  # fmt: skip
        assert (rows["ci_low"].min(), rows["ci_high"].max()) == pytest.approx(bands[FAMILIES.index(family)])
    assert "95 % bootstrap" in drawn["figure"]._suptitle.get_text()


# -- lens agreement ------------------------------------------------------------------------------------------


def _agreement_tokens() -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Per (lens, layer): each held-out token's agreement with the logit lens (0/1) and its document."""
    rng = np.random.default_rng(5)
    docs = np.repeat(np.arange(12), rng.integers(3, 9, 12))
    return {
        (lens, layer): (rng.random(len(docs)) < 0.3 + 0.15 * layer, docs)
        for lens in ("logit", "tuned", "semantic_basis")
        for layer in range(4)
    }


def test_lens_agreement_carries_the_document_bootstrap_and_draws_it(monkeypatch, tmp_path):
    import latent_atlas.plots.lenses as plots
    from latent_atlas.lenses.evaluate import DOCUMENT_SCHEMA, curves_from_documents

    tokens = _agreement_tokens()
    documents = pl.DataFrame(
        [{"lens": lens, "layer": layer, "metric": "agreement_with_logit", "doc": int(doc),
          "sum": float(agree[docs == doc].sum()), "count": int((docs == doc).sum())}
         for (lens, layer), (agree, docs) in tokens.items() for doc in np.unique(docs)],
        schema=DOCUMENT_SCHEMA,
    )  # fmt: skip
    curves = curves_from_documents(documents).with_columns(model=pl.lit("m"), corpus=pl.lit("c"), split=pl.lit("s"))
    for (lens, layer), (agree, docs) in tokens.items():
        expected = bootstrap_mean(agree.astype(float), docs, unit="document")
        row = curves.filter(pl.col("lens") == lens, pl.col("layer") == layer).row(0, named=True)
        assert row["value"] == pytest.approx(agree.mean())
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
        assert row["n"] == 12 and row["unit"] == "document"
    drawn = _captured(monkeypatch, plots)
    plots.plot_lens_agreement(curves, tmp_path / "a.pdf", tmp_path / "a.png", "m")
    (axis,) = drawn["figure"].axes
    bands = _bands_of(axis)
    assert len(bands) == 2  # tuned and semantic_basis; the logit lens agrees with itself and is not drawn
    for band, lens in zip(bands, ("tuned", "semantic_basis"), strict=True):
        rows = curves.filter(pl.col("lens") == lens)
        assert band == pytest.approx((rows["ci_low"].min(), rows["ci_high"].max()))
    assert "95 % bootstrap over 12 held-out documents" in drawn["figure"]._suptitle.get_text()


# -- family geometry and lenses ------------------------------------------------------------------------------

MEMBERS = ("fam-a", "fam-b")
PRETRAINED = "pre"
FAMILY_DOCUMENTS = 10


def _per_document(model: str, layer: int, metric: str) -> np.ndarray:
    """A planted per-document value of one (model, layer, metric): what a member's document bootstrap resamples."""
    seed = (*MEMBERS, PRETRAINED).index(model) * 100 + layer * 10 + sum(map(ord, metric))
    return np.random.default_rng(seed).normal(0.5 + 0.1 * layer, 0.2, FAMILY_DOCUMENTS)


def _interval(model: str, layer: int, metric: str):
    values = _per_document(model, layer, metric)
    return bootstrap_mean(values, np.arange(FAMILY_DOCUMENTS), unit="document")


def _member_geometry(model: str, depth: int, with_interval: bool) -> pl.DataFrame:
    from latent_atlas.geometry.measure import METRIC_SCHEMA

    rows = []
    for layer in range(depth + 1):
        for metric in ("mean_cosine", "effective_rank", "twonn"):
            fixed = {"layer": layer, "register": "all", "processing": "none", "metric": metric, "n": 256}
            row = {key: None for key in METRIC_SCHEMA} | fixed | {"massive_tokens": "removed"}
            interval = _interval(model, layer, metric)
            row["value"] = interval.estimate
            if with_interval and metric != "twonn":  # TwoNN has no interval
                row |= {"ci_low": interval.low, "ci_high": interval.high, "documents": interval.n, "unit": "document"}
            rows.append(row)
    table = pl.DataFrame(rows, schema=METRIC_SCHEMA)
    if not with_interval:  # a table from before the bootstrap: no interval columns at all
        table = table.drop("ci_low", "ci_high", "documents", "unit")
    return table.with_columns(model=pl.lit(model), corpus=pl.lit("c"))


def _member_lenses(model: str, depth: int) -> pl.DataFrame:
    rows = []
    for lens in ("logit", "tuned"):
        for layer in range(depth + 1):
            for metric in ("kl_to_final", "ce_next_token"):
                interval = _interval(model, layer, f"{lens}{metric}")
                rows.append({"model": model, "corpus": "c", "split": "heldout", "lens": lens,
                             "address": f"resid.{layer:02d}", "layer": layer, "metric": metric,
                             "value": interval.estimate, "n_tokens": 300} | interval.columns())  # fmt: skip
    return pl.DataFrame(rows)


def _gathered(tmp_path):
    """The family tables as scripts/summarise_family.py gathers them from each model's own tables."""
    from latent_atlas.provenance import read_tables
    from latent_atlas.training.evaluate import add_rank_fraction, lens_depths, tag_models

    depths = {"fam-a": 4, "fam-b": 4, PRETRAINED: 6}
    geometry_paths, lens_paths = [], []
    for model, depth in depths.items():
        geometry_paths.append(tmp_path / f"{model}.geometry.parquet")
        _member_geometry(model, depth, with_interval=model != PRETRAINED).write_parquet(geometry_paths[-1])
        lens_paths.append(tmp_path / f"{model}.lenses.parquet")
        _member_lenses(model, depth).write_parquet(lens_paths[-1])
    widths = dict.fromkeys(depths, 64)
    geometry = tag_models(add_rank_fraction(read_tables(geometry_paths), widths), list(MEMBERS))
    geometry = geometry.with_columns(relative_depth=pl.col("layer") / pl.col("model").replace_strict(depths))
    lenses = tag_models(lens_depths(read_tables(lens_paths), depths), list(MEMBERS))
    return geometry, lenses


def test_the_family_tables_keep_each_members_interval(tmp_path):
    geometry, lenses = _gathered(tmp_path)
    row = geometry.filter(pl.col("model") == "fam-b", pl.col("layer") == 3, pl.col("metric") == "mean_cosine").row(
        0, named=True
    )
    expected = _interval("fam-b", 3, "mean_cosine")
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((expected.low, expected.high))
    assert row["documents"] == FAMILY_DOCUMENTS and row["unit"] == "document"
    fraction = geometry.filter(pl.col("model") == "fam-a", pl.col("layer") == 2,
                               pl.col("metric") == "effective_rank_fraction").row(0, named=True)  # fmt: skip
    expected = _interval("fam-a", 2, "effective_rank")
    assert (fraction["ci_low"], fraction["ci_high"]) == pytest.approx((expected.low / 64, expected.high / 64))
    assert geometry.filter(pl.col("model") == PRETRAINED)["ci_low"].null_count() == 7 * 4  # no interval: kept null
    row = lenses.filter(pl.col("model") == PRETRAINED, pl.col("lens") == "tuned", pl.col("layer") == 5,
                        pl.col("metric") == "kl_to_final").row(0, named=True)  # fmt: skip
    expected = _interval(PRETRAINED, 5, "tunedkl_to_final")
    assert (row["ci_low"], row["ci_high"], row["n"]) == pytest.approx((expected.low, expected.high, FAMILY_DOCUMENTS))


def test_family_figures_draw_each_models_band(monkeypatch, tmp_path):
    import latent_atlas.plots.training as plots

    geometry, lenses = _gathered(tmp_path)
    drawn = _captured(monkeypatch, plots)
    plots.plot_family_geometry(geometry, tmp_path / "g.pdf", tmp_path / "g.png", "fam",
                               metrics=("mean_cosine", "twonn"))  # fmt: skip
    cosine, twonn = (axis for axis in drawn["figure"].axes if axis.get_visible() and axis.get_title())
    bands = _bands_of(cosine)
    assert len(bands) == len(MEMBERS)  # the pretrained table has no interval: its line alone
    for band, model in zip(bands, MEMBERS, strict=True):
        rows = geometry.filter(pl.col("model") == model, pl.col("metric") == "mean_cosine")
        assert band == pytest.approx((rows["ci_low"].min(), rows["ci_high"].max()))
    assert _bands_of(twonn) == []
    assert f"bands: 95 % bootstrap over {FAMILY_DOCUMENTS} documents" in drawn["figure"]._suptitle.get_text()

    plots.plot_family_lenses(lenses, tmp_path / "l.pdf", tmp_path / "l.png", "fam")
    axes = [axis for axis in drawn["figure"].axes if axis.get_visible() and axis.get_title()]
    kl_tuned = next(axis for axis in axes if axis.get_title() == "tuned lens" and "KL" in axis.get_ylabel())
    bands = _bands_of(kl_tuned)
    assert len(bands) == len(MEMBERS) + 1
    for band, model in zip(bands, (*MEMBERS, PRETRAINED), strict=True):
        rows = lenses.filter(pl.col("model") == model, pl.col("lens") == "tuned", pl.col("metric") == "kl_to_final")
        assert band == pytest.approx((rows["ci_low"].min(), rows["ci_high"].max()))
    assert f"bands: 95 % bootstrap over {FAMILY_DOCUMENTS} documents" in drawn["figure"]._suptitle.get_text()
