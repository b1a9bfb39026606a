"""`tunesmith sweep CONFIG --space SPACE.yaml --trials N`: a hyperparameter search over one run config.

    tunesmith sweep examples/sentiment-lora.yaml --space space.yaml --trials 20

The space file maps dotted config keys to a range or a list of choices (docs/sweep.md):

    train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}
    tuning.r: {choices: [4, 8, 16]}
    train.epochs: {low: 1, high: 3, step: 1}

Optuna proposes values (TPE, seeded by train.seed) and a median pruner stops a trial whose validation metric,
reported at each evaluation through the loop's `on_eval` hook, falls behind the earlier trials at the same
step. Each trial is a normal run folder `<output.dir>/<name>-trial-<k>` trained by `run.train`; a pruned one
ends like an early-stopped run (test scores, weights, summary) and its summary says `"sweep": {"state":
"pruned"}`. The study lives in --storage (default: sqlite `<output.dir>/<name>-sweep.db`): the same command
run again continues it, and --trials counts every trial of the study (a trial interrupted by a kill is
resumed from its checkpoint in its own folder, under a new trial number). At the end: a table of the trials,
the best config as YAML (`<name>-best.yaml`, which `tunesmith train` runs) and the study as JSON
(`<name>-sweep.json`), both in output.dir.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .artifacts import try_lock
from .errors import ConfigError, TunesmithError

RANGE_FIELDS = ("low", "high", "log", "step")


@dataclass
class Param:
    """One searched key: a list of choices, or a range (int when low, high and step are whole numbers)."""

    key: str
    where: str
    choices: list | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None

    @property
    def is_int(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.key, self.choices)
        if self.is_int:
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def candidates(self) -> list:
        """The values checked against the config schema before the search starts: each choice, or both ends of a
        range and, for a float range, a value between them (a float range on a whole-number key fails there)."""
        if self.choices is not None:
            return list(self.choices)
        if self.is_int or self.step is not None:
            return [self.low, self.high]
        inside = math.sqrt(self.low * self.high) if self.log else self.low + (self.high - self.low) / math.pi
        return [self.low, self.high, inside]

    def describe(self) -> dict:
        if self.choices is not None:
            return {"choices": self.choices}
        return {"low": self.low, "high": self.high, "log": self.log, "step": self.step,
                "type": "int" if self.is_int else "float"}


# ---------------------------------------------------------------------------------------------
# The space file


def read_space(path: str | Path) -> list[Param]:
    """The space file's parameters; every problem a ConfigError at its file:line, all of them at once."""
    from .config import read_yaml

    data, src = read_yaml(path)
    if not data:
        raise ConfigError("the space file names no keys to search", where=str(path),
                          hint="map dotted config keys to ranges or choices, e.g. `train.lr: {low: 1.0e-5, "
                               "high: 1.0e-3, log: true}` (see docs/sweep.md)")
    params, errors = [], []
    for key, spec in data.items():
        where = src.where((key,))
        try:
            params.append(_param(str(key), spec, where, src))
        except ConfigError as e:
            errors.append(e)
    if errors:
        raise ConfigError(errors[0].message, where=errors[0].where, hint=errors[0].hint, more=errors[1:])
    return params


