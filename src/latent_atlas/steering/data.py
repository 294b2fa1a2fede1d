"""Steering data: the sentiment/style YAML, and the fact tables behind ITI's true/false statements."""

import os
from collections.abc import Sequence
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


SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Statements:
    """True and false statements built from a fact table, split by item (both versions on one side).

    Row ``2i`` is item ``i`` with its true object, row ``2i + 1`` with a false one. ``split`` names each item's
    split (one of :data:`SPLITS`). An item is its prompt (one city of the city table), so both statements of an
    item, and every row sharing its prompt, fall in one split.
    """

    prompts: list[str]  # e.g. "{subject} is a city in"
    true_objects: list[str]
    false_objects: list[str]
    split: np.ndarray  # str per item: train, validation or test

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

    def select(self, split: str) -> "Statements":
        """The items of one split, in their order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        items = np.flatnonzero(self.split == split)
        return Statements(
            [self.prompts[i] for i in items],
            [self.true_objects[i] for i in items],
            [self.false_objects[i] for i in items],
            self.split[items],
        )


def split_items(keys: Sequence[str], train_fraction: float, validation_fraction: float, seed: int) -> np.ndarray:
    """Each item's split (train / validation / test), drawn over distinct keys, so equal keys share a split.

    The distinct keys, sorted, are permuted by ``seed``; the first ``round(train_fraction·n)`` train the probes,
    the next ``round(validation_fraction·n)`` rank the heads, the rest are the test items.
    """
    keys_ = "steering.iti.train_fraction and steering.iti.validation_fraction"
    if train_fraction <= 0 or validation_fraction <= 0 or train_fraction + validation_fraction >= 1:
        raise ConfigError(f"{keys_} must be positive with a sum below 1 (the test split is the rest)")
    unique = sorted(set(keys))
    n_train, n_validation = round(train_fraction * len(unique)), round(validation_fraction * len(unique))
    if min(n_train, n_validation, len(unique) - n_train - n_validation) < 1:
        raise ConfigError(f"{len(unique)} items leave a split empty; change {keys_} or add facts")
    order = np.random.default_rng(seed).permutation(len(unique))
    names = np.empty(len(unique), dtype="<U10")
    names[order[:n_train]] = "train"
    names[order[n_train : n_train + n_validation]] = "validation"
    names[order[n_train + n_validation :]] = "test"
    lookup = dict(zip(unique, names.tolist(), strict=True))
    return np.array([lookup[key] for key in keys], dtype="<U10")


def load_statements(
    path: str | os.PathLike[str], train_fraction: float = 0.4, validation_fraction: float = 0.2, seed: int = 0
) -> Statements:
    """Statements from a fact table: ``prompt,true,false`` columns, or ``city,country`` (:func:`city_statements`).

    Lines starting with ``#`` are comments (a licence line, say); other columns (``category``) are ignored.
    """
    if not Path(path).is_file():
        raise ConfigError(f"fact table {path} does not exist; set steering.iti.facts to a CSV")
    table = pl.read_csv(path, comment_prefix="#")
    if {"prompt", "true", "false"} <= set(table.columns):
        prompts = table["prompt"].cast(pl.String).to_list()
        split = split_items(prompts, train_fraction, validation_fraction, seed)
        return Statements(
            prompts, table["true"].cast(pl.String).to_list(), table["false"].cast(pl.String).to_list(), split
        )
    if {"city", "country"} <= set(table.columns):
        return city_statements(path, train_fraction, validation_fraction, seed)
    raise ConfigError(
        f"fact table {path} needs the columns prompt,true,false (or city,country); it has {table.columns}"
    )


def city_statements(
    path: str | os.PathLike[str], train_fraction: float = 0.4, validation_fraction: float = 0.2, seed: int = 0
) -> Statements:
    """Statements "{city} is a city in {country}." with, for each city, a false country drawn from the others.

    The false country and the split (by city) are fixed by ``seed``.
    """
    if not Path(path).is_file():
        raise ConfigError(f"fact table {path} does not exist; set steering.iti.facts to a CSV with city,country")
    table = pl.read_csv(path, comment_prefix="#")
    if not {"city", "country"} <= set(table.columns):
        raise ConfigError(f"fact table {path} needs the columns city,country; it has {table.columns}")
    rng = np.random.default_rng(seed)
    countries = sorted(set(table["country"]))
    false = []
    for country in table["country"]:
        others = [c for c in countries if c != country]
        false.append(others[int(rng.integers(len(others)))])
    prompts = [f"{city} is a city in" for city in table["city"]]
    split = split_items(prompts, train_fraction, validation_fraction, seed)
    return Statements(prompts, table["country"].to_list(), false, split)
