"""`posttrain config --explain KEY`: a recipe key's type, default, allowed values, doc and the algorithms that read it.

The docs are the schema's own: every field's docstring in `config.py` is its description (`use_attribute_docstrings`).
A section (`ppo`) lists its keys; `algorithm.name` lists the registered algorithms.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from posttrain.algorithms.registry import ALGORITHMS, readers
from posttrain.config import SOURCES, ConfigError, RecipeConfig


def _field(key: str) -> tuple[str, FieldInfo | None, list[type[BaseModel]]]:
    """(key, its field or None for the top level, the section models it holds). `data.*` looks in every source."""
    models: list[type[BaseModel]] = [RecipeConfig]
    field = None
    for part in key.split("."):
        found = [m.model_fields[part] for m in models if part in m.model_fields]
        if not found:
            allowed = sorted({k for m in models for k in m.model_fields})
            raise ConfigError(f"--explain: unknown key `{key}` (at `{part}`); allowed here: {', '.join(allowed)}")
        field = found[0]
        models = [m for f in found for m in _models_in(f.annotation)]
    return key, field, models


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The section models a field holds: itself, or the members of `X | None`, `list[X]`, a tagged union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _allowed(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [v for arg in typing.get_args(annotation) for v in _allowed(arg)]


def _type_name(annotation: Any) -> str:
    return (
        getattr(annotation, "__name__", None)
        if isinstance(annotation, type)
        else str(annotation).replace("typing.", "")
    )


def explain(key: str) -> str:
    """The text `posttrain config --explain KEY` prints."""
    key, field, models = _field(key)
    lines = [key]
    if field.description:
        lines.append("  " + " ".join(field.description.split()))
    if models and key != "data":
        lines.append(f"  type: section ({', '.join(m.__name__ for m in models)})")
    else:
        lines.append(f"  type: {_type_name(field.annotation)}")
    if not field.is_required():
        default = field.default
        lines.append(f"  default: {default.model_dump(mode='json') if isinstance(default, BaseModel) else default!r}")
    constraints = [str(m) for m in field.metadata]
    if constraints:
        lines.append(f"  constraints: {', '.join(constraints)}")
    if key == "algorithm.name":
        lines.append("  allowed:")
        lines += [f"    {name} ({spec.family}): {spec.doc}" for name, spec in ALGORITHMS.items()]
    elif key == "data":
        lines.append(f"  allowed kinds: {', '.join(SOURCES)}")
    elif allowed := _allowed(field.annotation):
        lines.append(f"  allowed: {', '.join(map(str, allowed))}")
    by = readers(key)
    lines.append(f"  read by: {'every algorithm' if len(by) == len(ALGORITHMS) else ', '.join(by) or 'no algorithm'}")
    for model in models if key != "data" else []:
        lines.append(f"  keys of {model.__name__}:")
        for name, sub in model.model_fields.items():
            doc = " ".join((sub.description or "").split())
            lines.append(f"    {name}: {doc}" if doc else f"    {name}")
    return "\n".join(lines)
