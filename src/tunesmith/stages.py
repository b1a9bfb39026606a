"""Multi-stage (hybrid) runs: one config whose `stages:` run one after another, e.g. sft -> reward -> ppo.

Each stage is a partial config over the top-level keys: a section it names overrides the top-level one key
by key (a `tuning`, `objective` or `regime` of another `kind` replaces it whole). Each stage is a normal
run folder, `<output.dir>/<name>/stages/<i>-<stage>/`, and `<name>/summary.json` holds each stage's
headline metrics.

Chaining: a stage starts from the policy the last causal-LM stage produced (sft, clm, ppo ...), unless it
names its own `model:` (`stage:<name>` names an earlier stage's policy). A LoRA (or other mergeable) stage's
adapter is merged into its base before the next stage, which then tunes the merged model afresh (a new
adapter on merged weights, no stacking): every stage's output is then a plain model folder, and a later
stage's reference (ppo's KL) is exactly where that stage started. A reward or classifier stage starts from
the previous policy's weights too (its body; a new head) and is named by a later ppo stage with
`objective: {reward: {run: stage:<name>}}`.

Every stage is validated before anything trains; a mistake in stage 3 fails at once as `stages[2]...`.
`--resume` skips finished stages and resumes the interrupted one from its checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from . import artifacts
from .config import RunConfig, apply_override, check_run_name, read_yaml, validate
from .errors import ConfigError, TunesmithError
from .objectives import OBJECTIVES
from .report import html

KINDED = ("tuning", "objective", "regime")
STAGE_REF = "stage:"


@dataclass
class Stage:
    index: int
    name: str
    cfg: RunConfig
    """The stage's validated config; `model.name` and reward runs may still be `stage:` references."""
    own_model: bool
    """The stage names its model (else it starts from the previous policy stage's output)."""


@dataclass
class Staged:
    name: str
    root: Path
    stages: list[Stage]
    text: str
    """The config file's text, kept in the run folder."""


class _StageSource:
    """Error places inside stage i: keys the stage sets point at its lines, the rest at the top level."""

    def __init__(self, src, index: int, stage: dict):
        self.src, self.index, self.stage, self.path = src, index, stage, src.path

    def where(self, loc: tuple) -> str:
        if loc and loc[0] in self.stage:
            return self.src.where(("stages", self.index) + tuple(loc))
        return f"{self.src.where(tuple(loc))} in stages[{self.index}]"


def merge(top: dict, stage: dict) -> dict:
    """The stage's keys over the top-level ones, section by section."""
    out = copy.deepcopy(top)
    for key, value in stage.items():
        base = out.get(key)
        if key in KINDED:
            base = {"kind": base} if isinstance(base, str) else base
            value = {"kind": value} if isinstance(value, str) else value
            if isinstance(base, dict) and isinstance(value, dict) and base.get("kind") != value.get("kind", base.get("kind")):
                base = None  # another kind: its fields would not fit
        if key == "model":
            base = {"name": base} if isinstance(base, str) else base
            value = {"name": value} if isinstance(value, str) else value
        out[key] = merge(base, value) if isinstance(base, dict) and isinstance(value, dict) else copy.deepcopy(value)
    return out


def is_staged(path: str | Path) -> bool:
    data, _ = read_yaml(path)
    return "stages" in data


