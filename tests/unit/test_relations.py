"""Relations between geometry and performance (RQ3): depth bands, correlations, levels, benchmarks."""

import math

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from latent_atlas.geometry.relations import band_means, depth_band, pearson, read_benchmarks, relate, spearman

REGISTERS = ("code", "fiction", "news", "web")
DEPTHS = {"m0": 6, "m1": 9, "m2": 12, "m3": 4}  # models of different depth, compared at matching relative depth


# --------------------------------------------------------------------------------------------------
# depth bands


@pytest.mark.parametrize(
    "depth,band",
    [(0.0, "early"), (0.2, "early"), (1 / 3, "early"), (2 / 6, "early"), (0.34, "middle"), (0.5, "middle"),
     (2 / 3, "middle"), (0.67, "late"), (0.9, "late"), (1.0, "late")],
)  # fmt: skip
def test_depth_band_boundaries(depth, band):
    assert depth_band(depth) == band


@pytest.mark.parametrize("depth", [1.0000001, 1.5, 3.0, math.nan])
def test_depth_band_refuses_depths_above_one(depth):
    with pytest.raises(ValueError, match="outside"):
        depth_band(depth)


@pytest.mark.parametrize("depth", [-0.1, -5.0])
def test_depth_band_refuses_negative_depths(depth):
    with pytest.raises(ValueError, match="outside"):
        depth_band(depth)


def test_band_means_average_the_layers_of_each_band():
    layers = range(7)  # L = 6: early 0,1,2 | middle 3,4 | late 5,6
    table = pl.DataFrame(
        {
            "model": "m",
            "register": "all",
            "processing": "none",
            "metric": "x",
            "layer": list(layers),
            "relative_depth": [layer / 6 for layer in layers],
            "value": [float(10**layer) for layer in layers],
        }
    )
    means = {row["band"]: (row["value"], row["layers"]) for row in band_means(table).iter_rows(named=True)}
    assert means == {"early": (111 / 3, 3), "middle": (11000 / 2, 2), "late": (1100000 / 2, 2)}


# --------------------------------------------------------------------------------------------------
# correlations


def _average_ranks(values) -> np.ndarray:
    """Brute force: 1 + (number below) + (ties - 1) / 2."""
    values = np.asarray(values, dtype=float)
    return np.array([1 + np.sum(values < v) + (np.sum(values == v) - 1) / 2 for v in values])


def _hand_pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum()))


def test_pearson_and_spearman_equal_hand_computations():
    rng = np.random.default_rng(0)
    x = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 4.0, 2.0])  # ties, averaged
    y = rng.normal(size=len(x))
    y[3] = y[5]  # a tie in y as well
    assert pearson(x, y) == pytest.approx(_hand_pearson(x, y), abs=1e-12)
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
    expected = np.corrcoef(_average_ranks(x), _average_ranks(y))[0, 1]
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman(x, y) == pytest.approx(_hand_pearson(_average_ranks(x), _average_ranks(y)), abs=1e-12)
    # ties are averaged, not broken by position (which would give another ρ here)
    ordinal = np.argsort(np.argsort(x, kind="stable")) + 1.0
    assert spearman(x, y) != pytest.approx(_hand_pearson(ordinal, _average_ranks(y)), abs=1e-6)
    # ranks only: a monotone transform changes r but not ρ
    assert spearman(np.exp(x), y**3) == pytest.approx(spearman(x, y), abs=1e-12)
    assert pearson(np.exp(x), y) != pytest.approx(pearson(x, y), abs=1e-3)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)


