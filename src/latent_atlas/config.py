"""Configuration: JSON-schema validation with defaults filled in, and the selections it describes.

The workflow validates ``config/*.yaml`` against ``workflow/schemas/config.schema.yaml`` with
:func:`validate_config` at parse time, so a bad key fails before any job runs, with a message that names
the key, the problem and where to fix it.
"""

import copy
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import jsonschema.protocols
import yaml

from latent_atlas.errors import ConfigError
from latent_atlas.training.family import members

LayerSpec = str | int | list[int] | Mapping[str, int]


def load_yaml(path: str | Path) -> Any:
    """Read a YAML file, raising :class:`ConfigError` that names the file (and line and column) on failure."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"config file not found: {path}") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and start is not None:
            context = f"{context} that starts at line {start.line + 1}, column {start.column + 1}:"
        problem = " ".join(filter(None, (context, getattr(error, "problem", None))))
        raise ConfigError(
            f"{where}: not valid YAML ({problem or error}); fix the file there (mixed tabs and spaces, an unclosed "
            "bracket or quote, a missing ':' are the usual causes)"
        ) from None


class ConfigSources:
    """Which file set each config key, so that a message names the file to fix.

    ``files`` are in the order they are merged (``config/config.yaml`` first, then each ``--configfile``
    overlay); ``--config`` values come last. A key comes from the last of them that sets it.
    """

    _KEY = re.compile(r"config key '([^']+)'")

    def __init__(self, files: Sequence[str | Path], command_line: Mapping[str, Any] | None = None) -> None:
        self.layers: list[tuple[str, Any]] = [(_shown(path), load_yaml(path) or {}) for path in files]
        if command_line:
            self.layers.append(("--config", command_line))

    @classmethod
    def of_workflow(cls, workflow: Any) -> "ConfigSources":
        """A Snakemake workflow's sources: its ``configfile:``, the ``--configfile`` overlays, ``--config``.

        Snakemake 9 keeps the command line's files in ``workflow.config_settings.configfiles`` and appends the
        Snakefile's ``configfile:`` to ``workflow.configfiles``; the command line's are merged last.
        """
        settings = workflow.config_settings
        overlays = [Path(path).absolute() for path in settings.configfiles]
        own = [path for path in workflow.configfiles if Path(path).absolute() not in overlays]
        return cls([*own, *overlays], dict(settings.config or {}))

    @property
    def files(self) -> list[str]:
        """Every source, in merge order."""
        return [name for name, _ in self.layers]

    def origin(self, key: Sequence[str]) -> str | None:
        """The source that set ``key`` (a path of names), or the one that set the deepest part of it."""
        best, depth = None, 0
        for name, tree in self.layers:
            found = _depth(tree, key)
            if found and found >= depth:
                best, depth = name, found
        return best

    def annotate(self, message: str) -> str:
        """``message`` with the file that set the first ``config key '...'`` it names."""
        match = self._KEY.search(message)
        origin = self.origin(match.group(1).split(".")) if match else None
        return f"{message} [set in {origin}]" if origin else message


def merge_config(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into ``base`` in place the way Snakemake merges config files (mappings key by key)."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def check_config_files(files: Sequence[str | Path], schema: str | Path, models_root: str | Path) -> dict[str, Any]:
    """Merge and validate config files as the workflow does, naming the file (and line) of every problem.

    Snakemake reads the files itself before the workflow starts, and its message for a YAML error names no
    file; this names the file, line and column (``latent-atlas config``).
    """
    sources = ConfigSources(files)
    config: dict[str, Any] = {}
    for _, tree in sources.layers:
        if not isinstance(tree, Mapping):
            raise ConfigError(f"{sources.files[0]}: a config file must hold a mapping of keys at its top level")
        merge_config(config, tree)
    validate_config(config, load_yaml(schema), sources=sources, models_root=models_root)
    return config


def _depth(tree: Any, key: Sequence[str]) -> int:
    """How many leading names of ``key`` ``tree`` holds."""
    for count, name in enumerate(key):
        if not isinstance(tree, Mapping) or name not in tree:
            return count
        tree = tree[name]
    return len(key)


def _shown(path: str | Path) -> str:
    """A path as the user typed it: relative to the working directory when it lies below it."""
    try:
        return str(Path(path).absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _fill_defaults(
    validator_class: type[jsonschema.protocols.Validator],
) -> type[jsonschema.protocols.Validator]:
    """Extend a validator so that ``default:`` values of missing properties are written into the instance."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(
        validator: jsonschema.protocols.Validator, properties: Mapping[str, Any], instance: Any, schema: Any
    ) -> Iterator[jsonschema.ValidationError]:
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _fill_defaults(jsonschema.Draft202012Validator)