def _param(key: str, spec, where: str, src) -> Param:
    if not key or key.startswith(".") or key.endswith(".") or ".." in key:
        raise ConfigError(f"{key!r} is not a dotted config key", where=where, hint="e.g. train.lr or tuning.r")
    if key == "name" or key.startswith("output."):  # the sweep names each trial's folder, inside output.dir
        raise ConfigError(f"{key} cannot be searched: the sweep names each trial's run folder and keeps it in "
                          "output.dir", where=where, hint="set name and output.dir in the config or as overrides")
    if not isinstance(spec, dict):
        raise ConfigError(f"expected a mapping with `choices`, or `low` and `high`; got {spec!r}", where=where,
                          hint="e.g. `{low: 1.0e-5, high: 1.0e-3, log: true}` or `{choices: [4, 8, 16]}`")
    if "choices" in spec:
        extra = [k for k in spec if k != "choices"]
        if extra:
            raise ConfigError(f"`choices` takes no other fields (found: {', '.join(map(str, extra))})", where=where)
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError("`choices` must be a non-empty list", where=src.where((key, "choices")))
        for c in choices:
            if not (c is None or isinstance(c, (str, int, float, bool))):
                raise ConfigError(f"choice {c!r} is not a single value (a number, string, boolean or null)",
                                  where=src.where((key, "choices")),
                                  hint="search a list-valued key through a key inside it, or a string value")
        choices = [_yaml12_float(c) for c in choices]
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError("`choices` lists a value twice", where=src.where((key, "choices")))
        return Param(key, where, choices=choices)
    unknown = [k for k in spec if k not in RANGE_FIELDS]
    if unknown:
        raise ConfigError(f"unknown field {unknown[0]!r}; a range takes {', '.join(RANGE_FIELDS)}, a list of values "
                          "takes `choices`", where=src.where((key, unknown[0])))
    for field in ("low", "high"):
        if field not in spec:
            raise ConfigError(f"a range needs `{field}`", where=where,
                              hint="give `low` and `high` (and optionally `log: true` or `step`), or `choices`")
    low, high = (_number(spec[f], src.where((key, f)), f) for f in ("low", "high"))
    step = _number(spec["step"], src.where((key, "step")), "step") if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"`log` must be true or false; got {log!r}", where=src.where((key, "log")))
    if not low < high:
        raise ConfigError(f"`low` ({low}) must be below `high` ({high})", where=where)
    if step is not None and step <= 0:
        raise ConfigError(f"`step` must be positive; got {step}", where=src.where((key, "step")))
    if step is not None and log:
        raise ConfigError("`log` and `step` cannot be combined (a log scale has no fixed step)", where=where)
    if log and low <= 0:
        raise ConfigError(f"a log range needs `low` above 0; got {low}", where=src.where((key, "low")))
    return Param(key, where, low=low, high=high, log=log, step=step)


def _yaml12_float(value):
    """`1e-5` as the number it means: PyYAML (YAML 1.1) reads a float without a dot as a string."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+", value):
        return float(value)
    return value


def _number(value, where: str, field: str) -> int | float:
    """A number from the space file; YAML reads `1e-5` (no dot) as a string, so numeric strings count too."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"`{field}` must be a number; got {value!r}", where=where)
    if isinstance(value, (int, float)):
        number = value
    else:
        try:
            number = float(str(value))
        except ValueError:
            raise ConfigError(f"`{field}` must be a number; got {value!r}", where=where) from None
    if not math.isfinite(number):
        raise ConfigError(f"`{field}` must be a finite number; got {value!r}", where=where)
    return number


def as_override(key: str, value) -> str:
    """`key=value` with the value written as YAML reads it back (`1e-05` alone would read as a string)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True)
    return f"{key}={text.removesuffix('...' + chr(10)).strip()}"


def check_space(space: list[Param], config: str | Path, overrides: list[str]):
    """Each value the space can give applied to the config (like a command-line override) and validated, so a
    misspelt key or a value the schema refuses fails here, at the space file's line, before any trial."""
    from .config import load_config

    base = load_config(config, overrides)  # the config's own problems first, reported as themselves
    errors = []
    for param in space:
        for value in param.candidates():
            try:
                load_config(config, [*overrides, as_override(param.key, value)])
            except ConfigError as e:
                errors.append(ConfigError(f"{param.key}: {value!r} does not fit the config: {e.message}",
                                          where=param.where, hint=e.hint))
                break
    if errors:
        raise ConfigError(errors[0].message, where=errors[0].where, hint=errors[0].hint, more=errors[1:])
    return base


# ---------------------------------------------------------------------------------------------
# The study


