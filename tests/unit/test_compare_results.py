"""benchmarks/compare_results.py: two runs' tables, equal or not, and why."""

import importlib.util
import sys
from pathlib import Path

import polars as pl
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compare_results.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, tables: dict[str, pl.DataFrame]) -> Path:
    for name, table in tables.items():
        path = root / "results" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        table.write_parquet(path)
    return root


def run_main(compare, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["compare_results.py", *args])
    code = compare.main()
    return code, capsys.readouterr().out


BASE = pl.DataFrame({"layer": [0, 1], "value": [0.5, float("nan")], "label": ["a", "b"], "seconds": [1.0, 2.0]})


def test_equal_runs_pass_and_timings_are_reported_apart(compare, tmp_path, monkeypatch, capsys):
    old = write_run(tmp_path / "old", {"lenses/m.parquet": BASE})
    new = write_run(tmp_path / "new", {"lenses/m.parquet": BASE.with_columns(seconds=pl.Series([3.0, 2.0]))})
    code, out = run_main(compare, monkeypatch, capsys, str(old), str(new))
    assert code == 0
    assert "timings only results/lenses/m.parquet: seconds (max |a-b| = 2)" in out
    assert "1 of 1 tables equal" in out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (pl.col("value") + 1e-7, "value (max |a-b| = 1e-07)"),
        (pl.col("label").str.replace("b", "c"), "label (1 rows)"),
        (pl.col("layer") * 0, "layer (1 rows)"),
    ],
)
def test_a_changed_column_fails_and_is_named(compare, tmp_path, monkeypatch, capsys, change, expected):
    old = write_run(tmp_path / "old", {"t.parquet": BASE})
    new = write_run(tmp_path / "new", {"t.parquet": BASE.with_columns(change)})
    code, out = run_main(compare, monkeypatch, capsys, str(old), str(new))
    assert code == 1
    assert f"DIFFERS results/t.parquet: {expected}" in out


def test_a_tolerance_admits_small_float_changes_only(compare, tmp_path, monkeypatch, capsys):
    old = write_run(tmp_path / "old", {"t.parquet": BASE})
    new = write_run(tmp_path / "new", {"t.parquet": BASE.with_columns(pl.col("value") + 1e-7)})
    assert run_main(compare, monkeypatch, capsys, str(old), str(new), "--tolerance", "1e-6")[0] == 0
    assert run_main(compare, monkeypatch, capsys, str(old), str(new), "--tolerance", "1e-8")[0] == 1


def test_a_missing_table_or_a_new_nan_fails(compare, tmp_path, monkeypatch, capsys):
    old = write_run(tmp_path / "old", {"a.parquet": BASE, "b.parquet": BASE})
    nan_first = BASE.with_columns(value=pl.Series([float("nan"), float("nan")]))
    new = write_run(tmp_path / "new", {"a.parquet": nan_first})
    code, out = run_main(compare, monkeypatch, capsys, str(old), str(new))
    assert code == 1
    assert "MISSING results/b.parquet" in out
    assert "DIFFERS results/a.parquet: value (NaN in one run only)" in out


def test_a_directory_without_tables_is_refused(compare, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        run_main(compare, monkeypatch, capsys, str(tmp_path / "empty"), str(tmp_path))
    assert "holds no parquet tables" in capsys.readouterr().err
