"""Claims as text: the findings section of the README and docs, and the report's HTML table.

The README quotes the claims table; it is never hand-copied. ``findings_markdown`` renders claims tables
(``results/claims/*.parquet``, possibly of several models and corpora) as Markdown, and ``replace_section``
puts it between the README's ``<!-- findings:start -->`` / ``<!-- findings:end -->`` markers
(``latent-atlas findings`` does both).
"""

import html
import math
import re

import polars as pl

START, END = "<!-- findings:start -->", "<!-- findings:end -->"
VERDICT_MARK = {"holds": "holds", "fails": "**fails**", "inconclusive": "*inconclusive*"}


def _number(value: float) -> str:
    """A number with three significant digits (scientific beyond 1e±4); '–' for NaN."""
    if value is None or not math.isfinite(value):
        return "–"
    if value != 0 and not 1e-3 <= abs(value) < 1e4:
        return f"{value:.2e}"
    return f"{value:.3g}"


def table_source(path: str) -> str:
    """``path (code <version>, config <hash>)`` from a claims table's provenance metadata (just ``path`` without)."""
    import json

    import pyarrow.parquet as pq

    raw = (pq.read_metadata(path).metadata or {}).get(b"latent_atlas")
    if not raw:
        return f"`{path}`"
    meta = json.loads(raw)
    return f"`{path}` (code {meta.get('code_version', '?')}, config {meta.get('config_hash', '?')})"


def interval_text(row: dict) -> str:
    """``estimate [low, high]`` (or the exact value when the statistic has no sampling)."""
    if row["unit"] == "exact":
        return f"{_number(row['estimate'])} (exact)"
    return f"{_number(row['estimate'])} [{_number(row['ci_low'])}, {_number(row['ci_high'])}]"


def verdict_counts(table: pl.DataFrame) -> str:
    """``k holds, k fails, k inconclusive`` over a claims table."""
    counts = dict(table.group_by("verdict").len().iter_rows())
    return ", ".join(f"{counts.get(name, 0)} {name}" for name in VERDICT_MARK)


def findings_markdown(table: pl.DataFrame, source: str) -> str:
    """Markdown: per model × corpus, one line per claim row with its statistic, interval, n and verdict."""
    lines = [f"Generated from {source} by `latent-atlas findings`; 95 % bootstrap intervals over the named unit."]
    for (model, corpus), rows in table.group_by(["model", "corpus"], maintain_order=True):
        lines += ["", f"**{model} on {corpus}** ({verdict_counts(rows)})", ""]
        lines += ["| finding (paper) | statistic | estimate [95 % CI] | n | verdict |", "|---|---|---|---|---|"]
        for row in rows.iter_rows(named=True):
            finding = f"{row['finding']} ({row['paper']})" + (f" — {row['detail']}" if row["detail"] else "")
            side = ">" if row["holds_when"] == "above" else "<"
            statistic = f"{row['statistic']}; holds if {side} {_number(row['threshold'])}"
            n = f"{row['n']} {row['unit']}" if row["unit"] != "exact" else "–"
            cells = [finding, statistic, interval_text(row), n, VERDICT_MARK.get(row["verdict"], row["verdict"])]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _verdict_cell(rows: pl.DataFrame) -> str:
    """One cell of the summary: the verdict when every row agrees, else the count of each."""
    counts = dict(rows.group_by("verdict").len().iter_rows())
    if len(counts) == 1:
        verdict, count = next(iter(counts.items()))
        return VERDICT_MARK.get(verdict, verdict) + (f" ({count}/{count})" if count > 1 else "")
    return " · ".join(f"{counts[name]} {name}" for name in VERDICT_MARK if name in counts)


def findings_summary(table: pl.DataFrame, full: str) -> str:
    """Markdown: one line per claim and one column per model × corpus, pointing to the full table ``full``.

    A cell is the claim's verdict there, or the count of each verdict over the claim's rows (layers, methods,
    registers) when they differ; '–' where the claim is not decided for that model and corpus.
    """
    columns = table.select("model", "corpus").unique(maintain_order=True).rows()
    header = ["finding (paper)", *(f"{model} · {corpus}" for model, corpus in columns)]
    lines = [
        f"{verdict_counts(table)} over {table.height} rows; every statistic, interval and `n` is in [{full}]({full}).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for _, rows in table.group_by(["claim"], maintain_order=True):
        first = rows.row(0, named=True)
        cells = [f"{first['finding']} ({first['paper']})"]
        for model, corpus in columns:
            mine = rows.filter((pl.col("model") == model) & (pl.col("corpus") == corpus))
            cells.append(_verdict_cell(mine) if mine.height else "–")
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, body: str) -> str:
    """``text`` with everything between the findings markers replaced by ``body``."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), flags=re.DOTALL)
    if not pattern.search(text):
        raise ValueError(f"no findings section: the file needs a line {START} and a later line {END}")
    return pattern.sub(lambda _: f"{START}\n{body.rstrip()}\n{END}", text, count=1)


def claims_html(table: pl.DataFrame, title: str) -> str:
    """A self-contained HTML page of one claims table, verdicts coloured, for the Snakemake report."""
    colours = {"holds": "#d8f0d8", "fails": "#f6d5d5", "inconclusive": "#f3ecd0"}
    head = ["finding", "paper", "detail", "statistic", "estimate [95 % CI]", "n", "unit", "threshold", "verdict"]
    head.append("note")
    rows = []
    for row in table.iter_rows(named=True):
        side = ">" if row["holds_when"] == "above" else "<"
        cells = [row["finding"], row["paper"], row["detail"], row["statistic"], interval_text(row), str(row["n"]),
                 row["unit"], f"{side} {_number(row['threshold'])}", row["verdict"], row["note"]]  # fmt: skip
        tds = "".join(f"<td>{html.escape(str(cell))}</td>" for cell in cells)
        rows.append(f'<tr style="background:{colours.get(row["verdict"], "#fff")}">{tds}</tr>')
    ths = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    style = ("body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse}"
             "td,th{border:1px solid #bbb;padding:3px 6px;vertical-align:top;text-align:left}")  # fmt: skip
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h3>{html.escape(title)}</h3><p>{html.escape(verdict_counts(table))}"
        f"</p><table><tr>{ths}</tr>{''.join(rows)}</table></body></html>\n"
    )
