"""Claims: the published qualitative findings the pipeline tests, each decided on the configured models.

A claim is one published finding (a paper, a sentence), the statistic that tests it on our tables, that
statistic's interval over its resampling unit, and a threshold with the side on which the finding holds. Its
verdict is ``holds`` when the whole interval lies on that side, ``fails`` when the whole interval lies on the
other, and ``inconclusive`` when it straddles the threshold or there is no interval (too few units). A claim
that fails is a result, not a bug.

Each area module (``lenses``, ``geometry``, ``steering``, ``readers``, ``training``) exposes two functions:

- ``inputs(config, model, corpus) -> dict[str, str]``: the tables it reads (logical name -> path under
  ``results/``), empty when the area does not run for this model or corpus;
- ``claims(tables, config, model, corpus) -> list[Claim]``: the claims decided on those tables (already read).

``gather`` runs every area for one model × corpus into the rows of ``results/claims/{model}.{corpus}.parquet``.
"""

import importlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import polars as pl

from latent_atlas.stats import INTERVAL_SCHEMA, Interval

AREAS = ("lenses", "geometry", "steering", "readers", "training")
VERDICTS = ("holds", "fails", "inconclusive")

CLAIM_SCHEMA = {
    "model": pl.String,
    "corpus": pl.String,
    "area": pl.String,
    "claim": pl.String,
    "detail": pl.String,
    "paper": pl.String,
    "finding": pl.String,
    "statistic": pl.String,
    "estimate": pl.Float64,
    **INTERVAL_SCHEMA,
    "threshold": pl.Float64,
    "holds_when": pl.String,
    "verdict": pl.String,
    "note": pl.String,
}


def verdict(low: float, high: float, threshold: float, holds_when: Literal["above", "below"]) -> str:
    """``holds`` / ``fails`` / ``inconclusive`` of an interval against a threshold.

    The finding holds when the whole interval lies strictly on its side of the threshold (``above`` or
    ``below``), fails when the whole interval lies on the other side or touches the threshold from there, and
    is inconclusive when the interval contains the threshold or is missing (NaN bounds).
    """
    if holds_when not in ("above", "below"):
        raise ValueError(f"holds_when must be 'above' or 'below', got {holds_when!r}")
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if low > high:
        raise ValueError(f"an interval's low bound {low} exceeds its high bound {high}")
    if holds_when == "above":
        return "holds" if low > threshold else "fails" if high <= threshold else "inconclusive"
    return "holds" if high < threshold else "fails" if low >= threshold else "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One published finding tested on our tables.

    ``statistic`` says what ``estimate`` is, with its unit of measure; ``unit`` is the resampling unit of the
    interval (``prompt``, ``document``, ``seed × item``, ...) and ``n`` how many there were; an exact statistic
    (no sampling: a weight-space identity) has ``ci_low == ci_high == estimate`` and ``unit == "exact"``.
    ``detail`` separates rows of one claim (a layer, a method); ``note`` says anything a reader must know.
    """

    claim: str
    paper: str
    finding: str
    statistic: str
    estimate: float
    ci_low: float
    ci_high: float
    n: int
    unit: str
    threshold: float
    holds_when: Literal["above", "below"]
    detail: str = ""
    note: str = ""
    verdict: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "verdict", verdict(self.ci_low, self.ci_high, self.threshold, self.holds_when))

    @classmethod
    def from_row(cls, row: Mapping[str, Any], estimate: str = "value", **fields: Any) -> "Claim":
        """A claim whose estimate, bounds, n and unit are an interval table's row (missing bounds read as NaN).

        ``fields`` give the rest of the claim and may override ``n`` or ``unit``.
        """
        interval = {
            "estimate": _number(row.get(estimate)),
            "ci_low": _number(row.get("ci_low")),
            "ci_high": _number(row.get("ci_high")),
            "n": row.get("n"),
            "unit": row.get("unit"),
        }
        merged = interval | fields
        return cls(**merged | {"n": int(merged["n"])})

    @classmethod
    def from_interval(cls, interval: Interval, **fields: Any) -> "Claim":
        """A claim whose estimate, bounds, n and unit are a bootstrap :class:`~latent_atlas.stats.Interval`."""
        return cls.from_row({"value": interval.estimate, **interval.columns()}, **fields)


def _number(value: Any) -> float:
    """A table cell as a float, None as NaN."""
    return math.nan if value is None else float(value)


def area(name: str) -> Any:
    """The area module ``latent_atlas.claims.<name>``."""
    if name not in AREAS:
        raise ValueError(f"unknown claims area {name!r} (have {', '.join(AREAS)})")
    return importlib.import_module(f"latent_atlas.claims.{name}")


def inputs(config: Mapping[str, Any], model: str, corpus: str) -> dict[str, str]:
    """Every table the claims of one model × corpus read, keyed ``area.name``."""
    return {f"{name}.{key}": path for name in AREAS for key, path in area(name).inputs(config, model, corpus).items()}


def gather(paths: Mapping[str, str], config: Mapping[str, Any], model: str, corpus: str) -> pl.DataFrame:
    """Decide every claim of one model × corpus from the tables at ``paths`` (keys as ``inputs`` gives them)."""
    rows = []
    for name in AREAS:
        prefix = f"{name}."
        tables = {key[len(prefix) :]: pl.read_parquet(path) for key, path in paths.items() if key.startswith(prefix)}
        if not tables:
            continue
        for claim in area(name).claims(tables, config, model, corpus):
            rows.append({"model": model, "corpus": corpus, "area": name, **asdict(claim)})
    return pl.DataFrame(rows, schema=CLAIM_SCHEMA)
