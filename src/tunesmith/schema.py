"""The base of every config section: strict keys, a docstring per field.

Each field's docstring (the string literal under it) becomes its description, so the YAML
reference in docs/config.md and `tunesmith schema` come from the same place as the code.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)
