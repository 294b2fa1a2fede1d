"""The claims' verdict rule, their gathering over areas, and how they are rendered (table, README, figure)."""

import math
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from latent_atlas import claims as claims_module
from latent_atlas.claims import AREAS, CLAIM_SCHEMA, Claim, gather, verdict
from latent_atlas.claims.report import END, START, claims_html, findings_markdown, findings_summary, replace_section
from latent_atlas.cli import main
from latent_atlas.config import load_yaml, validate_config
from latent_atlas.plots.claims import plot_claims
from latent_atlas.provenance import write_parquet_with_provenance

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("low", "high", "side", "expected"),
    [
        (0.2, 0.5, "above", "holds"),
        (-0.5, -0.1, "above", "fails"),
        (-0.1, 0.3, "above", "inconclusive"),
        (-0.5, 0.0, "above", "fails"),  # touching the threshold from below is not above it
        (-0.5, -0.1, "below", "holds"),
        (0.1, 0.4, "below", "fails"),
        (-0.1, 0.1, "below", "inconclusive"),
        (float("nan"), float("nan"), "above", "inconclusive"),
    ],
)
def test_verdict_is_decided_by_the_whole_interval(low: float, high: float, side: str, expected: str) -> None:
    assert verdict(low, high, 0.0, side) == expected


def test_verdict_refuses_a_bad_side_or_a_reversed_interval() -> None:
    with pytest.raises(ValueError, match="holds_when"):
        verdict(0.0, 1.0, 0.5, "greater")
    with pytest.raises(ValueError, match="exceeds"):
        verdict(1.0, 0.0, 0.5, "above")


def _claim(key: str, estimate: float, low: float, high: float, side: str = "above") -> Claim:
    return Claim(claim=key, paper="Doe et al. 2024", finding=f"finding {key}", statistic="Δ score", estimate=estimate,
                 ci_low=low, ci_high=high, n=12, unit="prompt", threshold=0.0, holds_when=side)  # fmt: skip


class _PlantedArea:
    """An area module reading one planted table and deciding one claim from its mean."""

    @staticmethod
    def inputs(config: dict, model: str, corpus: str) -> dict[str, str]:
        return {"scores": config["planted"]}

    @staticmethod
    def claims(tables: dict[str, pl.DataFrame], config: dict, model: str, corpus: str) -> list[Claim]:
        values = tables["scores"]["value"]
        return [_claim("planted", float(values.mean()), float(values.min()), float(values.max()))]


def test_a_claim_from_an_interval_row_takes_its_bounds_and_reads_missing_ones_as_nan() -> None:
    fields = {"claim": "c", "paper": "p", "finding": "f", "statistic": "s", "threshold": 0.0, "holds_when": "above"}
    row = {"value": 0.4, "ci_low": 0.1, "ci_high": 0.7, "n": 12, "unit": "document"}
    claim = Claim.from_row(row, **fields)
    assert (claim.estimate, claim.ci_low, claim.ci_high, claim.n, claim.unit) == (0.4, 0.1, 0.7, 12, "document")
    assert claim.verdict == "holds"
    missing = Claim.from_row({**row, "ci_low": None, "ci_high": None}, **fields)
    assert math.isnan(missing.ci_low) and math.isnan(missing.ci_high) and missing.verdict == "inconclusive"
    renamed = Claim.from_row({"rho": -0.5, "ci_low": -0.9, "ci_high": -0.2, "n": 5.0, "unit": "x"}, estimate="rho",
                             **{**fields, "unit": "register"})  # fmt: skip
    assert (renamed.estimate, renamed.n, renamed.unit, renamed.verdict) == (-0.5, 5, "register", "fails")


