"""The interface of each axis (tunesmith/axes.py), enforced over every registry entry; and shared code that
asks methods for their capabilities instead of naming them."""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from tunesmith import axes
from tunesmith.objectives import OBJECTIVES
from tunesmith.regimes import REGIMES
from tunesmith.tuning import TUNINGS

SRC = Path(__file__).resolve().parents[1] / "src" / "tunesmith"
REGISTRIES = {"tuning": TUNINGS, "objective": OBJECTIVES, "regime": REGIMES}
METHOD_FOLDERS = {"tuning", "objectives", "regimes"}


def entries():
    return [(axis, kind) for axis, registry in REGISTRIES.items() for kind in registry]


def required(axis: str, module) -> list[str]:
    names = axes.members(axes.AXES[axis][0])
    if axis == "objective" and not getattr(module, "OWNS_STEP", False):
        names += [n for n in axes.members(axes.SupervisedObjective) if n not in names]
    return names


@pytest.mark.parametrize("axis,kind", entries())
def test_every_registry_entry_provides_its_axis_interface(axis, kind):
    module = REGISTRIES[axis][kind]
    missing = [name for name in required(axis, module) if not hasattr(module, name)]
    assert not missing, f"{axis} {kind!r} lacks {missing} (see tunesmith/axes.py)"
    assert module.Config.model_fields["kind"].default == kind, "the registry key is the Config's kind"


@pytest.mark.parametrize("axis,kind", entries())
def test_capabilities_are_well_formed(axis, kind):
    module = REGISTRIES[axis][kind]
    if axis == "tuning":
        assert module.HEADS and set(module.HEADS) <= set(axes.HEADS)
        assert isinstance(module.TRAINS_BASE, bool) and isinstance(module.MERGEABLE, bool)
    if axis == "objective":
        assert module.HEAD in axes.HEADS
        for metric, direction in axes.metric_directions(module).items():
            assert direction in ("max", "min", None), f"{kind}: {metric} has direction {direction!r}"
        assert module.METRICS.get(module.MAIN_METRIC) in ("max", "min"), "early stopping needs a direction"
        assert any(module.HEAD in t.HEADS for t in TUNINGS.values()), "some tuning must serve its head"


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def _python_files():
    return sorted(p for p in SRC.rglob("*.py"))


def _uses(name: str) -> list[Path]:
    """Files outside axes.py that ask a module for `name`: attribute access, or getattr/hasattr by string."""
    found = []
    for path in _python_files():
        if path.name == "axes.py":
            continue
        tree = _tree(path)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == name) or \
                    (isinstance(node, ast.Constant) and node.value == name and _in_attr_call(tree, node)):
                found.append(path)
                break
    return found


def _in_attr_call(tree, const) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr") and const in node.args:
            return True
    return False


@pytest.mark.parametrize("axis", list(axes.AXES))
def test_every_hook_is_called_by_shared_code(axis):
    """A hook declared in axes.py that nothing asks for would be silently ignored in a user's run."""
    proto, hooks = axes.AXES[axis]
    names = axes.members(proto) + axes.members(hooks)
    if axis == "objective":
        names += axes.members(axes.SupervisedObjective)
    unused = []
    for name in dict.fromkeys(names):
        if name == "Config":
            continue
        callers = [p for p in _uses(name) if not _own_method_module(p, axis)]
        if not callers:
            unused.append(name)
    assert not unused, f"{axis} hooks nobody calls: {unused}"


def _own_method_module(path: Path, axis: str) -> bool:
    """A method module of this axis (tuning/lora.py, ...): providing a hook is not calling it. Another axis's
    method calling it (in its cross-axis `check`) is."""
    rel = path.relative_to(SRC)
    folder = {"tuning": "tuning", "objective": "objectives", "regime": "regimes"}[axis]
    return len(rel.parts) == 2 and rel.parts[0] == folder and rel.stem in REGISTRIES[axis]


# ------------------------------------------------------------------------------- kind names in shared code

KINDS = {kind for registry in REGISTRIES.values() for kind in registry}
COMMON_WORDS = {"full", "prompt", "prefix", "adapter", "reward", "single"}
"""Kind names that are also ordinary words of the codebase (a data format, a metric, a folder name): they
count as naming a method only where compared with a `kind` or used to look a method up."""


def _kind_names(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    flagged: dict[int, tuple[int, str]] = {}

    def strings(node):
        return [c for c in ast.walk(node) if isinstance(c, ast.Constant) and c.value in KINDS]

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(isinstance(s, ast.Attribute) and s.attr == "kind" or isinstance(s, ast.Name) and s.id == "kind"
                   or isinstance(s, ast.Constant) and s.value == "kind" for side in sides for s in ast.walk(side)):
                for c in strings(node):
                    flagged[id(c)] = (c.lineno, c.value)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and \
                node.value.id in ("TUNINGS", "OBJECTIVES", "REGIMES"):
            for c in strings(node.slice):
                flagged[id(c)] = (c.lineno, c.value)
        if isinstance(node, ast.Constant) and node.value in KINDS - COMMON_WORDS and id(node) not in docstrings:
            flagged[id(node)] = (node.lineno, node.value)
    stem = path.stem
    return sorted(v for v in flagged.values() if v[1] != stem)


def test_shared_code_names_no_tuning_objective_or_regime():
    """Capabilities live in the method: outside a method's own module and the registries, no string names a
    kind (`cfg.tuning.kind in ("full", "freeze")`, `OBJECTIVES["sft"]`, ...); shared code asks the module."""
    found = []
    for path in _python_files():
        rel = path.relative_to(SRC)
        if rel.name == "__init__.py" and rel.parts[0] in METHOD_FOLDERS:
            continue  # the registries
        found += [f"{rel}:{line}: {value!r}" for line, value in _kind_names(path)]
    assert not found, "kind names outside their own modules:\n" + "\n".join(found)
