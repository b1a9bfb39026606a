"""After training: what early stopping did, whether the model overfit, and whether it barely learned.

Read from the run's history (metrics.jsonl: training loss per log step; validation scores, with the
training loss since the previous evaluation, per evaluation), the loop's summary, the base model's
scores and the size of the weight update. Every finding comes with the change to try.

  overfitting   validation loss (or the watched metric) got worse after its best while the training
                loss kept falling; the train/validation gap over time
  underfitting  training loss close to where it started, validation no better than the base model,
                a vanishing update, a run that ended while validation was still improving; a tuned model
                no better than a trivial baseline (the majority class, ...), or validation sitting at a
                baseline's score at every evaluation
"""

from __future__ import annotations

import json
from pathlib import Path

from ..axes import Direction, better
from . import advice

WORSE_BY = 0.01
"""Relative worsening of validation loss past its best that counts, when it holds for at least two
evaluations after the best (one bad evaluation can be noise)."""
FLAT_LOSS = 0.10
"""Training loss that fell by less than this fraction of its first logged value "barely moved"."""
TINY_UPDATE = 1e-3
"""Weights that moved by less than this fraction of their starting norm barely changed."""


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def update_size(start: dict, model) -> dict:
    """||w - w0|| / ||w0|| over the trainable weights (`start`: their values before training, on CPU)."""
    import torch

    moved = norm0 = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in start:
                w0 = start[name].float()
                moved += float((p.detach().float().cpu() - w0).pow(2).sum())
                norm0 += float(w0.pow(2).sum())
    ratio = moved ** 0.5 / norm0 ** 0.5 if norm0 else float("inf") if moved else 0.0
    return {"relative": ratio, "norm": moved ** 0.5}


def diagnose(history: list[dict], trained: dict, cfg, watch: str, direction: Direction, base: dict | None,
             results: dict, update: dict | None, baselines: dict | None = None) -> dict:
    """The diagnosis written to summary.json under `diagnosis`; `warnings` lists what needs attention.
    `watch` is the metric early stopping watched, `direction` whether it is better high or low; `baselines`
    the objective's trivial baselines ({name: {"about", <split>: metrics}}, evaluate/baselines.py)."""
    evals = [h for h in history if h.get("split") == "validation"]
    logs = [h for h in history if "split" not in h and "loss" in h]
    out = {"early_stopping": _early_stopping(trained, cfg, watch, bool(evals))}
    out["gap"] = [{"step": e["step"], "train_loss": round(e["train_loss"], 5), "validation_loss": round(e["loss"], 5),
                   "gap": round(e["loss"] - e["train_loss"], 5)} for e in evals if "loss" in e and "train_loss" in e]
    out["overfitting"] = _overfitting(evals, watch, direction, trained, cfg)
    out["underfitting"] = _underfitting(logs, evals, trained, cfg, watch, direction, base, results, update,
                                        overfit=out["overfitting"]["warning"])
    out["underfitting"] += _no_better_than_trivial(evals, cfg, watch, direction, results, baselines)
    if update is not None:
        out["update"] = {"relative": round(update["relative"], 6), "norm": round(update["norm"], 4)}
    out["warnings"] = ([out["overfitting"]["message"]] if out["overfitting"]["warning"] else []) + \
        [f"{u['finding']} -> {u['suggestion']}" for u in out["underfitting"]]
    return out


def _early_stopping(trained: dict, cfg, watch: str, has_validation: bool) -> dict:
    es = cfg.train.early_stopping
    info = {"enabled": es.enabled and has_validation, "metric": watch, "patience": es.patience,
            "stopped_early": trained.get("stopped_early", False), "best_step": trained.get("best_step"),
            "restored_best": trained.get("restored_best", False), "steps": trained.get("steps")}
    best = (trained.get("best_metric") or {}).get(watch)
    if not has_validation:
        info["message"] = ("no validation split, so no early stopping and no train/validation gap; "
                           "give data.validation or set data.split.validation > 0")
    elif not es.enabled:
        info["message"] = f"early stopping is off; best validation {watch} {best:.4f} at step {info['best_step']}"
    elif info["stopped_early"]:
        info["message"] = (f"stopped early at step {info['steps']} of {trained.get('total_steps')}: validation {watch} "
                           f"did not improve for {es.patience} evaluations; "
                           + (f"restored the best checkpoint (step {info['best_step']}, {watch} {best:.4f})"
                              if info["restored_best"] else f"the best was the last step ({info['best_step']})"))
    else:
        info["message"] = (f"ran all {info['steps']} steps; best validation {watch} {best:.4f} at step "
                           f"{info['best_step']}" + (", restored" if info["restored_best"] else " (the last)"))
    return info


