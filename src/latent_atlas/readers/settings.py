"""The readers' settings: the ``readers`` config section as typed, validated objects, built once per job.

A ``compare_readers`` job reads :class:`ComparisonSettings` (its task, ``readers.clustering``,
``readers.lora`` and ``readers.max_tokens``); an ELM job reads :class:`ElmSettings` (``readers.elm``, its task
and ``readers.max_tokens``). Defaults are the schema's (workflow/schemas/config.schema.yaml); the rules drop
keys a job does not read (``clustering.tasks``, the ELM's evaluation keys when training), which then keep them.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from latent_atlas.errors import ConfigError
from latent_atlas.names import ELM_TASKS
from latent_atlas.readers.lora import LoraSettings

CLUSTERING_VARIANTS = {"all_bases": "clustering_all_bases", "gt_only": "clustering_gt_only"}
POOLINGS = ("mean", "last")
ELM_STAGES = (1, 2)


def _known(cls: type, section: Mapping[str, Any], key: str, ignored: tuple[str, ...] = ()) -> dict[str, Any]:
    """The section's keys, lists as tuples, after rejecting any that ``cls`` does not know (naming the key)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(section) - known - set(ignored))
    if unknown:
        names = ", ".join(f"{key}.{name}" for name in unknown)
        raise ConfigError(f"unknown key(s) {names}; valid: {sorted(known)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items() if k in known}


@dataclass(frozen=True)
class Task:
    """A labelled task of ``readers.tasks``: its corpus, one label word per label, the in-context template."""

    name: str
    corpus: str
    label_words: Mapping[str, str]
    template: str = "{text}\nType:{label}"

    @classmethod
    def from_config(cls, name: str, section: Mapping[str, Any]) -> "Task":
        """Build ``readers.tasks.<name>``."""
        values = _known(cls, section, f"readers.tasks.{name}")
        return cls(name=name, **{**values, "label_words": dict(section["label_words"])})


@dataclass(frozen=True)
class ClusteringSettings:
    """``readers.clustering``: semantic clustering's training and its baselines' settings (``tasks`` is the rules')."""

    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(CLUSTERING_VARIANTS)
    reduction: int = 16
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    knn_k: int = 5
    probe_weight_decay: float = 1e-3
    shots_per_class: int = 1
    separator: str = "\n\n"
    batch_size_icl: int = 16

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "ClusteringSettings":
        """Build from the section, with or without its list of tasks."""
        return cls(**_known(cls, section, "readers.clustering", ignored=("tasks",)))

    def __post_init__(self) -> None:
        """Reject an unknown variant and an empty list of seeds."""
        bad = [name for name in self.variants if name not in CLUSTERING_VARIANTS]
        if bad or not self.variants:
            raise ConfigError(f"readers.clustering.variants {list(self.variants)}: use {list(CLUSTERING_VARIANTS)}")
        if not self.seeds:
            raise ConfigError("readers.clustering.seeds needs at least one seed")


@dataclass(frozen=True)
class ComparisonSettings:
    """What one ``compare_readers`` job reads.

    ``lora`` is ``None`` when ``readers.lora.enabled`` is false; ``lora_seeds`` are ``readers.lora.seeds``,
    or clustering's when those are null.
    """

    task: Task
    clustering: ClusteringSettings
    max_tokens: int
    lora: LoraSettings | None = None
    lora_seeds: tuple[int, ...] = ()

    @classmethod
    def from_config(
        cls,
        task_name: str,
        *,
        task: Mapping[str, Any],
        clustering: Mapping[str, Any],
        lora: Mapping[str, Any] | None,
        max_tokens: int,
    ) -> "ComparisonSettings":
        """Build from the job's sections: ``readers.tasks.<task_name>``, clustering, lora and max_tokens."""
        options = ClusteringSettings.from_config(clustering)
        baseline = {"enabled": False} if lora is None else lora
        return cls(
            task=Task.from_config(task_name, task),
            clustering=options,
            max_tokens=max_tokens,
            lora=LoraSettings.from_config(baseline) if baseline.get("enabled", True) else None,
            lora_seeds=tuple(baseline.get("seeds") or options.seeds),
        )


@dataclass(frozen=True)
class ElmPath:
    """``readers.elm.path``: from the first held-out passage of ``from_label`` towards ``to_label``."""

    from_label: str = "narrative"
    to_label: str = "how_to"
    steps: int = 5
    scales: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "ElmPath":
        """Build from the section (its keys ``from`` and ``to`` are the labels)."""
        renamed = {{"from": "from_label", "to": "to_label"}.get(k, k): v for k, v in section.items()}
        return cls(**_known(cls, renamed, "readers.elm.path"))


def _default_prompts() -> dict[str, str]:
    return {
        "reconstruction": "Passage: <embedding>\nThe passage begins:",
        "register": "Passage: <embedding>\nThis passage is a",
    }


@dataclass(frozen=True)
class ElmSettings:
    """What an ELM job reads: ``readers.elm`` (its ``task`` resolved to the task), and ``readers.max_tokens``.

    Training jobs are given the section without the evaluation's keys (judge, path, generation lengths,
    examples); those then keep their defaults, which training never reads.
    """

    task: Task
    max_tokens: int
    enabled: bool = True
    layer: int = 15
    pooling: str = "mean"
    soft_tokens: int = 1
    hidden_size: int = 1024
    target_tokens: int = 16
    prompts: Mapping[str, str] = field(default_factory=_default_prompts)
    stage: int = 1
    lm_lr: float = 1e-5
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    eval_every: int = 25
    seed: int = 0
    max_new_tokens: int = 20
    examples: int = 6
    judge: str | tuple[str, ...] | None = None
    judge_layer: int | None = None
    path: ElmPath = field(default_factory=ElmPath)

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> "ElmSettings":
        """Build from an ELM job's settings: ``{"elm": readers.elm, "task": its task, "max_tokens": ...}``."""
        section = dict(settings["elm"])
        name = section.pop("task")
        values = _known(cls, section, "readers.elm")
        values["prompts"] = _default_prompts() | dict(section.get("prompts", {}))
        values["path"] = ElmPath.from_config(section.get("path", {}))
        task = Task.from_config(name, settings["task"])
        return cls(task=task, max_tokens=settings["max_tokens"], **values)

    def __post_init__(self) -> None:
        """Reject an unknown pooling, stage or prompt."""
        if self.pooling not in POOLINGS:
            raise ConfigError(f"readers.elm.pooling {self.pooling!r}: use one of {list(POOLINGS)}")
        if self.stage not in ELM_STAGES:
            raise ConfigError(f"readers.elm.stage {self.stage!r}: use one of {list(ELM_STAGES)}")
        if set(self.prompts) != set(ELM_TASKS):
            raise ConfigError(f"readers.elm.prompts has {sorted(self.prompts)}; it needs {list(ELM_TASKS)}")