@pytest.mark.parametrize("function", [pearson, spearman])
def test_correlations_are_nan_below_three_points_or_for_constant_input(function):
    assert math.isnan(function(np.array([]), np.array([])))
    assert math.isnan(function([1.0], [2.0]))
    assert math.isnan(function([1.0, 2.0], [2.0, 1.0]))
    assert math.isnan(function([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))
    assert math.isnan(function([1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]))
    assert not math.isnan(function([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]))


# --------------------------------------------------------------------------------------------------
# relate on synthetic pipeline tables


def _bits_per_byte(model: str, register: str) -> float:
    """Distinct, model- and register-dependent bits per byte; ``all`` is their mean."""
    if register == "all":
        return float(np.mean([_bits_per_byte(model, r) for r in REGISTERS]))
    return (
        0.7
        + 0.11 * int(model[1:])
        + 0.031 * REGISTERS.index(register)
        + 0.007 * int(model[1:]) ** 2 * (REGISTERS.index(register) % 2)
    )


def _tables(models, seed: int = 0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Geometry and performance tables with the pipeline's columns (and some extra ones it ignores).

    Metric ``tracks_bpb`` is 3·bpb plus a small depth trend (monotone in bits-per-byte in every band);
    ``noise`` is random.
    """
    rng = np.random.default_rng(seed)
    registers = ("all", *REGISTERS)
    performance = pl.DataFrame(
        [
            {
                "model": m,
                "register": r,
                "documents": 10,
                "bits_per_token": 3 * _bits_per_byte(m, r),
                "bits_per_byte": _bits_per_byte(m, r),
                "perplexity": 2 ** (3 * _bits_per_byte(m, r)),
                "corpus": "c",
            }
            for m in models
            for r in registers
        ]
    )
    rows = []
    for m in models:
        depth = DEPTHS[m]
        for r in registers:
            for processing in ("none", "whiten"):
                for layer in range(depth + 1):
                    relative = layer / depth
                    base = {"model": m, "register": r, "processing": processing, "layer": layer}
                    base |= {"relative_depth": relative, "n": 100, "corpus": "c"}
                    rows.append({**base, "metric": "tracks_bpb", "value": 3 * _bits_per_byte(m, r) + 0.01 * relative})
                    rows.append({**base, "metric": "noise", "value": float(rng.normal())})
    return pl.DataFrame(rows), performance


def test_relate_levels_points_and_model_counts():
    models = ["m0", "m1"]
    geometry, performance = _tables(models)
    table = relate(geometry, performance)
    keys = table.select("processing", "metric", "band", "measure").unique()
    assert keys.height == 2 * 2 * 3 * 2  # processing × metric × band × measure
    assert set(table["level"]) == {"registers", "registers within m0", "registers within m1", "models"}

    pooled = table.filter(pl.col("level") == "registers")
    assert pooled.height == keys.height
    assert set(pooled["model"]) == {"all"}
    assert (pooled["n"] == len(models) * len(REGISTERS)).all()
    assert (pooled["n_models"] == len(models)).all()

    for m in models:
        within = table.filter(pl.col("level") == f"registers within {m}")
        assert within.height == keys.height
        assert set(within["model"]) == {m}
        assert (within["n"] == len(REGISTERS)).all()
        assert (within["n_models"] == 1).all()

    # two models: two points at the models level, so no correlation rather than ±1
    top = table.filter(pl.col("level") == "models")
    assert top.height == keys.height
    assert (top["n"] == 2).all()
    assert top["spearman"].is_nan().all()
    assert top["pearson"].is_nan().all()


def test_relate_intervals_do_not_depend_on_the_order_of_the_input_rows():
    """The bootstrap draws index points: the same points in another row order must give the same interval."""
    geometry, performance = _tables(["m0", "m1", "m2"])
    table = relate(geometry, performance)
    shuffled = relate(geometry.sample(fraction=1.0, shuffle=True, seed=7), performance.reverse())
    assert_frame_equal(table, shuffled, check_exact=False, rel_tol=1e-12, abs_tol=1e-12)  # float sums: rounding only
    assert table["ci_low"].is_not_nan().sum() > 0


def _expected_band_mean(geometry: pl.DataFrame, model: str, register: str, metric: str, band: str) -> float:
    """Band mean by hand: early ≤ 1/3 < middle ≤ 2/3 < late."""
    rows = geometry.filter(
        (pl.col("model") == model)
        & (pl.col("register") == register)
        & (pl.col("metric") == metric)
        & (pl.col("processing") == "none")
    )
    depth = rows["relative_depth"].to_numpy()
    index = np.where(depth <= 1 / 3, 0, np.where(depth <= 2 / 3, 1, 2))
    return float(rows["value"].to_numpy()[index == ("early", "middle", "late").index(band)].mean())


def test_relate_correlates_the_right_points():
    models = ["m0", "m1", "m2"]
    geometry, performance = _tables(models)
    table = relate(geometry, performance)

    def row(level: str, metric: str, band: str, measure: str) -> dict:
        found = table.filter(
            (pl.col("level") == level)
            & (pl.col("processing") == "none")
            & (pl.col("metric") == metric)
            & (pl.col("band") == band)
            & (pl.col("measure") == measure)
        )
        assert found.height == 1
        return found.row(0, named=True)

    # a metric monotone in bits-per-byte (hence in perplexity too): ρ = 1 at every level
    for level in ("registers", "registers within m1", "models"):
        for band in ("early", "middle", "late"):
            assert row(level, "tracks_bpb", band, "bits_per_byte")["spearman"] == pytest.approx(1.0)
            assert row(level, "tracks_bpb", band, "perplexity")["spearman"] == pytest.approx(1.0)
    # three models: the models level now has a value
    top = row("models", "noise", "middle", "bits_per_byte")
    assert top["n"] == 3 and top["n_models"] == 3
    assert not math.isnan(top["spearman"])

    # the random metric: relate's numbers are those of the hand-made (model, register) points
    for band in ("early", "middle", "late"):
        x = [_expected_band_mean(geometry, m, r, "noise", band) for m in models for r in REGISTERS]
        y = [_bits_per_byte(m, r) for m in models for r in REGISTERS]
        got = row("registers", "noise", band, "bits_per_byte")
        assert got["pearson"] == pytest.approx(_hand_pearson(x, y), abs=1e-12)
        assert got["spearman"] == pytest.approx(_hand_pearson(_average_ranks(x), _average_ranks(y)), abs=1e-12)
        xs = [_expected_band_mean(geometry, "m2", r, "noise", band) for r in REGISTERS]
        within = row("registers within m2", "noise", band, "perplexity")
        assert within["pearson"] == pytest.approx(
            _hand_pearson(xs, [2 ** (3 * _bits_per_byte("m2", r)) for r in REGISTERS])
        )
        xa = [_expected_band_mean(geometry, m, "all", "noise", band) for m in models]
        top = row("models", "noise", band, "bits_per_byte")
        assert top["pearson"] == pytest.approx(_hand_pearson(xa, [_bits_per_byte(m, "all") for m in models]))


def test_relate_counts_only_finite_points():
    geometry, performance = _tables(["m0", "m1", "m2"])
    broken = (pl.col("model") == "m1") & (pl.col("register") == "news") & (pl.col("metric") == "noise")
    geometry = geometry.with_columns(value=pl.when(broken).then(float("nan")).otherwise(pl.col("value")))
    table = relate(geometry, performance)
    noise = table.filter((pl.col("metric") == "noise") & (pl.col("level") == "registers"))
    assert (noise["n"] == 3 * len(REGISTERS) - 1).all()
    assert noise["pearson"].is_finite().all()
    within = table.filter((pl.col("metric") == "noise") & (pl.col("level") == "registers within m1"))
    assert (within["n"] == len(REGISTERS) - 1).all()
    tracks = table.filter((pl.col("metric") == "tracks_bpb") & (pl.col("level") == "registers"))
    assert (tracks["n"] == 3 * len(REGISTERS)).all()


def test_benchmarks_are_model_level_measures(tmp_path):
    models = ["m0", "m1", "m2"]
    geometry, performance = _tables(models)
    path = tmp_path / "benchmarks.csv"
    lines = ["model,benchmark,score"]
    for m in models:
        lines += [f"{m},hellaswag,{1 - _bits_per_byte(m, 'all'):.6f}", f"{m},arc,{int(m[1:]) % 2}"]
    lines.append("m3,hellaswag,0.99")  # a model outside the run: dropped
    path.write_text("\n".join(lines) + "\n")

    benchmarks = read_benchmarks(str(path), models)
    assert benchmarks is not None
    assert sorted(benchmarks["model"].unique()) == models
    assert benchmarks.height == 2 * len(models)

    table = relate(geometry, performance, benchmarks)
    top = table.filter(pl.col("level") == "models")
    assert set(top["measure"]) == {"bits_per_byte", "perplexity", "hellaswag", "arc"}
    for level in ("registers", "registers within m0", "registers within m1", "registers within m2"):
        assert set(table.filter(pl.col("level") == level)["measure"]) == {"bits_per_byte", "perplexity"}
    hellaswag = top.filter((pl.col("measure") == "hellaswag") & (pl.col("metric") == "tracks_bpb"))
    assert hellaswag.height == 2 * 3  # processing × band
    assert (hellaswag["n"] == 3).all() and (hellaswag["n_models"] == 3).all()
    assert np.allclose(hellaswag["spearman"].to_numpy(), -1.0)  # the score falls as bits-per-byte rises
    # without benchmarks the table is the same but for those rows
    plain = relate(geometry, performance)
    assert plain.height == table.height - 2 * 2 * 3 * 2  # benchmarks × processing × metric × band
    assert read_benchmarks(None, models) is None
    assert read_benchmarks("", models) is None


@pytest.mark.parametrize(
    "header,missing",
    [("model,benchmark,value", "['score']"), ("name,task,score", "['benchmark', 'model']")],
)
def test_read_benchmarks_names_missing_columns(tmp_path, header, missing):
    path = tmp_path / "benchmarks.csv"
    path.write_text(f"{header}\nm0,hellaswag,0.5\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) " + missing.replace("[", r"\[").replace("]", r"\]")):
        read_benchmarks(str(path), ["m0"])