@dataclass
class Settings:
    """One sweep: the config and space, the metric, the study's storage, and the search and pruner settings."""

    config: Path
    overrides: list[str]
    space: list[Param]
    trials: int
    name: str
    out: Path
    metric: str
    direction: str
    storage: str
    startup_trials: int = 5
    prune_after: int = 2
    prune_warmup: int = 0
    prune: bool = True
    seed: int = 0
    force: bool = False


def pick_metric(cfg, metric: str | None) -> tuple[str, str]:
    """The metric trials are ranked by and its direction: --metric, else the one early stopping watches."""
    from .objectives import OBJECTIVES

    objective = OBJECTIVES[cfg.objective.kind]
    chosen = metric or cfg.train.early_stopping.metric or objective.MAIN_METRIC
    rankable = [m for m, d in objective.METRICS.items() if d is not None]
    if chosen not in rankable:
        raise ConfigError(f"{chosen!r} is not a validation metric of objective {cfg.objective.kind!r} with a better "
                          f"direction (choose from {', '.join(rankable)})", where="--metric")
    if cfg.eval.metrics and chosen not in cfg.eval.metrics:
        raise ConfigError(f"eval.metrics leaves out {chosen!r}, the metric the sweep ranks trials by",
                          where="eval.metrics", hint=f"add {chosen} to eval.metrics, or pick --metric among them")
    return chosen, objective.METRICS[chosen]


def sweep(config: str | Path, space_file: str | Path, trials: int, *, storage: str | None = None,
          metric: str | None = None, overrides: list[str] = (), startup_trials: int = 5, prune_after: int = 2,
          prune_warmup: int = 0, prune: bool = True, force: bool = False) -> dict:
    """Run (or continue) the study until it holds `trials` finished trials; returns the study as a dict (also
    written to `<output.dir>/<name>-sweep.json`)."""
    overrides = list(overrides)
    _optuna()  # before any work: a missing library is the first thing to say
    space = read_space(space_file)
    base = check_space(space, config, overrides)
    chosen, direction = pick_metric(base, metric)
    out = Path(base.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(Path(config), overrides, space, trials, base.name, out, chosen, direction,
                        storage or f"sqlite:///{(out / f'{base.name}-sweep.db').resolve()}", startup_trials,
                        prune_after, prune_warmup, prune, base.train.seed, force)
    with _sweep_lock(out / f"{base.name}-sweep.lock"):
        study = open_study(settings)
        _resume_interrupted(study)
        try:
            while len(finished(study)) < trials:
                run_trial(study, settings)
        except KeyboardInterrupt:
            print(f"sweep interrupted: run the same command again to continue the study ({settings.storage})")
            raise
        return report(study, settings)


class _sweep_lock:
    """One sweep process per study: a second one would take the first's running trials for interrupted ones."""

    def __init__(self, path: Path):
        self.path, self.handle = path, None

    def __enter__(self):
        self.handle = open(self.path, "a+", encoding="utf-8")
        if not try_lock(self.handle, tries=1):
            self.handle.close()
            raise TunesmithError("another `tunesmith sweep` of this study is running", where=str(self.path),
                                 hint="wait for it to end; the same command then continues the study") from None
        return self

    def __exit__(self, *exc):
        self.handle.close()


def _optuna():
    try:
        import optuna
    except ImportError:
        raise TunesmithError("tunesmith sweep needs Optuna, which is not installed",
                             hint="pip install -c constraints.txt 'tunesmith[sweep]' (or: pip install optuna)") from None
    return optuna


def open_study(s: Settings):
    """The study in the storage, made if new; refuses a storage whose study searched another space or metric."""
    optuna = _optuna()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {p.key: p.describe() for p in s.space}
    try:
        study = optuna.create_study(storage=s.storage, study_name=s.name, load_if_exists=True,
                                    direction="maximize" if s.direction == "max" else "minimize")
    except (ValueError, ImportError, optuna.exceptions.OptunaError) as e:
        raise TunesmithError(f"cannot open the study storage: {e}", where="--storage",
                             hint="give an SQLAlchemy URL, e.g. sqlite:///runs/sweep.db") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's own errors (bad URL, unreachable database)
        if type(e).__module__.startswith("sqlalchemy"):
            raise TunesmithError(f"cannot open the study storage: {e}", where="--storage") from None
        raise
    saved = study.user_attrs
    if saved and (saved.get("space") != space or saved.get("metric") != s.metric):
        what = "space" if saved.get("space") != space else f"metric ({saved.get('metric')})"
        raise TunesmithError(f"the study {s.name!r} in {s.storage} searched another {what}",
                             hint="use the space and metric it started with, or a new --storage to start afresh")
    if not saved:
        study.set_user_attr("space", space)
        study.set_user_attr("metric", s.metric)
        study.set_user_attr("config", str(s.config))
    # Seeded by train.seed and the trials so far: a continued study does not propose its first trials again.
    study.sampler = optuna.samplers.TPESampler(seed=s.seed + len(study.trials), n_startup_trials=s.startup_trials)
    study.pruner = optuna.pruners.MedianPruner(n_startup_trials=s.prune_after, n_warmup_steps=s.prune_warmup) \
        if s.prune \
        else optuna.pruners.NopPruner()
    return study


def finished(study) -> list:
    """The trials that count towards --trials: completed, pruned, or failed (diverged); not interrupted ones
    (they continue as a new trial) and not running ones."""
    from optuna.trial import TrialState

    return [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and not t.user_attrs.get("interrupted"))]