def _overfitting(evals: list[dict], watch: str, direction: Direction, trained: dict, cfg) -> dict:
    """Did validation get worse after its best while the training loss kept falling? The changes to try are made
    from the run's config (`advice`)."""
    with_loss = [e for e in evals if "loss" in e and "train_loss" in e]
    if len(with_loss) < 2:
        return {"warning": False, "message": "too few evaluations to judge overfitting"}
    best = min(with_loss, key=lambda e: e["loss"])
    last = with_loss[-1]
    worst_after = max((e for e in with_loss if e["step"] > best["step"]), key=lambda e: e["loss"], default=None)
    gap_best, gap_last = best["loss"] - best["train_loss"], last["loss"] - last["train_loss"]
    info = {"best_validation_loss": {"step": best["step"], "loss": round(best["loss"], 5)},
            "gap_at_best": round(gap_best, 5), "gap_at_end": round(gap_last, 5)}
    after = [e for e in with_loss if e["step"] > best["step"]]
    worse = [e for e in after if e["loss"] > best["loss"] * (1 + WORSE_BY)]
    rose = len(worse) >= 2 and worst_after in worse
    fell = worst_after is not None and worst_after["train_loss"] < best["train_loss"]
    watched = _watched_worsened(evals, watch, direction) if watch not in ("loss", "train_loss") else None
    changes = advice.overfitting(cfg, trained, trained.get("train_rows"))
    if rose and fell or watched:
        info["advice"] = advice.as_dicts(changes)
    if rose and fell:
        info["warning"] = True
        info["message"] = (
            f"overfitting: validation loss rose from {best['loss']:.4f} (step {best['step']}) to "
            f"{worst_after['loss']:.4f} (step {worst_after['step']}) while training loss fell from "
            f"{best['train_loss']:.4f} to {worst_after['train_loss']:.4f}; the train/validation gap grew from "
            f"{gap_best:.4f} to {worst_after['loss'] - worst_after['train_loss']:.4f}"
            + (f"; the best checkpoint (step {trained.get('best_step')}) was restored"
               if trained.get("restored_best") else "")
            + " -> " + advice.render(changes))
    elif watched:
        info["warning"] = True
        info["message"] = watched + (f"; the best checkpoint (step {trained.get('best_step')}) was restored"
                                     if trained.get("restored_best") else "") + " -> " + advice.render(changes)
    else:
        info["warning"] = False
        info["message"] = (f"no sign of overfitting: validation loss best at step {best['step']}, gap "
                           f"{gap_best:.4f} there and {gap_last:.4f} at the end")
    return info


def _watched_worsened(evals: list[dict], watch: str, direction: Direction) -> str | None:
    """The watched metric (e.g. accuracy) fell away from its best while training loss fell."""
    scored = [e for e in evals if watch in e and "train_loss" in e]
    if len(scored) < 2:
        return None
    best = scored[0]
    for e in scored[1:]:
        if better(direction, e[watch], best[watch]):
            best = e
    later = [e for e in scored if e["step"] > best["step"]]
    if len(later) < 2:
        return None
    worst = later[0]
    for e in later[1:]:
        if better(direction, worst[watch], e[watch]):
            worst = e
    drop = abs(worst[watch] - best[watch]) / max(abs(best[watch]), 1e-12)
    if drop > WORSE_BY and worst["train_loss"] < best["train_loss"]:
        return (f"overfitting: validation {watch} went from {best[watch]:.4f} (step {best['step']}) to "
                f"{worst[watch]:.4f} (step {worst['step']}) while training loss fell from {best['train_loss']:.4f} "
                f"to {worst['train_loss']:.4f}")
    return None


def _even_windows(logs: list[dict]) -> list[dict]:
    """Training-loss logs with each short log (fewer than half the usual steps, e.g. the few steps left at
    an epoch's end) folded into the one before it, weighted by steps: a 2-step mean is too noisy to
    compare with a 10-step one."""
    out: list[dict] = []
    prev = 0
    for log in logs:
        span = log["step"] - prev
        prev = log["step"]
        if out and span * 2 < out[0]["span"]:
            last = out[-1]
            total = last["span"] + span
            out[-1] = {"step": log["step"], "span": total,
                       "loss": (last["loss"] * last["span"] + log["loss"] * span) / total}
        else:
            out.append({"step": log["step"], "span": span, "loss": log["loss"]})
    return out


def _steps(window: dict) -> str:
    return f"{window['step'] - window['span'] + 1}-{window['step']}"


