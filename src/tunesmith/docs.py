"""The config reference, generated from the config classes and their field docstrings."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from .config import RunConfig, _unwrap


def _type_name(annotation) -> str:
    text = str(annotation).replace("typing.", "")
    for noise in ("tunesmith.", "<class '", "'>", "NoneType"):
        text = text.replace(noise, "" if noise != "NoneType" else "null")
    return text


def _default(field) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{value!r}`" if value is not None else "`null`"


def _section(model: type[BaseModel], prefix: str, out: list[str]) -> None:
    nested = []
    out.append(f"\n### `{prefix or 'top level'}`\n")
    if model.__doc__ and model.__doc__.strip() and not model.__doc__.startswith("A config section"):
        out.append(model.__doc__.strip().splitlines()[0] + "\n")
    out.append("| key | type | default | meaning |\n|---|---|---|---|")
    for name, field in model.model_fields.items():
        classes = _unwrap(field.annotation)
        path = f"{prefix}.{name}" if prefix else name
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        type_name = "section" if classes else _type_name(field.annotation).replace("|", "\\|")
        out.append(f"| `{name}` | {type_name} | {_default(field).replace('|', '/')} | {desc} |")
        if len(classes) == 1:
            nested.append((classes[0], path))
        elif len(classes) > 1:
            for cls in classes:
                kind = cls.model_fields["kind"].default
                nested.append((cls, f"{path} (kind: {kind})"))
    for cls, path in nested:
        _section(cls, path, out)


def config_reference() -> str:
    out = ["# Config reference", "",
           "Generated from the code by `tunesmith schema`; every key of a run config, its type, default",
           "and meaning. Unknown keys are errors. Override any key from the command line as `a.b=value`."]
    _section(RunConfig, "", out)
    return "\n".join(out) + "\n"
