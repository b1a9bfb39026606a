"""The base of every config section: strict keys, a docstring per field, strict numbers.

Each field's docstring (the string literal under it) becomes its description, so the YAML
reference in docs/config.md and `tunesmith schema` come from the same place as the code.

Numbers are checked strictly: a float is finite (no `.inf` / `.nan`), a number is never a bool
(`lr: true` is a mistake, not 1.0), and an integer fits 64 bits.
"""

from __future__ import annotations

import typing
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, model_validator

INT_LIMIT = 2**63


@lru_cache(maxsize=None)
def _kinds(annotation) -> frozenset:
    """The plain types an annotation admits (through Optional, Union, Annotated, Literal-free)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return frozenset()
    if origin is not None and origin not in (list, dict, tuple, set):
        out = frozenset()
        for arg in typing.get_args(annotation):
            out |= _kinds(arg)
        return out
    return frozenset([annotation]) if isinstance(annotation, type) else frozenset()


def number_problem(annotation, value) -> str | None:
    """What is wrong with `value` for a field of this type, if it is a number field given a bool or an
    integer beyond 64 bits; else None."""
    if not isinstance(value, int):
        return None
    kinds = _kinds(annotation)
    if not kinds & {int, float}:
        return None
    if isinstance(value, bool):
        return None if bool in kinds else f"expected a number, got the boolean {str(value).lower()}"
    if abs(value) >= INT_LIMIT:
        return f"number too large ({str(value)[:20]}...; at most 2^63 - 1)"
    return None


class Section(BaseModel):
    """A config section: unknown keys are errors, field docstrings are descriptions, numbers strict."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _strict_numbers(cls, data):
        """Refuse a bool where a number is expected, and integers beyond 64 bits. The message starts with the
        field's name, which the config loader turns into the key's place."""
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            field = cls.model_fields.get(name) if isinstance(name, str) else None
            problem = number_problem(field.annotation, value) if field is not None else None
            if problem:
                raise ValueError(f"{name}: {problem}")
        return data