def test_gather_reads_each_area_s_tables_and_keeps_the_schema(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "scores.parquet"
    pl.DataFrame({"value": [0.1, 0.2, 0.4]}).write_parquet(path)
    monkeypatch.setattr(claims_module, "area", lambda name: _PlantedArea)
    config = {"planted": str(path)}
    paths = claims_module.inputs(config, "m", "c")
    assert paths == {f"{name}.scores": str(path) for name in AREAS}
    table = gather({"steering.scores": str(path)}, config, "m", "c")  # only the area whose table is given
    assert table.schema == pl.Schema(CLAIM_SCHEMA)
    row = table.row(0, named=True)
    assert table.height == 1 and row["area"] == "steering" and row["verdict"] == "holds"
    assert row["estimate"] == pytest.approx(0.7 / 3) and (row["model"], row["corpus"]) == ("m", "c")


def test_every_area_reads_results_tables_and_nothing_for_an_unconfigured_model() -> None:
    config = load_yaml(REPO / "config/config.yaml")
    validate_config(config, load_yaml(REPO / "workflow/schemas/config.schema.yaml"))
    for name in AREAS:
        module = claims_module.area(name)
        assert module.inputs(config, "no-such-model", "registers") == {}, name
        paths = module.inputs(config, "smollm2-135m", "registers")
        assert paths and all(path.startswith("results/") for path in paths.values()), name
    for section in ("lenses", "steering", "readers"):  # a null `models` means every model of run.models
        everyone = {**config, section: {**config[section], "models": None}}
        assert claims_module.area(section).inputs(everyone, "smollm2-135m", "registers"), section


def _table() -> pl.DataFrame:
    rows = [_claim("a", 0.3, 0.1, 0.5), _claim("b", -0.2, -0.4, -0.1), _claim("c", 0.0, -0.2, 0.2),
            _claim("d", 0.1, math.nan, math.nan)]  # fmt: skip
    return pl.DataFrame(
        [{"model": "m", "corpus": "c", "area": "steering", **row.__dict__} for row in rows], schema=CLAIM_SCHEMA
    )


def test_findings_markdown_has_one_line_per_claim_with_interval_and_verdict() -> None:
    text = findings_markdown(_table(), "results/claims/m.c.parquet")
    assert "**m on c** (1 holds, 1 fails, 2 inconclusive)" in text
    assert "| finding a (Doe et al. 2024) | Δ score; holds if > 0 | 0.3 [0.1, 0.5] | 12 prompt | holds |" in text
    assert "| 0 [-0.2, 0.2] |" in text and "0.1 [–, –]" in text and "**fails**" in text


def test_replace_section_rewrites_only_between_the_markers() -> None:
    text = f"intro\n{START}\nold\n{END}\nafter\n"
    assert replace_section(text, "new body\n") == f"intro\n{START}\nnew body\n{END}\nafter\n"
    with pytest.raises(ValueError, match="findings:start"):
        replace_section("no markers here", "x")


def test_findings_command_writes_the_summary_and_the_full_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table_path, readme, full = tmp_path / "m.c.parquet", tmp_path / "README.md", tmp_path / "docs" / "findings.md"
    _table().write_parquet(table_path)
    readme.write_text(f"# title\n{START}\n{END}\nend\n")
    assert main(["findings", str(table_path), "--write", str(readme), "--full", str(full), "--source", "study"]) == 0
    written = readme.read_text()
    assert written.startswith("# title\n") and written.endswith(f"{END}\nend\n")
    assert "1 holds, 1 fails, 2 inconclusive over 4 rows" in written and "(docs/findings.md)" in written
    assert (
        "| finding a (Doe et al. 2024) | holds |" in written
        and "| finding d (Doe et al. 2024) | *inconclusive* |" in written
    )
    assert full.read_text().startswith("# Findings\n\nGenerated from study") and "finding b" in full.read_text()
    write_parquet_with_provenance(_table(), table_path, {"code_version": "0.1.0+gabc", "config_hash": "f00"})
    assert main(["findings", str(table_path)]) == 0
    assert f"Generated from `{table_path}` (code 0.1.0+gabc, config f00)" in capsys.readouterr().out
    assert main(["findings", str(table_path), "--write", str(readme)]) == 2
    assert main(["findings", str(tmp_path / "absent.parquet")]) == 2
    assert "run the workflow first" in capsys.readouterr().err


def test_summary_counts_verdicts_over_a_claim_s_rows() -> None:
    rows = [_claim("a", 0.3, 0.1, 0.5), _claim("a", -0.2, -0.4, -0.1), _claim("a", 0.2, 0.1, 0.3)]
    table = pl.DataFrame([{"model": "m", "corpus": "c", "area": "x", **row.__dict__} for row in rows],
                         schema=CLAIM_SCHEMA)  # fmt: skip
    other = table.head(1).with_columns(corpus=pl.lit("d"))
    text = findings_summary(pl.concat([table, other]), "f.md")
    assert "| finding (paper) | m · c | m · d |" in text
    assert "| finding a (Doe et al. 2024) | 2 holds · 1 fails | holds |" in text


def test_html_page_and_figure_show_every_claim(tmp_path: Path) -> None:
    page = claims_html(_table(), "Claims: m on c")
    assert page.count("<tr style=") == 4 and "finding c" in page and "inconclusive" in page
    plot_claims(_table(), tmp_path / "c.pdf", tmp_path / "c.png", "m · c")
    plot_claims(_table().clear(), tmp_path / "e.pdf", tmp_path / "e.png", "m · c")
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("c.pdf", "c.png", "e.pdf", "e.png"))


def test_claims_inputs_import_no_torch_so_a_dry_run_stays_fast() -> None:
    code = (
        "import sys\nfrom latent_atlas.claims import AREAS, area\n"
        "[area(name) for name in AREAS]\nassert 'torch' not in sys.modules, 'an area module imports torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_readme_and_docs_findings_are_generated_from_the_study_claims(tmp_path: Path) -> None:
    tables = sorted(str(path.relative_to(REPO)) for path in (REPO / "docs/study/claims").glob("*.parquet"))
    if not tables:
        pytest.skip("no claims tables in docs/study/claims/ yet (make study, or make findings after a run, puts them)")
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    cwd = Path.cwd()
    try:
        os.chdir(REPO)
        assert main(["findings", *tables, "--write", str(readme), "--full", str(tmp_path / "docs/findings.md")]) == 0
    finally:
        os.chdir(cwd)
    stale = "stale: run `make findings`"
    assert readme.read_text() == (REPO / "README.md").read_text(), f"README's findings are {stale}"
    assert (tmp_path / "docs/findings.md").read_text() == (REPO / "docs/findings.md").read_text(), stale
