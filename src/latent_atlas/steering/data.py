"""Steering data: the sentiment/style YAML and the city-country table behind the true/false statements."""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import yaml

from latent_atlas.errors import ConfigError

REQUIRED_KEYS = ("actadd", "contrast_pairs", "icv_demonstrations", "neutral_prompts", "off_target_texts")


@dataclass(frozen=True)
class SteeringData:
    """Everything the sentiment and style sweeps read (config/steering/sentiment.yaml)."""

    actadd_positive: str
    actadd_negative: str
    contrast_pairs: list[tuple[str, str]]
    icv_demonstrations: list[tuple[str, str]]
    neutral_prompts: list[str]
    off_target_texts: list[str]
    target_sentences: list[str]


def load_steering_data(path: str | os.PathLike[str]) -> SteeringData:
    """Read and check the steering YAML; a missing file or key is a :class:`ConfigError` naming it."""
    if not Path(path).is_file():
        raise ConfigError(f"steering data {path} does not exist; set steering.data to the YAML file")
    raw: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        raise ConfigError(f"steering data {path} lacks {missing}; see config/steering/sentiment.yaml")
    pairs = [(str(a), str(b)) for a, b in raw["contrast_pairs"]]
    demonstrations = [(str(a), str(b)) for a, b in raw["icv_demonstrations"]]
    return SteeringData(
        str(raw["actadd"]["positive"]),
        str(raw["actadd"]["negative"]),
        pairs,
        demonstrations,
        [str(p) for p in raw["neutral_prompts"]],
        [str(t) for t in raw["off_target_texts"]],
        [str(t) for t in raw.get("target_sentences", [])],
    )


@dataclass(frozen=True)
class Statements:
    """True and false statements built from a fact table, split by item (both versions on one side).

    Row ``2i`` is item ``i`` with its true object, row ``2i + 1`` with a false one.
    """

    prompts: list[str]  # "{subject} is a city in"
    true_objects: list[str]
    false_objects: list[str]
    train_items: np.ndarray  # bool per item

    def texts(self) -> list[str]:
        """Every statement, true then false for each item."""
        return [
            f"{prompt} {obj}."
            for prompt, true, false in zip(self.prompts, self.true_objects, self.false_objects, strict=True)
            for obj in (true, false)
        ]

    def labels(self) -> np.ndarray:
        """1 for true statements, 0 for false ones (the order of :meth:`texts`)."""
        return np.tile([1.0, 0.0], len(self.prompts))

    def train_rows(self) -> np.ndarray:
        """The training mask over statements (both versions of a training item)."""
        return np.repeat(self.train_items, 2)


def city_statements(path: str | os.PathLike[str], train_fraction: float = 0.5, seed: int = 0) -> Statements:
    """Statements "{city} is a city in {country}." with, for each city, a false country drawn from the others.

    The false country and the split are fixed by ``seed``.
    """
    if not Path(path).is_file():
        raise ConfigError(f"fact table {path} does not exist; set steering.facts to a CSV with city,country")
    table = pl.read_csv(path)
    if set(table.columns) < {"city", "country"}:
        raise ConfigError(f"fact table {path} needs the columns city,country; it has {table.columns}")
    rng = np.random.default_rng(seed)
    countries = sorted(set(table["country"]))
    false = []
    for country in table["country"]:
        others = [c for c in countries if c != country]
        false.append(others[int(rng.integers(len(others)))])
    train = np.zeros(table.height, dtype=bool)
    train[rng.permutation(table.height)[: round(train_fraction * table.height)]] = True
    prompts = [f"{city} is a city in" for city in table["city"]]
    return Statements(prompts, table["country"].to_list(), false, train)
