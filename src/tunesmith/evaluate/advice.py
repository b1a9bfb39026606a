"""Advice after a run: for what the run showed, the changes to try, each a config key with the run's own value
and the value to try, so a hint never proposes what the run already does.

  overfit    train fewer weights or regularise them (the tuning's own answer), fewer epochs (to where validation
             was best), early stopping if it was off, a lower lr (not below the tuning's usual range), weight
             decay, more training rows
  underfit   a higher lr (not above the tuning's usual range), longer training, more trained weights
  forget     train less of the base (the tuning's answer), a lower lr, replay or a penalty (the regime's answer)

What "fewer weights" means differs per tuning (LoRA: a lower rank; full: LoRA; freeze: fewer blocks), so this
module asks the tuning and regime modules (their optional `advice` hook and `LR_RANGE`, see axes.py) and
knows only the `train.` keys itself. `render` turns the changes into one line:
"lower tuning.r (16 -> 8), raise tuning.dropout (0.05 -> 0.1), or ...".
"""

from __future__ import annotations

from ..axes import Change, Symptom
from ..objectives import OBJECTIVES
from ..regimes import REGIMES
from ..tuning import TUNINGS

WEIGHT_DECAY = (0.01, 0.1)
"""Weight decay proposed to a run without any, and the most advice raises it to."""


def _nice(x: float) -> float:
    """Two significant digits: 0.000123 -> 0.00012, 12.5 -> 12."""
    return float(f"{x:.2g}")


def _lr_range(cfg) -> tuple[float | None, float | None]:
    tuning = TUNINGS.get(getattr(getattr(cfg, "tuning", None), "kind", None))
    return getattr(tuning, "LR_RANGE", (None, None))


def _head(cfg) -> str | None:
    objective = OBJECTIVES.get(getattr(getattr(cfg, "objective", None), "kind", None))
    return getattr(objective, "HEAD", None)


def _method(cfg, registry: dict, section: str, symptom: Symptom) -> list[Change]:
    """The tuning's or regime's own changes for the symptom (their `advice` hook); [] without one. Keys the
    objective sets aside (its `overrides` hook: dpo's dropout) are never proposed: changing them changes nothing."""
    part = getattr(cfg, section, None)
    hook = getattr(registry.get(getattr(part, "kind", None)), "advice", None)
    objective_cfg = getattr(cfg, "objective", None)
    overrides = getattr(OBJECTIVES.get(getattr(objective_cfg, "kind", None)), "overrides", None)
    ignored = overrides(objective_cfg) if overrides else set()
    return [c for c in (hook(part, symptom, _head(cfg)) if hook else []) if c.key not in ignored]


def lower_lr(cfg, factor: float = 2) -> list[Change]:
    """The learning rate divided by `factor`, unless it is already at the low end of what suits the tuning."""
    lr, (low, _) = cfg.train.lr, _lr_range(cfg)
    if low is not None and lr <= low:
        return []
    return [Change("train.lr", lr, _nice(max(lr / factor, low or 0)))]


def higher_lr(cfg, factor: float = 10) -> list[Change]:
    """`factor` times the learning rate, at least the low end and at most the top of what suits the tuning
    (an lr far below the range goes straight to its low end), unless it is at the top already."""
    lr, (low, high) = cfg.train.lr, _lr_range(cfg)
    if high is not None and lr >= high:
        return []
    return [Change("train.lr", lr, _nice(min(max(lr * factor, low or 0), high or float("inf"))))]


def longer(cfg) -> list[Change]:
    t = cfg.train
    if t.max_steps:
        return [Change("train.max_steps", t.max_steps, t.max_steps * 2)]
    return [Change("train.epochs", t.epochs, t.epochs * 2)]


def shorter(cfg, trained: dict | None) -> list[Change]:
    """Stop where validation was best (from the run's history), or halve the length; early stopping if off."""
    t, trained = cfg.train, trained or {}
    out = []
    if not t.early_stopping.enabled:
        out.append(Change("train.early_stopping.enabled", False, True))
    best, steps = trained.get("best_step"), trained.get("total_steps") or trained.get("steps")
    share = best / steps if best and steps and best < steps else 0.5
    if t.max_steps:
        to = max(1, round(t.max_steps * share))
        if to < t.max_steps:
            out.append(Change("train.max_steps", t.max_steps, to))
    else:
        to = _nice(t.epochs * share)
        if 0 < to < t.epochs:
            out.append(Change("train.epochs", t.epochs, to))
    return out


def more_weight_decay(cfg) -> list[Change]:
    wd = cfg.train.weight_decay
    low, high = WEIGHT_DECAY
    if wd >= high:
        return []
    return [Change("train.weight_decay", wd, _nice(min(high, wd * 10)) if wd else low)]


def more_data(rows: int | None) -> list[Change]:
    return [Change("data.train", rows, None, "add training rows")]


def overfitting(cfg, trained: dict | None = None, rows: int | None = None) -> list[Change]:
    """The changes that fight overfitting, for this run (`trained`: the loop's result, for where validation was
    best; `rows`: the training rows)."""
    return (_method(cfg, TUNINGS, "tuning", "overfit") + shorter(cfg, trained) + lower_lr(cfg)
            + more_weight_decay(cfg) + more_data(rows))


def fewer_weights(cfg, rows: int | None = None) -> list[Change]:
    """A model that fit its training rows without generalising: fewer trained weights (the tuning's answer), more
    rows."""
    return _method(cfg, TUNINGS, "tuning", "overfit") + more_data(rows)


def underfitting(cfg) -> list[Change]:
    """The changes that let a run learn more: a larger step, longer training, more trained weights."""
    return higher_lr(cfg) + longer(cfg) + _method(cfg, TUNINGS, "tuning", "underfit")


def forgetting(cfg) -> list[Change]:
    """The changes that keep more of what the starting model knew."""
    return _method(cfg, TUNINGS, "tuning", "forget") + lower_lr(cfg) + _method(cfg, REGIMES, "regime", "forget")


def _value(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    return f"{v:g}" if isinstance(v, float) else str(v)


def phrase(change: Change) -> str:
    """One change for people: "lower tuning.r (16 -> 8)", "set tuning.kind (full -> lora): the base stays frozen"."""
    key, now, to, note = change
    if to is None and key.startswith("data."):
        return f"{note} (now {now:,d})" if isinstance(now, int) else note
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (now, to))
    verb = ("raise" if to > now else "lower") if numbers else "set"
    return f"{verb} {key} ({_value(now)} -> {_value(to)})" + (f" {note}" if note else "")


def render(changes: list[Change]) -> str:
    """The changes as one line: "a, b, or c"."""
    parts = [phrase(c) for c in changes]
    if len(parts) < 2:
        return "".join(parts)
    return ", ".join(parts[:-1]) + ", or " + parts[-1]


def as_dicts(changes: list[Change]) -> list[dict]:
    """The changes for summary.json: {key, now, to} (and the note where there is one)."""
    return [{"key": c.key, "now": c.now, "to": c.to, **({"note": c.note} if c.note else {})} for c in changes]