def _resume_interrupted(study) -> None:
    """A trial left running by a killed sweep (none can be alive: the sweep lock is ours) is marked failed and
    queued again with the same values and run folder, so it continues from that folder's last checkpoint."""
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        optuna.trial.Trial(study, t._trial_id).set_user_attr("interrupted", True)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(t.params, user_attrs={"run": t.user_attrs.get("run"), "resumes": t.number})
        print(f"trial {t.number} was interrupted: it continues from its run folder {t.user_attrs.get('run')}")


def trial_config(s: Settings, params: dict, run_name: str):
    from .config import load_config

    return load_config(s.config, [*s.overrides, *(as_override(k, v) for k, v in params.items()),
                                  f"name={run_name}"])


def run_trial(study, s: Settings) -> None:
    """Ask for a trial, train its run folder with the pruner watching, tell the study how it ended."""
    from optuna.trial import TrialState

    from . import artifacts
    from .run import train
    from .train.loop import TrainingDiverged

    trial = study.ask()
    params = {p.key: p.suggest(trial) for p in s.space}
    run_name = trial.user_attrs.get("run") or f"{s.name}-trial-{trial.number}"
    trial.set_user_attr("run", run_name)
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    print(f"\n=== sweep {s.name}: trial {trial.number} ({run_name}): {shown} ===", flush=True)
    try:
        cfg = trial_config(s, params, run_name)
    except ConfigError as e:  # a combination of values the config refuses (each value alone was checked)
        trial.set_user_attr("error", e.render())
        study.tell(trial, state=TrialState.FAIL)
        print(f"warning: trial {trial.number} skipped: {e.render()}")
        return
    run_dir = Path(cfg.output.dir) / run_name

    def on_eval(step: int, scores: dict) -> bool:
        if s.metric not in scores:
            return False
        trial.report(float(scores[s.metric]), step)
        return trial.should_prune()

    if "resumes" in trial.user_attrs and artifacts.is_finished(run_dir):
        summary = artifacts.read_json(run_dir / artifacts.SUMMARY)  # it finished; only the study was not told
    else:
        resume = "resumes" in trial.user_attrs and (run_dir / artifacts.CONFIG).exists()
        try:
            summary = train(cfg, resume=resume, force=s.force or ("resumes" in trial.user_attrs and not resume),
                            on_eval=on_eval)
        except TrainingDiverged as e:  # a value too far out (lr): the search goes on without it
            trial.set_user_attr("error", e.message)
            study.tell(trial, state=TrialState.FAIL)
            print(f"trial {trial.number} failed: {e.message}")
            return
    value = (summary.get("validation") or {}).get(s.metric)
    if value is None:
        raise TunesmithError(f"trial {trial.number} ({run_dir}) reported no validation {s.metric}; the sweep ranks "
                             "trials on the validation split", where=str(s.config),
                             hint="give the run a validation split (data.validation, or data.split.validation > 0)")
    pruned = bool((summary.get("train") or {}).get("halted"))
    state = TrialState.PRUNED if pruned else TrialState.COMPLETE
    summary["sweep"] = {"study": s.name, "storage": s.storage, "trial": trial.number, "params": params,
                        "state": "pruned" if pruned else "complete", "metric": s.metric, "value": value}
    artifacts.write_json(run_dir / artifacts.SUMMARY, summary)
    trial.set_user_attr("validation", value)
    study.tell(trial, None if pruned else value, state=state)
    print(f"trial {trial.number}: {'pruned' if pruned else 'complete'}, validation {s.metric} {value:.4f}")


