"""Every example config loads, and its first line is the command that runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunesmith.config import load_config

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    assert re.fullmatch(rf"# tunesmith (train|plan) examples/{re.escape(path.name)}", first), first
    from tunesmith import stages

    cfg = stages.load(path) if stages.is_staged(path) else load_config(path)
    assert cfg.name == path.stem
