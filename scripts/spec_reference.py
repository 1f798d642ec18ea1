#!/usr/bin/env python3
"""The job spec's reference page (docs/spec.md), written from the pydantic models'
fields, types, defaults and descriptions, so that it cannot drift from them:

    python scripts/spec_reference.py > docs/spec.md

tests/unit/test_docs.py fails when the committed page differs from this output.
"""
from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hvdtrain.spec import JobSpec  # noqa: E402

HEAD = """# The job spec

A job is one YAML file: the sections below, each field with its type, default and
meaning, generated from `hvdtrain/spec/` (`python scripts/spec_reference.py >
docs/spec.md`). `hvdtrain validate SPEC` lists every problem of a spec with its
key path, or prints the spec resolved; `key.path=value` overrides on any verb are
typed and checked the same way. Unknown keys are refused with the nearest valid
name. Relative paths are taken from the current directory.
"""


def models_in(annotation) -> list[type[BaseModel]]:
    """The pydantic models a field's type holds (a union's members, an Optional's)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in models_in(arg)]


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        if any(getattr(m, "description", None) == "package.module:function" for m in args[1:]):
            return "import path (`package.module:function`)"
        return type_name(args[0]) + bounds([c for m in args[1:] for c in getattr(m, "metadata", [m])])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        named = [type_name(a) for a in args if a is not type(None)]
        if named == ["path", "str"]:  # a location: a local path or a URL (hvdtrain.storage)
            return "path or URL"
        return " or ".join(named)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation)).replace("PosixPath", "path").replace("Path", "path")


def bounds(constraints: list) -> str:
    """A type's bounds as text: ' (>= 1, <= 4096)'."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {getattr(c, k)}" for c in constraints for k, sign in signs.items()
             if getattr(c, k, None) is not None]
    return f" ({', '.join(found)})" if found else ""


def kind_of(model: type[BaseModel]) -> str | None:
    """The tag of a union's member (model.kind: a Literal of one value); None for a plain
    section, whose `kind` field (if any) is a choice with a default (data.tokenizer.kind)."""
    field = model.model_fields.get("kind")
    if field is None or not field.is_required():
        return None
    return typing.get_args(field.annotation)[0]


def default_of(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default if field.default_factory is None else field.default_factory()
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "-"
    return f"`{value}`" if not isinstance(value, str) or value else '`""`'


def rows(model: type[BaseModel], prefix: str, out: list[str], sections: list[tuple[str, type[BaseModel]]]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        nested = models_in(field.annotation)
        if nested:
            sections.extend((key, m) for m in nested)
            kinds = ", ".join(f"`{kind_of(m)}`" for m in nested if kind_of(m))
            what = f"a section (below){': kind ' + kinds if kinds else ''}"
            out.append(f"| `{key}` | {what} | {default_of(field)} | {clean(field.description)} |")
        else:
            kind = type_name(field.annotation) + bounds(field.metadata)
            out.append(f"| `{key}` | {kind} | {default_of(field)} | {clean(field.description)} |")


def clean(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def reference() -> str:
    out = [HEAD, "## Top level", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    sections: list[tuple[str, type[BaseModel]]] = []
    rows(JobSpec, "", out, sections)
    while sections:
        key, model = sections.pop(0)
        title = f"`{key}` (kind `{kind_of(model)}`)" if kind_of(model) else f"`{key}`"
        out += ["", f"## {title}", ""]
        if model.__doc__ and model.__doc__.strip() and not model.__doc__.startswith(model.__name__ + "("):
            out += [" ".join(model.__doc__.split()), ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        found: list[tuple[str, type[BaseModel]]] = []
        rows(model, f"{key}.", out, found)
        sections = found + sections
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference())