def load(path: str | Path, overrides: list[str] = ()) -> Staged:
    """Read a staged config and validate every stage (overrides apply to the top-level keys)."""
    data, src = read_yaml(path)
    for text in overrides:
        apply_override(data, text, src)
    data.setdefault("name", Path(path).stem)
    raw = data.pop("stages")
    try:
        check_run_name(str(data["name"]))
    except ValueError as e:
        raise ConfigError(str(e), where=src.where(("name",))) from None
    if not isinstance(raw, list) or not raw:
        raise ConfigError("stages must be a non-empty list of partial configs", where=src.where(("stages",)))
    root = Path((data.get("output") or {}).get("dir", "runs")) / str(data["name"])
    stages, names = [], []
    for i, stage in enumerate(raw):
        if not isinstance(stage, dict):
            raise ConfigError("a stage is a mapping of config keys", where=src.where(("stages", i)))
        stage = dict(stage)
        kind = merge(data, {k: v for k, v in stage.items() if k == "objective"}).get("objective", {}).get("kind")
        name = str(stage.pop("name", None) or kind or f"stage{i + 1}")
        if name in names:
            raise ConfigError(f"two stages are named {name!r}; give each a distinct name", where=src.where(("stages", i)))
        where = _StageSource(src, i, stage)
        if "output" in stage:
            raise ConfigError("a stage cannot set output: stage folders are <output.dir>/<name>/stages/<i>-<stage>",
                              where=where.where(("output",)))
        merged = merge(data, stage)
        if _student_from_teacher(merged) and "model" not in stage:
            merged.pop("model", None)  # a student built from its teacher's layers starts from the teacher
        _drop_unused_inherited(merged, stage)
        merged["name"] = f"{i + 1}-{name}"
        merged["output"] = {"dir": str(root / "stages")}
        cfg = validate(merged, where, f"stages[{i}]")
        own = "model" in stage
        _check_refs(cfg, names, where, own)
        stages.append(Stage(i, name, cfg, own))
        names.append(name)
    return Staged(str(data["name"]), root, stages, Path(path).read_text(encoding="utf-8"))


def _student_from_teacher(raw: dict) -> bool:
    objective = raw.get("objective")
    distill = objective.get("distill") if isinstance(objective, dict) else None
    return isinstance(distill, dict) and distill.get("keep_layers") is not None


def _drop_unused_inherited(merged: dict, stage: dict) -> None:
    """Loop settings the top level sets for its other stages (eval_every for an sft stage, say) are not passed to
    a stage whose objective does not take them; a stage that sets one itself is still refused by its check."""
    objective = merged.get("objective")
    kind = objective.get("kind") if isinstance(objective, dict) else objective
    unused = getattr(OBJECTIVES.get(kind), "UNUSED_TRAIN_SETTINGS", {})
    train, own = merged.get("train"), stage.get("train") or {}
    if isinstance(train, dict) and isinstance(own, dict):
        for key in unused:
            if key not in own:
                train.pop(key, None)


def _check_refs(cfg: RunConfig, earlier: list[str], where, own: bool) -> None:
    refs = [(("model", "name"), cfg.model.name)]
    distill = getattr(cfg.objective, "distill", None)
    if distill is not None:
        refs.append((("objective", "distill", "teacher"), distill.teacher))
    reward = getattr(cfg.objective, "reward", None)
    if reward is not None and reward.run:
        refs.append((("objective", "reward", "run"), reward.run))
    for loc, value in refs:
        if value.startswith(STAGE_REF) and value[len(STAGE_REF):] not in earlier:
            raise ConfigError(f"{value!r} names no earlier stage (earlier: {', '.join(earlier) or 'none'})",
                              where=where.where(loc))
    if reward is not None and reward.function:
        from .objectives.rewards import import_function

        import_function(reward.function, where.where(("objective", "reward", "function")))


# ---------------------------------------------------------------------------------------------
# Running


def policy_folder(run_dir: Path, trust_remote_code: bool = False) -> Path:
    """A plain model folder holding a finished stage's policy: its full weights, or its adapter merged."""
    from .models.load import quiet_transformers

    summary = artifacts.read_json(run_dir / artifacts.SUMMARY)
    weights = run_dir / summary["weights"]
    if summary["weights"] == "model":
        return weights
    out = run_dir / "merged"
    if (out / "config.json").exists():
        return out
    from .export.merge import merge as fold
    from .trained import load_trained

    trained = load_trained(run_dir, trust_remote_code=trust_remote_code)
    model = fold(trained.model)
    tmp = run_dir / ".merged-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        trained.tokenizer.save_pretrained(tmp)
    artifacts.honour_umask(tmp)
    tmp.rename(out)
    return out