def _underfitting(logs, evals, trained, cfg, watch, direction: Direction, base, results, update, overfit: bool) -> list[dict]:
    """Signs that the model barely learned, each with the change to try. A run that overfit did learn
    (its training data): a learning rate or length too small is then not the explanation."""
    found = []
    lr, epochs = cfg.train.lr, cfg.train.epochs
    flat = tiny = unstable = False
    logs = _even_windows(logs)
    # A noisy training loss on ever-new rows can look flat while held-out loss clearly fell below the base
    # model's: that run learned, and "still improving" (below) is the advice that fits.
    base_loss = ((base or {}).get("validation") or {}).get("loss")
    tuned_loss = (results.get("validation") or {}).get("loss")
    learned = base_loss is not None and tuned_loss is not None and base_loss > 0 and \
        (base_loss - tuned_loss) / base_loss >= FLAT_LOSS / 2
    if len(logs) >= 2 and not overfit and not learned:
        first, last = logs[0]["loss"], logs[-1]["loss"]
        if first > 0 and (first - last) / first < FLAT_LOSS:
            flat = True
            # A loss that climbed above where it started before settling was pushed too hard, not too gently.
            peak = max(logs[1:], key=lambda log: log["loss"])
            unstable = peak["loss"] > first * (1 + FLAT_LOSS / 2)
            found.append({"finding": f"training loss barely moved: {first:.4f} over steps {_steps(logs[0])}, "
                                     f"{last:.4f} over steps {_steps(logs[-1])} ({(last - first) / first:+.1%})"
                                     + (f", after rising to {peak['loss']:.4f} at step {peak['step']}" if unstable
                                        else ""),
                          "suggestion": advice.render(advice.lower_lr(cfg, 10)) + ": a loss that rises first is a "
                                        "step size too large" if unstable else
                                        advice.render(advice.higher_lr(cfg) + advice.longer(cfg))})
    if update is not None and update["relative"] < TINY_UPDATE and not overfit:
        tiny = True
        found.append({"finding": f"the weights barely changed: ||w - w0|| / ||w0|| = {update['relative']:.2e}",
                      "suggestion": f"train.lr={lr:g} is likely too low: "
                                    + (advice.render(advice.higher_lr(cfg)) or "train longer")})
    base_val = (base or {}).get("validation") or {}
    tuned_val = results.get("validation") or {}
    if watch in base_val and watch in tuned_val and not better(direction, tuned_val[watch], base_val[watch]):
        found.append({"finding": f"validation {watch} {tuned_val[watch]:.4f} is no better than the base model's "
                                 f"{base_val[watch]:.4f}",
                      "suggestion": "the model fit its training rows without generalising: check that the labels "
                                    "are right; then "
                                    + advice.render(advice.fewer_weights(cfg, trained.get("train_rows")))
                                    if overfit else
                                    "check that the labels and data are right; then "
                                    + advice.render(advice.lower_lr(cfg, 10)) + ": the training loss rose above its "
                                    "start" if unstable else
                                    "check that the labels and data are right; then "
                                    + advice.render(advice.underfitting(cfg))
                                    + (" (the loss and the weights barely moved)" if flat or tiny else "")})
    if (evals and not trained.get("stopped_early") and trained.get("best_step") == evals[-1]["step"]
            and len(evals) >= 2 and watch in evals[-1] and watch in evals[-2]
            and better(direction, evals[-1][watch], evals[-2][watch])):
        longer = (f"train.max_steps {cfg.train.max_steps} -> {2 * cfg.train.max_steps}" if cfg.train.max_steps
                  else f"train.epochs {epochs:g} -> {epochs * 2:g}")
        found.append({"finding": f"validation {watch} was still improving when training ended "
                                 f"({evals[-2][watch]:.4f} -> {evals[-1][watch]:.4f})",
                      "suggestion": f"train longer: {longer} (early stopping stops it once it stops improving)"})
    return found


SAME = 1e-9
"""Scores this close are the same score (a validation accuracy "at the majority rate")."""


def _no_better_than_trivial(evals: list[dict], cfg, watch: str, direction: Direction, results: dict,
                            baselines: dict | None) -> list[dict]:
    """The tuned model against the trivial baselines on the watched metric: no better than some of them on test
    (else validation; each such baseline named), or validation sitting at one baseline's score at every
    evaluation (a classifier stuck on one class). A new random head makes "better than base" easy; these make
    it honest."""
    if direction is None or not baselines:
        return []
    found = []
    split = "test" if "test" in results else "validation"
    scored = [(name, b) for name, b in baselines.items() if watch in (b.get(split) or {})]
    tuned = (results.get(split) or {}).get(watch)
    if tuned is not None:
        # every baseline it does not beat, the weakest first: "no better than always predicting 'pos'" says most
        beaten_by = [(name, b) for name, b in scored if not better(direction, tuned, b[split][watch])]
        beaten_by.sort(key=lambda nb: nb[1][split][watch], reverse=direction == "min")
        if beaten_by:
            found.append({"finding": f"tuned {split} {watch} {tuned:.4f} is no better than " + ", nor than ".join(
                              f"{b['about']} ({name} baseline {b[split][watch]:.4f})" for name, b in beaten_by),
                          "suggestion": _learn_more(cfg)})
    scores = [e[watch] for e in evals if watch in e]
    for name, b in baselines.items():
        rate = (b.get("validation") or {}).get(watch)
        if rate is not None and len(scores) >= 2 and all(abs(v - rate) <= SAME for v in scores):
            found.append({"finding": f"validation {watch} sat at {rate:.4f}, the {name} baseline's ({b['about']}), "
                                     f"at all {len(scores)} evaluations",
                          "suggestion": _learn_more(cfg)})
            break
    return found


def _learn_more(cfg) -> str:
    """The change to try for a model that learned no more than the label shares, from the run's settings."""
    return "check that the labels match the texts; then " + advice.render(advice.underfitting(cfg))
