"""YAML + dotted command-line overrides -> a validated pydantic config, every problem at once.

cfg = load_config(TrainConfig, "configs/train.yaml", ["train.lr=1e-4", "data.max_images=8"])
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)
# A list field declared with ``json_schema_extra=MERGE`` (a stage's own dotted overrides) grows by a command-line
# override instead of being replaced: the YAML's entries stay, the new ones come after them (so they win for the
# same key); an empty list (``key=[]``) clears it.
MERGE = {"merge": True}


class ConfigError(ValueError):
    """Every problem of one config, each naming its key and what to do."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(f"invalid config ({source}):\n  - " + "\n  - ".join(problems))


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    *parents, leaf = path
    node = tree
    for part in parents:
        if node.get(part) is None:  # a missing or null (optional) section starts empty
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise KeyError(part)
        node = child
    node[leaf] = value


def _section(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field annotated ``X`` or ``X | None`` (an optional section), else None."""
    options = [a for a in get_args(annotation) if a is not type(None)] if get_args(annotation) else [annotation]
    if len(options) == 1 and isinstance(options[0], type) and issubclass(options[0], BaseModel):
        return options[0]
    return None


def _is_mapping(annotation: Any) -> bool:
    return annotation is dict or get_origin(annotation) is dict


def _key_path(model: type[BaseModel] | None, key: str) -> tuple[list[str], str | None]:
    """Split dotted ``key`` along ``model``'s sections: (path, None), or (path, why it names no field).

    Below a mapping field the rest is one key, so ``space.train.lr`` is ``["space", "train.lr"]``.
    """
    parts = key.split(".")
    if model is None:
        return parts, None
    node: type[BaseModel] = model
    for depth, part in enumerate(parts):
        field = node.model_fields.get(part)
        if field is None:
            where = ".".join(parts[:depth]) or "the top level"
            return parts, f"{part!r} is not a key of {where}; known keys: {', '.join(node.model_fields)}"
        if depth == len(parts) - 1:
            return parts, None
        if _is_mapping(field.annotation):
            return [*parts[: depth + 1], ".".join(parts[depth + 1 :])], None
        sub = _section(field.annotation)
        if sub is None:
            return parts, f"{'.'.join(parts[: depth + 1])!r} is a value, not a section"
        node = sub
    return parts, None


def _leaf_field(model: type[BaseModel] | None, path: list[str]) -> FieldInfo | None:
    """The schema field a (valid) path ends at, or None below a mapping / without a model."""
    node, field = model, None
    for part in path:
        if node is None or part not in node.model_fields:
            return None
        field = node.model_fields[part]
        node = _section(field.annotation)
    return field


def _merges(model: type[BaseModel] | None, path: list[str]) -> bool:
    field = _leaf_field(model, path)
    return bool(
        field is not None and isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("merge")
    )


def _get_path(tree: dict[str, Any], path: list[str]) -> Any:
    node: Any = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def key_problem(model: type[BaseModel], key: str) -> str | None:
    """Why ``key`` (dotted) names no field of ``model``, or None when it does."""
    return _key_path(model, key)[1]


def apply_overrides(
    values: dict[str, Any], overrides: list[str], model: type[BaseModel] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Apply ``key.sub=value`` strings (values parsed as YAML, except that one starting with ``#`` is text, not a
    YAML comment); return values + problems.

    With ``model``, each key is checked against the schema so a typo is named as such, and a list field marked
    ``MERGE`` (e.g. ``tune.overrides``) is extended, not replaced; an empty list clears it. The merge is logged.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override {item!r}: write it as key.sub=value, e.g. unet.steps=100")
            continue
        path, why = _key_path(model, key)
        if why:
            problems.append(f"override {item!r}: {why}")
            continue
        try:  # a value starting with '#' is text: the shell has stripped the quotes of data.background='#7f7f7f'
            value = raw.strip() if raw.lstrip().startswith("#") else yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            problems.append(f"override {item!r}: the value is not valid YAML; quote it")
            continue
        before = _get_path(values, path)
        if value and isinstance(value, list) and isinstance(before, list) and before and _merges(model, path):
            log.info("%s: %s added to the config's %s (`%s=[]` clears them)", key, value, before, key)
            value = [*before, *value]
        try:
            _set_path(values, path, value)
        except KeyError as exc:
            problems.append(f"override {item!r}: {exc.args[0]!r} is a value, not a section")
    return values, problems


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None) -> M:
    """Read ``path`` (optional), apply ``overrides``, validate against ``model``.

    Raises:
        ConfigError: listing every problem (missing file, bad YAML, bad override, invalid field).
    """
    source = str(path) if path else "defaults"
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist; pass --config with an existing YAML file"], source)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{p} is not valid YAML: {exc}"], source) from exc
        if not isinstance(loaded, dict):
            raise ConfigError([f"{p} must hold a mapping of keys to values at the top level"], source)
        values = loaded
    return validate_values(model, values, overrides, source)


def validate_values(model: type[M], values: dict[str, Any], overrides: list[str] | None = None, source: str = "") -> M:
    """``values`` (a parsed YAML mapping) with ``overrides`` applied, validated against ``model``.

    Raises:
        ConfigError: listing every problem.
    """
    values, problems = apply_overrides(values, overrides or [], model)
    combos = getattr(model, "combination_problems", None)  # cross-field checks that also run when fields fail
    try:
        cfg = model.model_validate(values)
    except ValidationError as exc:
        if combos:
            problems += combos(values)
        for err in exc.errors():
            if combos and not err["loc"]:  # the model validator's message: already listed from combos
                continue
            key = ".".join(str(x) for x in err["loc"]) or "<root>"
            fix = "remove it or check its spelling" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"{key}: {fix}")
        cfg = None
    if problems:
        raise ConfigError(problems, source)
    return cfg