def _key_path(error: jsonschema.ValidationError) -> str:
    """Return the dotted config key an error refers to (``<top level>`` for the root)."""
    parts = [str(part) for part in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


def _describe(error: jsonschema.ValidationError, sources: ConfigSources | None = None) -> str:
    """Return a one-line description of a schema violation, naming the key (and the file that set it)."""
    key = [str(part) for part in error.absolute_path]
    hint = ""
    if error.validator == "additionalProperties":
        hint = " (check the spelling against the schema)"
        extra = [name for name in error.instance if name not in error.schema.get("properties", {})]
        key = [*key, *extra[:1]]
    origin = sources.origin(key) if sources else None
    return f"config key '{_key_path(error)}': {error.message}{hint}" + (f" [set in {origin}]" if origin else "")


def validate_config(
    config: dict[str, Any],
    schema: dict[str, Any],
    source: str = "the config",
    sources: ConfigSources | None = None,
    models_root: str | Path | None = None,
) -> None:
    """Validate ``config`` in place against ``schema``, filling in schema defaults.

    Args:
        config: the parsed config; defaults are written into it.
        schema: a JSON schema (draft 2020-12) whose ``default:`` values fill missing keys.
        source: where the config came from, for the message (e.g. ``config/config.yaml``).
        sources: the files the config was merged from; each message then names the file that set its key.
        models_root: the workflow's model folder (``results/models``): check the inputs a job would find
            wrong (corpus files, layers against each acquired model's depth) now; None skips these checks.

    Raises:
        ConfigError: listing every violation, each naming its key.
    """
    if sources is not None:
        source = ", ".join(sources.files)
    validator = _DefaultFillingValidator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = "\n".join(f"  - {_describe(error, sources)}" for error in errors)
        raise ConfigError(f"invalid configuration in {source}:\n{lines}\nFix these keys and run again.")
    try:
        check_references(config, source)
        if models_root is not None:
            check_inputs(config, Path(models_root))
    except ConfigError as error:
        raise ConfigError(sources.annotate(str(error)) if sources else str(error)) from None


def check_inputs(config: Mapping[str, Any], models_root: Path) -> None:
    """What a job would find wrong, checked at parse time: corpus files, and layers beyond a model's depth.

    A model's depth is known once it is acquired (``{models_root}/{model}/manifest.json``); before that the
    job itself checks, naming the same key.
    """
    check_corpus_files(config)
    for model in config.get("run", {}).get("models", []):
        manifest = models_root / model / "manifest.json"
        if manifest.is_file():
            check_depth(config, model, int(json.loads(manifest.read_text())["n_layers"]), manifest)


def check_depth(config: Mapping[str, Any], model: str, n_layers: int, manifest: Path) -> None:
    """``extraction.layers``, ``lenses.layers`` and the layers of the probes read must lie in the model."""
    where = f"model {model} ({manifest})"
    sections = ["extraction", *(["lenses"] if model in analysis_models(config, "lenses") else [])]
    for section in sections:
        spec = config.get(section, {}).get("layers")
        try:
            select_layers("all" if spec is None else spec, n_layers, f"{section}.layers")
        except ConfigError as error:
            raise ConfigError(f"{error}: {where}") from None
    probes = config.get("probes", {})
    for name in sorted(probes_read(config)):
        layer = probes[name].get("layer")
        if layer is not None and not 0 <= int(layer) <= n_layers:
            raise ConfigError(
                f"config key 'probes.{name}.layer' is {layer}, outside 0..{n_layers} for a model with {n_layers} "
                f"blocks: {where}"
            )


def probes_read(config: Mapping[str, Any]) -> set[str]:
    """The probes the run reads (``run.probes``, neighbourhood points and path ends) and the ends of their midpoints."""
    probes = config.get("probes", {})
    neighbourhood = config.get("neighbourhood", {})
    todo = [*(config.get("run", {}).get("probes") or probes), *neighbourhood.get("points", [])]
    todo += [end for ends in neighbourhood.get("paths", {}).values() for end in ends]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in probes and name not in seen:
            seen.add(name)
            todo.extend(probes[name].get("midpoint", []))
    return seen


def check_corpus_files(config: Mapping[str, Any]) -> None:
    """Every corpus the run reads from a file must name one that exists (outputs of the workflow aside)."""
    run, readers = config.get("run", {}), config.get("readers") or {}
    used = [*run.get("corpora", []), *(task["corpus"] for task in readers.get("tasks", {}).values())]
    corpora = config.get("corpora", {})
    for name in dict.fromkeys(used):
        path = corpora.get(name, {}).get("path")
        if path is None or Path(path).parts[:1] == ("results",) or Path(path).exists():
            continue
        raise ConfigError(
            f"config key 'corpora.{name}.path' is {path!r}, which does not exist (relative to {Path.cwd()}); "
            "fix the path or take the corpus out of run.corpora"
        )


def check_references(config: Mapping[str, Any], source: str = "the config") -> None:
    """Check that every model and corpus named under ``run`` is defined under ``models``/``corpora``."""
    run = config.get("run", {})
    sections = ("models", "corpora", "probes")
    for section, names in ((section, run.get(section, [])) for section in sections):
        defined = config.get(section, {})
        for name in names:
            if name not in defined:
                known = ", ".join(sorted(defined)) or "none"
                raise ConfigError(
                    f"config key 'run.{section}' names '{name}', which is not defined under "
                    f"'{section}' in {source} (defined: {known}). Add it there or remove it from run."
                )
    check_analysis_models(config)
    probes = config.get("probes", {})
    for name in probes:
        probe_layer(probes, name)
    check_neighbourhood(config.get("neighbourhood", {}), probes)
    check_training(config)
    check_readers(config)


ANALYSES_WITH_MODELS = ("lenses", "projections", "neighbourhood", "steering", "readers", "atlas")


def analysis_models(config: Mapping[str, Any], section: str) -> list[str]:
    """The models an analysis runs on: its own ``models`` key, else ``run.models``."""
    models = config.get(section, {}).get("models")
    return list(config["run"]["models"] if models is None else models)


def check_analysis_models(config: Mapping[str, Any]) -> None:
    """Each analysis's ``models`` must be a subset of ``run.models`` (their stores are built for those only)."""
    studied = config.get("run", {}).get("models", [])
    for section in ANALYSES_WITH_MODELS:
        for name in config.get(section, {}).get("models") or []:
            if name not in studied:
                raise ConfigError(
                    f"config key '{section}.models' names '{name}', which is not in run.models ({', '.join(studied)}); "
                    f"add it to run.models or remove it from {section}.models"
                )


def check_training(config: Mapping[str, Any]) -> None:
    """The training family's references: pretrained models, analysis corpus and tokenizer model must exist."""
    training = config.get("training")
    if not training:
        return
    studied, corpora = config.get("run", {}).get("models", []), config.get("corpora", {})
    for name in training.get("evaluation", {}).get("pretrained", []):
        if name not in studied:
            raise ConfigError(
                f"config key 'training.evaluation.pretrained' names '{name}', which is not in run.models "
                f"({', '.join(studied)}); add it there or remove it"
            )
    corpus = training.get("analysis", {}).get("corpus")
    if corpus is not None and corpus not in corpora:
        raise ConfigError(
            f"config key 'training.analysis.corpus' names '{corpus}', which is not under 'corpora' "
            f"({', '.join(corpora)}); name one of them or null"
        )
    model = training.get("tokenizer", {}).get("model")
    if model is not None and model not in config.get("models", {}):
        raise ConfigError(
            f"config key 'training.tokenizer.model' names '{model}', which is not under 'models'; "
            "name a defined model or give training.tokenizer.vocab_size instead"
        )
    if model is None and "vocab_size" not in training.get("tokenizer", {}):
        raise ConfigError("config key 'training.tokenizer' needs vocab_size (train a BPE) or model (reuse one)")
    members(config)


def check_readers(config: Mapping[str, Any]) -> None:
    """The readers' references: task corpora, the compared tasks, the ELM's task, judge and path labels."""
    readers = config.get("readers")
    if not readers:
        return
    tasks, corpora = readers.get("tasks", {}), config.get("corpora", {})
    for name, task in tasks.items():
        if task["corpus"] not in corpora:
            raise ConfigError(
                f"config key 'readers.tasks.{name}.corpus' names '{task['corpus']}', which is not under 'corpora' "
                f"({', '.join(corpora)})"
            )
    for name in readers.get("clustering", {}).get("tasks") or []:
        if name not in tasks:
            raise ConfigError(f"config key 'readers.clustering.tasks' names '{name}', which is not under readers.tasks")
    elm = readers.get("elm", {})
    if not elm.get("enabled", True) or not tasks:
        return
    if elm.get("task") not in tasks:
        raise ConfigError(
            f"config key 'readers.elm.task' names '{elm.get('task')}', which is not under readers.tasks "
            f"({', '.join(tasks) or 'none'}); name one or set readers.elm.enabled: false"
        )
    for judge in elm_judges(elm):
        if judge not in config.get("models", {}):
            raise ConfigError(
                f"config key 'readers.elm.judge' names '{judge}', which is not under 'models'; name one or null"
            )
    words = tasks[elm["task"]]["label_words"]
    for key in ("from", "to"):
        label = elm.get("path", {}).get(key)
        if label is not None and label not in words:
            raise ConfigError(
                f"config key 'readers.elm.path.{key}' is '{label}', not a label of task {elm['task']!r} "
                f"({', '.join(words)})"
            )


def elm_judges(elm: Mapping[str, Any]) -> list[str]:
    """The ELM's candidate judge models, in order (``readers.elm.judge``: a name, a list or null)."""
    judge = elm.get("judge")
    return [] if judge is None else [judge] if isinstance(judge, str) else list(judge)


def elm_judge(elm: Mapping[str, Any], model: str) -> str | None:
    """The judge of ``model``'s ELM: the first candidate that is not ``model`` itself (None: no judge)."""
    return next((judge for judge in elm_judges(elm) if judge != model), None)


def check_neighbourhood(section: Mapping[str, Any], probes: Mapping[str, Any]) -> None:
    """Neighbourhood points and path ends must be probes; paths need one layer and their own names."""
    for name in section.get("points", []):
        if name not in probes:
            raise ConfigError(f"config key 'neighbourhood.points' names '{name}', which is not a probe")
    for path, ends in section.get("paths", {}).items():
        key = f"neighbourhood.paths.{path}"
        if path in section.get("points", []) or path in probes:
            raise ConfigError(f"config key '{key}': the name is also a point or probe; give the path its own name")
        unknown = [end for end in ends if end not in probes]
        if unknown:
            raise ConfigError(f"config key '{key}' names {unknown}, which are not probes")
        layers = {probe_layer(probes, end) for end in ends}
        if len(layers) > 1 and not section.get("layers"):
            raise ConfigError(
                f"config key '{key}' joins probes at layers {sorted(layers)}; give both ends one layer "
                "or set neighbourhood.layers"
            )


def probe_layer(probes: Mapping[str, Any], name: str, seen: tuple[str, ...] = ()) -> int:
    """The layer a probe reads, following midpoints; fails on unknown names, cycles and mixed layers."""
    if name in seen:
        raise ConfigError(f"config key 'probes.{seen[0]}': midpoints refer to each other in a cycle ({name})")
    if name not in probes:
        raise ConfigError(f"config key 'probes.{seen[-1]}.midpoint' names '{name}', which is not a probe")
    spec = probes[name]
    if "midpoint" not in spec:
        return int(spec["layer"])
    layers = {probe_layer(probes, other, (*seen, name)) for other in spec["midpoint"]}
    if len(layers) != 1:
        raise ConfigError(
            f"config key 'probes.{name}.midpoint' joins probes at layers {sorted(layers)}; a midpoint needs one layer"
        )
    return layers.pop()


def select_layers(spec: LayerSpec, n_layers: int, key: str = "extraction.layers") -> list[int]:
    """Return the residual layers (0 = embedding output .. ``n_layers``) a layer spec selects.

    Args:
        spec: ``"all"``; a list of layer numbers (negative counts from the end: -1 = ``n_layers``);
            or ``{"every": k}``: 0, k, 2k, … plus the last layer.
        n_layers: number of blocks L of the model.
        key: the config key the spec came from, for the message.

    Raises:
        ConfigError: for layers out of range or an unknown form.
    """
    top = n_layers
    if spec == "all":
        return list(range(top + 1))
    if isinstance(spec, Mapping) and set(spec) == {"every"}:
        step = int(spec["every"])
        if step < 1:
            raise ConfigError(f"config key '{key}.every' must be >= 1, got {step}")
        return sorted(set(range(0, top + 1, step)) | {top})
    if isinstance(spec, list) and spec and all(isinstance(layer, int) for layer in spec):
        resolved = sorted({layer + top + 1 if layer < 0 else layer for layer in spec})
        bad = [layer for layer in resolved if not 0 <= layer <= top]
        if bad:
            raise ConfigError(
                f"config key '{key}' selects layers {bad}, outside 0..{top} for a model with {n_layers} blocks"
            )
        return resolved
    raise ConfigError(f"config key '{key}' must be 'all', a list of ints or {{every: k}}, got {spec!r}")
