"""A family of small language models that differ only in their training data.

The config's ``training`` section names a family: a corpus of register-labelled documents, a tokenizer,
the registers it studies, a set of *mixtures* (weights over those registers) and one training recipe
(architecture, token budget, optimiser, seed). Each mixture becomes a *member*, named
``{family}-{mixture}``, trained with the same recipe, so that data is the only thing that differs:
:func:`member_spec` gives each member one record whose ``recipe`` part (and its hash) is shared by every
member and whose ``mixture`` part is its own.

Mixtures:
- ``single``: each register alone (``{family}-{register}``);
- ``uniform``: every register with equal weight (``{family}-uniform``);
- ``leave_one_out``: every register but one, equal weights (``{family}-minus-{register}``);
- ``custom``: named weight maps ``{name: {register: weight}}``.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from latent_atlas.errors import ConfigError
from latent_atlas.provenance import config_hash

RECIPE_KEYS = ("tokenizer", "architecture", "budget", "optimiser", "seed", "checkpoint_every", "eval_every")


@dataclass(frozen=True)
class Mixture:
    """A named weight map over registers; the weights are normalised to sum to one."""

    name: str
    weights: Mapping[str, float]

    def __post_init__(self) -> None:
        if not self.weights:
            raise ConfigError(f"training mixture {self.name!r} has no registers; give it at least one weight")
        bad = {register: weight for register, weight in self.weights.items() if not weight >= 0}
        if bad or not math.isfinite(sum(self.weights.values())) or sum(self.weights.values()) <= 0:
            raise ConfigError(
                f"training mixture {self.name!r} has weights {dict(self.weights)}: every weight must be a "
                "finite number ≥ 0 and at least one must be positive"
            )

    def normalised(self) -> dict[str, float]:
        """The weights divided by their sum, registers sorted, zero weights dropped."""
        total = sum(self.weights.values())
        return {register: weight / total for register, weight in sorted(self.weights.items()) if weight > 0}


def family_name(config: Mapping[str, Any]) -> str | None:
    """The family's name, or ``None`` when the config trains no family."""
    training = config.get("training")
    return None if not training else str(training["family"])


def mixtures(training: Mapping[str, Any]) -> list[Mixture]:
    """The family's mixtures, in config order: single, uniform, leave-one-out, then custom."""
    registers = list(training["registers"])
    if len(set(registers)) != len(registers) or not registers:
        raise ConfigError(f"training.registers is {registers}: name each register once, at least one")
    chosen = training.get("mixtures", {})
    found: list[Mixture] = []
    if chosen.get("single", True):
        found += [Mixture(register, {register: 1.0}) for register in registers]
    if chosen.get("uniform", True):
        found.append(Mixture("uniform", dict.fromkeys(registers, 1.0)))
    if chosen.get("leave_one_out", False):
        if len(registers) < 2:
            raise ConfigError("training.mixtures.leave_one_out needs at least two training.registers")
        found += [
            Mixture(f"minus-{left}", {register: 1.0 for register in registers if register != left})
            for left in registers
        ]
    for name, weights in (chosen.get("custom") or {}).items():
        unknown = sorted(set(weights) - set(registers))
        if unknown:
            raise ConfigError(
                f"training.mixtures.custom.{name} weights {unknown}, which are not in training.registers "
                f"({', '.join(registers)}): add them there or remove them from the mixture"
            )
        found.append(Mixture(str(name), {str(k): float(v) for k, v in weights.items()}))
    names = [mixture.name for mixture in found]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ConfigError(f"training mixtures {duplicated} are defined twice; rename the custom ones")
    if not found:
        raise ConfigError("training.mixtures selects no mixture: enable single, uniform, leave_one_out or custom")
    return found


def members(config: Mapping[str, Any]) -> dict[str, Mixture]:
    """Member name → mixture for the config's family (empty when it trains none)."""
    family = family_name(config)
    if family is None:
        return {}
    found = {f"{family}-{mixture.name}": mixture for mixture in mixtures(config["training"])}
    clashes = sorted(set(found) & set(config.get("models", {})))
    if clashes:
        raise ConfigError(
            f"training family members {clashes} have the names of models under 'models'; rename training.family"
        )
    return found


def recipe(training: Mapping[str, Any]) -> dict[str, Any]:
    """What every member of the family shares: tokenizer, architecture, budget, optimiser, seed, schedule."""
    return {key: training[key] for key in RECIPE_KEYS if key in training}


def member_spec(config: Mapping[str, Any], member: str) -> dict[str, Any]:
    """The model entry of a member: ``source: trained``, its family, mixture, recipe and their hashes.

    Two members' specs differ only in ``name``, ``mixture`` and ``data_hash``; ``recipe_hash`` is the same
    for all of them (tests check this).
    """
    found = members(config)
    if member not in found:
        raise ConfigError(f"{member!r} is not a member of the training family; members: {', '.join(found)}")
    training = config["training"]
    shared = recipe(training)
    mixture = found[member].normalised()
    return {
        "source": "trained",
        "family": training["family"],
        "name": member,
        "mixture": mixture,
        "recipe": shared,
        "recipe_hash": config_hash(shared),
        "data_hash": config_hash({"corpus": training["corpus"], "mixture": mixture}),
        "store_dtype": "float32",
        "licence": "as its training data (see the corpus manifest)",
    }