# ---------------------------------------------------------------------------------------------
# The outcome


def _trial_row(t) -> dict:
    state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
    value = t.value if t.value is not None else t.user_attrs.get("validation")
    return {"number": t.number, "run": t.user_attrs.get("run"), "state": state, "value": value, "params": t.params,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
            **({"resumes": t.user_attrs["resumes"]} if "resumes" in t.user_attrs else {})}


def report(study, s: Settings) -> dict:
    """Print the table of trials; write the best config (YAML) and the study (JSON) into output.dir."""
    from optuna.trial import TrialState

    rows = [_trial_row(t) for t in study.trials]
    best = None
    if any(t.state == TrialState.COMPLETE for t in study.trials):
        t = study.best_trial
        path = write_best(s, t.params, t.number, t.value)
        best = {"number": t.number, "run": t.user_attrs.get("run"), "value": t.value, "params": t.params,
                "config": str(path)}
    result = {"study": s.name, "storage": s.storage, "config": str(s.config), "overrides": s.overrides,
              "metric": s.metric, "direction": s.direction, "space": {p.key: p.describe() for p in s.space},
              "trials_wanted": s.trials, "trials_finished": len(finished(study)), "best": best, "trials": rows}
    from .artifacts import write_json

    write_json(s.out / f"{s.name}-sweep.json", result)
    print(render_table(rows, s))
    if best:
        print(f"\nbest: trial {best['number']} ({best['run']}), validation {s.metric} {best['value']:.4f}")
        print(f"best config: {best['config']}  (tunesmith train {best['config']})")
    else:
        print("\nno trial completed yet, so there is no best config")
    print(f"study: {s.out / f'{s.name}-sweep.json'} (storage {s.storage})")
    return result


def render_table(rows: list[dict], s: Settings) -> str:
    keys = [p.key for p in s.space]
    head = ["trial", "run", "state", s.metric, *keys]
    cells = [[str(r["number"]), r["run"] or "-", r["state"], "-" if r["value"] is None else f"{r['value']:.4f}",
              *(_cell(r["params"].get(k)) for k in keys)] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n" + "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_best(s: Settings, params: dict, number: int, value: float) -> Path:
    """The config file as written, with the command line's overrides and the best trial's values applied, its
    paths made absolute (the file lives in output.dir), validated, as `<output.dir>/<name>-best.yaml`."""
    from .config import apply_override, read_yaml, validate

    data, src = read_yaml(s.config.resolve())
    name = f"{s.name}-best"
    for text in [*s.overrides, *(as_override(k, v) for k, v in params.items()), f"name={name}"]:
        apply_override(data, text, src)
    validate(data, src)
    path = s.out / f"{name}.yaml"
    header = (f"# tunesmith train {path}\n"
              f"# The best trial ({number}, validation {s.metric} {value:.4f}) of `tunesmith sweep {s.config}`;\n"
              f"# searched: {', '.join(p.key for p in s.space)}.\n")
    text = header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path