def resolve(stage: Stage, policy: Path | None, runs: dict[str, Path], policies: dict[str, Path]) -> RunConfig:
    """The stage's config with its starting model and `stage:` references made into folders."""
    cfg = stage.cfg
    name = cfg.model.name
    update = {}
    distill = getattr(cfg.objective, "distill", None)
    if distill is not None and distill.teacher.startswith(STAGE_REF):  # a teacher trained by an earlier stage
        teacher = str(runs[distill.teacher[len(STAGE_REF):]])
        distill = distill.model_copy(update={"teacher": teacher})
        update["objective"] = cfg.objective.model_copy(update={"distill": distill})
    if distill is not None and distill.keep_layers is not None:
        name = distill.teacher  # the student is built from the teacher's layers (distilling.student_config)
    elif name.startswith(STAGE_REF):
        ref = name[len(STAGE_REF):]
        if ref not in policies:
            raise TunesmithError(f"stage {stage.name!r} starts from stage {ref!r}, which produced no policy "
                                 "(a causal language model)", where=f"stages[{stage.index}].model")
        name = str(policies[ref])
    elif not stage.own_model and policy is not None:
        name = str(policy)
    update["model"] = cfg.model.model_copy(update={"name": name})
    reward = getattr(cfg.objective, "reward", None)
    if reward is not None and reward.run and reward.run.startswith(STAGE_REF):
        run = runs[reward.run[len(STAGE_REF):]]
        update["objective"] = cfg.objective.model_copy(update={"reward": reward.model_copy(update={"run": str(run)})})
    return cfg.model_copy(update=update)


def headline(summary: dict) -> dict:
    """What summary.json across stages keeps of one stage."""
    held = "test" if "test" in summary else "validation" if "validation" in summary else None
    base = (summary.get("base") or {}).get(held) if held else None
    return {"split": held, "tuned": summary.get(held) if held else None, "base": base,
            "steps": (summary.get("train") or {}).get("steps"), "wall_seconds": summary.get("wall_seconds")}


def run(staged: Staged, *, resume: bool = False, force: bool = False) -> dict:
    from .run import train

    started, root = time.perf_counter(), staged.root
    # --resume of a finished staged run goes on when a stage is missing or unfinished (its folder removed to
    # run it again with other settings): the finished stages are kept
    reopen = any(not artifacts.is_finished(root / "stages" / stage.cfg.name) for stage in staged.stages)
    artifacts.check_run_dir(root, resume=resume, force=force, reopen=reopen)
    lock = artifacts.claim_run_dir(root, resume=resume, force=force, reopen=reopen)
    policy, runs, policies, results = None, {}, {}, []
    try:
        (root / artifacts.SUMMARY).unlink(missing_ok=True)  # rewritten when every stage has finished
        (root / "staged-config.yaml").write_text(staged.text, encoding="utf-8")
        artifacts.set_status(root, "running")
        for stage in staged.stages:
            run_dir = root / "stages" / stage.cfg.name
            print(f"\n=== stage {stage.index + 1}/{len(staged.stages)}: {stage.name} ({stage.cfg.objective.kind}) ===")
            if artifacts.is_finished(run_dir):
                print(f"finished earlier; kept: {run_dir}")
                summary = artifacts.read_json(run_dir / artifacts.SUMMARY)
            else:
                cfg = resolve(stage, policy, runs, policies)
                summary = train(cfg, resume=resume and run_dir.exists())
            runs[stage.name] = run_dir
            if OBJECTIVES[stage.cfg.objective.kind].HEAD == "causal-lm":
                policy = policies[stage.name] = policy_folder(run_dir, stage.cfg.model.trust_remote_code)
            results.append({"stage": stage.name, "objective": stage.cfg.objective.kind,
                            "run": str(run_dir.relative_to(root)), **headline(summary)})
        summary = {"name": staged.name, "stages": results,
                   "policy": str(policy.relative_to(root)) if policy else None,
                   "wall_seconds": round(time.perf_counter() - started, 1)}
        artifacts.set_status(root, "completed")
        artifacts.write_json(root / artifacts.SUMMARY, summary)
        html.write_after_run(root)
    except BaseException as e:
        artifacts.set_status(root, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        artifacts.release(lock)
    print("\nstages")
    for r in results:
        tuned = ", ".join(f"{k} {v:.4f}" for k, v in (r["tuned"] or {}).items() if isinstance(v, float))
        print(f"  {r['stage']:<12}{r['objective']:<10}{tuned}")
    print(f"\nstaged run saved to {root}")
    return summary
