"""The run config: one YAML file, typed and validated, plus `a.b=c` overrides from the command line.

Errors name the file and line, the key's dotted path, and for a misspelt key the nearest valid one.
Tuning, objective and regime sections are the `Config` classes of the modules in their registries,
picked by their `kind` key.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .axes import Methods, metric_directions
from .data.config import SEED_MAX, ChecksConfig, DataConfig, LeakageConfig, Policy, SplitConfig  # noqa: F401 (re-exported)
from .errors import ConfigError
from .objectives import DEFAULT as DEFAULT_OBJECTIVE
from .objectives import OBJECTIVES, distill
from .regimes import DEFAULT as DEFAULT_REGIME
from .regimes import REGIMES
from .schema import Section, number_problem
from .tuning import DEFAULT as DEFAULT_TUNING
from .tuning import TUNINGS


def _union(registry: dict) -> Any:
    members = tuple(m.Config for m in registry.values())
    return Annotated[Union[members], Field(discriminator="kind")] if len(members) > 1 else members[0]


TuningConfig = _union(TUNINGS)
ObjectiveConfig = _union(OBJECTIVES)
RegimeConfig = _union(REGIMES)


class ModelConfig(Section):
    name: str
    """The base model: `sample:<name>` (see `tunesmith pull --list`), a local folder, a hub id (online),
    or `arch:<model_type>` (e.g. `arch:llama`) for an untrained model built from its default config."""
    config: dict[str, Any] = {}
    """Overrides applied to the model's config before it is built (e.g. `num_hidden_layers: 2`)."""
    tokenizer: Optional[str] = None
    """Where to load the tokenizer from, when not from `name` (required with `arch:` models to train)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Dtype of the frozen base weights: auto is float32 on CPU and for full fine-tuning, bfloat16 for a
    frozen base on a GPU that supports it."""
    trust_remote_code: bool = False
    """Allow a model that ships its own Python code to run it, for this run only (same as `--trust-remote-code`;
    a warning is printed). Commands that read a finished run folder (eval, predict, generate, chat, compare,
    export) ignore this saved value: only their own `--trust-remote-code` flag allows the code to run."""


class EarlyStoppingConfig(Section):
    enabled: bool = True
    """Stop when the validation metric stops improving (needs a validation split)."""
    metric: Optional[str] = None
    """Validation metric to watch; default: the objective's main metric (e.g. accuracy, loss)."""
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before stopping (a tie won on the loss is an improvement)."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement. A score at least as good as the best but not better by
    more than this is a tie: the evaluation with the lower validation loss wins it (becomes the best checkpoint)."""


class TrainConfig(Section):
    epochs: float = Field(3, gt=0, le=100_000)
    """Passes over the training data (fractions allowed)."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = Field(16, ge=1)
    """Examples per micro-batch on each process."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the effective batch is batch_size x grad_accum x processes."""
    lr: float = Field(2e-5, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay (not applied to biases and norms)."""
    warmup: float = Field(0.06, ge=0)
    """Warmup length: a fraction of all steps if < 1, else a number of steps."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Learning-rate decay after warmup."""
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    """Clip the gradient norm to this value (null: no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Compute precision: auto is fp32 on CPU (no bf16 hardware there) and bf16 on GPUs that support it."""
    seed: int = Field(0, ge=0, le=SEED_MAX)
    """One seed (0 to 2^32 - 1) for data order, initialisation and dropout; a CPU run with the same seed repeats exactly."""
    group_by_length: bool = True
    """Batch examples of similar length together to cut padding (order is still shuffled)."""
    gradient_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute the rest during backward: less memory
    for one extra forward per step (sft-alpaca-lora at 8 x 512 tokens on CPU, 4 steps: peak RSS 11.7 GiB without
    it, 4.72 GiB with it; 37% slower per step).
    The loss and gradients are unchanged. qlora has its own switch, on by default."""
    eval_every: Union[Annotated[int, Field(ge=1)], Literal["epoch"]] = "epoch"
    """Evaluate on validation every N optimizer steps, or at the end of each epoch."""
    save_every: Optional[int] = Field(None, ge=1)
    """Checkpoint every N steps for --resume (default: at every evaluation)."""
    log_every: int = Field(10, ge=1)
    """Write a line to metrics.jsonl every N optimizer steps."""
    eval_batch_size: Optional[int] = Field(None, ge=1)
    """Batch size for evaluation (default: 2 x batch_size)."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Early stopping on a validation metric, restoring the best checkpoint at the end."""
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = []
    """Experiment trackers that also receive the config, every metrics.jsonl line and the final scores (through
    accelerate). Local by default: TensorBoard under <run>/trackers, an MLflow file store at <run>/mlruns
    (unless MLFLOW_TRACKING_URI is set), W&B offline (unless WANDB_MODE is set)."""

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, names: list[str]) -> list[str]:
        from .report.trackers import missing

        if (why := missing(names)) is not None:
            raise ValueError(why)
        return names


class GenerateConfig(Section):
    max_new_tokens: int = Field(256, ge=1)
    """Most tokens generated per prompt; a generation that reaches it before its end-of-turn token did not stop."""
    prompts: int = Field(50, ge=0)
    """Test prompts that base and tuned model answer at the end of an sft run (0: no generation metrics)."""
    batch_size: int = Field(8, ge=1)
    """Prompts generated together (left-padded)."""
    do_sample: bool = False
    """Sample (seeded by train.seed) instead of decoding greedily."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature (with do_sample)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest set of tokens with this much probability (with do_sample)."""
    repetition_penalty: float = Field(1.0, gt=0)
    """Divide the scores of tokens already generated by this (1.0: off)."""
    metrics: Optional[list[Literal["rouge1", "rouge2", "rougeL", "exact_match"]]] = None
    """Text metrics against the reference responses; null: ROUGE-1/2/L, plus exact match when the references
    are short (median 10 words or fewer). The stop rate is always reported."""


class ForgettingConfig(Section):
    """General-domain held-out text scored before and after training.

    Language models report its perplexity, classifiers the drift of their body's representation."""

    enabled: bool = True
    """Run the probe (it reads the probe text before training, like the task data)."""
    data: list[str] = ["sample:wiki-demo", "sample:c4-demo"]
    """Plain text sources with a `text` column; from a folder or sample, `split` is read."""
    split: str = "test"
    """Which split of the sources is the probe (replay and EWC read `train`, so the probe stays unseen)."""
    max_rows: int = Field(64, ge=1)
    """Texts taken from each source."""
    max_length: int = Field(256, ge=8)
    """Tokens per probe text."""
    max_increase: float = Field(0.1, ge=0)
    """Language models: warn when the probe's perplexity rises by more than this fraction (0.1: 10%)."""
    max_drift: float = Field(0.2, ge=0, le=1)
    """Classifiers: warn when the representation drift (1 - linear CKA, mean over layers) exceeds this."""


class EvalConfig(Section):
    metrics: Optional[list[str]] = None
    """Metrics to report (default: all the objective offers)."""
    compare_base: bool = True
    """Also score the starting model on the test and validation splits, so every run reports base vs tuned
    (and the diagnosis can tell whether training beat the start)."""
    generate: GenerateConfig = GenerateConfig()
    """Generation settings: for sft's generation metrics, and the defaults of generate, chat and compare."""
    forgetting: ForgettingConfig = ForgettingConfig()
    """The catastrophic-forgetting probe."""


class OutputConfig(Section):
    dir: str = "runs"
    """Parent folder of run folders; a run is written to <dir>/<name>."""


# One path component: letters, digits and `_ . + = @ -` (spaces inside), not starting with a dot. A name with a
# separator, `..` or an absolute path would put the run folder, and what `--force` deletes, outside output.dir.
RUN_NAME = re.compile(r"[\w+=@-][\w .+=@-]{0,127}")


def check_run_name(name: str) -> None:
    """Raise ValueError unless `name` is a single safe folder name."""
    if not RUN_NAME.fullmatch(name) or name.endswith((" ", ".")):
        raise ValueError(f"name: {name!r} is not a usable run name: a run name is one folder name inside output.dir "
                         "(letters, digits, `_ . + = @ -`, at most 128 characters, not starting with a dot or "
                         "ending with a space or dot; no `/`, `\\` or `..`), e.g. name: sentiment-lora")


class RunConfig(Section):
    name: str
    """Run name; the run folder is <output.dir>/<name>. Defaults to the config file's name. One folder name:
    letters, digits and `_ . + = @ -` (no `/` or `..`), so a run never writes outside output.dir."""
    model: ModelConfig
    """The base model to fine-tune."""
    data: DataConfig
    """Where the data comes from and how it is split and truncated."""
    tuning: TuningConfig = Field(default_factory=lambda: TUNINGS[DEFAULT_TUNING].Config())
    """Which parameters train (`kind`: full, freeze, lora, qlora, dora, ia3, prefix, prompt, adapter; see docs/peft.md)."""
    objective: ObjectiveConfig = Field(default_factory=lambda: OBJECTIVES[DEFAULT_OBJECTIVE].Config())
    """What is optimised (`kind`: classify, clm, mlm, sft, reward, dpo, ppo, grpo, embed)."""
    regime: RegimeConfig = Field(default_factory=lambda: REGIMES[DEFAULT_REGIME].Config())
    """How tasks are scheduled (`kind`: single, continual, meta)."""
    train: TrainConfig = TrainConfig()
    """The training loop."""
    eval: EvalConfig = EvalConfig()
    """What is measured after training."""
    output: OutputConfig = OutputConfig()
    """Where the run folder goes."""

    @model_validator(mode="before")
    @classmethod
    def _implied_sections(cls, data):
        """Top-level sections another section supplies: a multitask run's `data` defaults to its first task's (for
        the settings runs share, e.g. max_length), and a student built from its teacher's layers
        (`objective.distill.keep_layers`) has no `model` of its own: the teacher's is the start; an RL objective
        playing an environment (`objective.env`) reads no data (`data.train` is `env:<kind>`)."""
        if not isinstance(data, dict):
            return data
        regime, objective = data.get("regime"), data.get("objective")
        tasks = regime.get("tasks") if isinstance(regime, dict) else None
        if "data" not in data and isinstance(tasks, list) and tasks and isinstance(tasks[0], dict) and "data" in tasks[0]:
            data = {**data, "data": tasks[0]["data"]}
        keep = objective.get("distill") if isinstance(objective, dict) else None
        if isinstance(keep, dict) and keep.get("keep_layers") is not None and "model" not in data:
            data = {**data, "model": {"name": keep.get("teacher")}}
        env = objective.get("env") if isinstance(objective, dict) else None
        given = data.get("data", {})
        if isinstance(env, dict) and isinstance(given, dict) and "train" not in given:
            data = {**data, "data": {**given, "train": f"env:{env.get('kind')}"}}  # an environment reads no data
        return data

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        check_run_name(v)
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @field_validator("tuning", "objective", "regime", mode="before")
    @classmethod
    def _kind_shorthand(cls, v):
        return {"kind": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_combination(self):
        """The objective's metrics, then each chosen method's own `check` of rules that span axes."""
        methods = Methods(TUNINGS[self.tuning.kind], OBJECTIVES[self.objective.kind], REGIMES[self.regime.kind])
        directions = metric_directions(methods.objective)
        if getattr(self.objective, "distill", None) is not None:
            directions = {**directions, **distill.METRICS}
        metric = self.train.early_stopping.metric
        watchable = [m for m, d in methods.objective.METRICS.items() if d is not None]
        if metric is not None and metric not in watchable:
            raise ValueError(f"train.early_stopping.metric: {metric!r} is not a metric of objective "
                             f"{self.objective.kind!r} with a better direction (choose from {', '.join(watchable)})")
        for m in self.eval.metrics or []:
            if m not in directions:
                raise ValueError(f"eval.metrics: {m!r} is not a metric of objective {self.objective.kind!r} "
                                 f"(choose from {', '.join(directions)})")
        for method in (methods.tuning, methods.objective, methods.regime):
            if hasattr(method, "check"):
                method.check(self, methods)
        return self


# ---------------------------------------------------------------------------------------------
# Loading: YAML with line numbers -> overrides -> key check with suggestions -> pydantic.


class _Source:
    """Where each key of the raw config came from, for error messages."""

    def __init__(self, path: str):
        self.path = path
        self.lines: dict[tuple, int] = {}
        self.overrides: dict[tuple, str] = {}

    def where(self, loc: tuple) -> str:
        if not loc:
            return self.path
        dotted = dotted_key(loc)
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.overrides:
                return f"override {self.overrides[loc[:n]]!r} ({dotted})"
            if loc[:n] in self.lines:
                return f"{self.path}:{self.lines[loc[:n]]} ({dotted})"
        return f"{self.path} ({dotted})"


def dotted_key(loc: tuple) -> str:
    """`("stages", 2, "objective", "kind")` -> `stages[2].objective.kind`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


MAX_DEPTH, MAX_NODES = 64, 20_000
_STANDARD = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap")
_MERGE = "tag:yaml.org,2002:merge"


class _Walk:
    """State of one YAML-to-Python conversion: the collections on the current path (a recursive alias
    would loop forever) and how many nodes were visited (aliases can multiply a small file)."""

    def __init__(self, src: _Source):
        self.src, self.path, self.count = src, set(), 0

    def fail(self, node, what: str, hint: str | None = None):
        raise ConfigError(what, where=f"{self.src.path}:{node.start_mark.line + 1}", hint=hint)

    def convert(self, node, loc: tuple = ()):
        self.count += 1
        if self.count > MAX_NODES:
            self.fail(node, f"the config expands to more than {MAX_NODES:,} values (aliases?)")
        if len(loc) > MAX_DEPTH:
            self.fail(node, f"nested more than {MAX_DEPTH} levels deep", hint="a run config is a few levels deep")
        if isinstance(node, yaml.ScalarNode):
            try:
                return yaml.constructor.SafeConstructor().construct_object(node)
            except yaml.YAMLError as e:
                self.fail(node, f"cannot read this value: {getattr(e, 'problem', None) or e}",
                          hint="tags like !!python/... or !custom are not allowed in a config")
        if node.tag not in _STANDARD:
            self.fail(node, f"unsupported tag {node.tag!r}", hint="a config holds plain mappings, lists and values")
        if id(node) in self.path:
            self.fail(node, "a recursive alias (a value that contains itself)")
        self.path.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.convert(v, loc + (i,)) for i, v in enumerate(node.value)]
            return self.mapping(node, loc)
        finally:
            self.path.discard(id(node))

    def mapping(self, node, loc: tuple) -> dict:
        out, merged = {}, {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:  # `<<: *base` copies base's keys under those written here
                value = self.convert(value_node, loc)
                for part in value if isinstance(value, list) else [value]:
                    if not isinstance(part, dict):
                        self.fail(key_node, "`<<` merges mappings only")
                    merged.update({k: v for k, v in part.items() if k not in merged})
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, "a key must be a plain name, not a list or mapping")
            key = key_node.value
            if key in out:
                self.fail(key_node, f"key {key!r} appears twice")
            self.src.lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = self.convert(value_node, loc + (key,))
        return {**{k: v for k, v in merged.items() if k not in out}, **out}


def read_yaml(path: str | Path) -> tuple[dict, _Source]:
    """The raw config of a YAML file (UTF-8, or UTF-16/32 with a byte-order mark), its relative paths resolved
    from the file's folder, and where each key came from."""
    from .textfile import decode

    path = Path(path)
    src = _Source(str(path))
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a config file", hint="give the path of a YAML file")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read the config: {e.strerror or e}", where=str(path)) from None
    text = decode(raw, str(path), error=ConfigError, hint="save the config as UTF-8 text")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"not valid YAML: {getattr(e, 'problem', None) or e}", where=where) from None
    except RecursionError:
        raise ConfigError(f"nested too deeply to read (more than {MAX_DEPTH} levels)", where=str(path)) from None
    data = _Walk(src).convert(node) if node is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of keys to values", where=str(path))
    resolve_paths(data, path.parent)
    for stage in data.get("stages") or [] if isinstance(data.get("stages"), list) else []:
        if isinstance(stage, dict):
            resolve_paths(stage, path.parent)
    return data, src


# Keys that hold files or folders; in a config file, a relative one is read from the file's folder.
DATA_PATHS = (("data", "train"), ("data", "validation"), ("data", "test"))
DATA_LISTS = (("eval", "forgetting", "data"), ("regime", "replay", "data"), ("regime", "penalty", "fisher_data"))
MODEL_PATHS = (("model", "name"), ("model", "tokenizer"), ("objective", "reward", "run"), ("objective", "distill", "teacher"))


def _relative(value, base: Path, always: bool):
    """`value` read from `base` if it is a relative path; a model name that is not a path there (a hub id)
    is kept unless it starts with `.`."""
    if not isinstance(value, str) or not value or value.startswith(("sample:", "arch:", "stage:", "env:", "~", "/")):
        return value
    candidate = os.path.normpath(base / value)
    if always or value.startswith(".") or Path(candidate).exists():
        return candidate
    return value


def resolve_paths(data: dict, base: Path) -> None:
    """Make the file's relative paths relative to the working folder (or absolute), in place."""
    if isinstance(data.get("model"), str):
        data["model"] = {"name": data["model"]}
    for keys, always in [(k, True) for k in DATA_PATHS] + [(k, False) for k in MODEL_PATHS] + \
            [(k, True) for k in DATA_LISTS]:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict) or keys[-1] not in node:
            continue
        value = node[keys[-1]]
        if isinstance(value, list):
            node[keys[-1]] = [_relative(v, base, always) for v in value]
        else:
            node[keys[-1]] = _relative(value, base, always)
    tasks = data.get("regime", {}).get("tasks") if isinstance(data.get("regime"), dict) else None
    for task in tasks if isinstance(tasks, list) else []:  # each task of a regime has its own data section
        if isinstance(task, dict) and isinstance(task.get("data"), dict):
            resolve_paths({"data": task["data"]}, base)


SWITCHABLE = ("tuning", "objective", "regime")


def apply_override(data: dict, text: str, src: _Source) -> None:
    """Set `a.b.c=value` in the raw config; the value is parsed as YAML (`lr=1e-4`, `targets=[q,v]`).
    Switching a section's kind (`tuning.kind=full` on a lora config) starts that section afresh: the file's
    other keys for it are dropped (those from earlier overrides stay)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value", where="command line")
    key, _, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key", where="command line")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problem = str(getattr(e, 'problem', None) or e)
        hint = ("tags such as !!python/... are not allowed" if "constructor" in problem
                else "quote the whole override for the shell, e.g. 'train.lr=1e-4' or 'tuning.targets=[q, v]'")
        raise ConfigError(f"the value is not valid YAML: {problem}", where=f"override {text!r}", hint=hint) from None
    except RecursionError:
        raise ConfigError("the value is nested too deeply", where=f"override {text!r}") from None
    loc = tuple(int(p) if p.isdigit() else p for p in parts)  # `regime.tasks.1.data.max_length`: item 1 of a list
    node = data
    for i, part in enumerate(loc[:-1]):
        node = _child(node, part, parts, i, text)
    if isinstance(node, list):
        if not isinstance(loc[-1], int) or loc[-1] >= len(node):
            raise ConfigError(f"{'.'.join(parts[:-1])} is a list of {len(node)} items", where=f"override {text!r}")
    elif len(parts) == 2 and parts[0] in SWITCHABLE and parts[1] == "kind":
        default = RunConfig.model_fields[parts[0]].default_factory().kind
        if node.get("kind", default) != value:
            for k in [k for k in node if k != "kind" and (parts[0], k) not in src.overrides]:
                del node[k]
    node[loc[-1]] = value
    src.overrides[loc] = text


def _child(node, part, parts: tuple, i: int, text: str):
    """The section (or list of sections) an override descends into at `part`, made if missing."""
    if isinstance(node, list):
        if not isinstance(part, int) or part >= len(node):
            raise ConfigError(f"{'.'.join(parts[:i])} is a list of {len(node)} items; name one by its index "
                              f"(0 to {len(node) - 1})", where=f"override {text!r}")
        child = node[part]
    else:
        child = node.get(part)
        if isinstance(child, str) and part in ("model", *SWITCHABLE):
            # expand a shorthand (`tuning: lora`) so a nested override can land in it
            child = {"name": child} if part == "model" else {"kind": child}
            node[part] = child
        if child is None:
            child = node[part] = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section", where=f"override {text!r}")
    return child


def _unwrap(annotation):
    """The BaseModel classes an annotation allows (through Optional, Annotated, Union)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is Union or (origin is not None and str(origin) == "types.UnionType"):
        out = []
        for arg in typing.get_args(annotation):
            out += _unwrap(arg)
        return out
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _list_item(annotation):
    """The section class of a `list[Section]` annotation, else None."""
    if typing.get_origin(annotation) is list:
        classes = _unwrap(typing.get_args(annotation)[0])
        return classes[0] if len(classes) == 1 else None
    return None


def check_keys(data: dict, model: type[BaseModel], src: _Source, loc: tuple = (),
               found: list[ConfigError] | None = None) -> list[ConfigError]:
    """Unknown keys and unknown `kind`s, each reported with the nearest valid name, and numbers given as
    booleans or beyond 64 bits (removed from `data`, so the rest can be validated); every one of them."""
    found = [] if found is None else found
    fields = model.model_fields
    for key, value in list(data.items()):
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {dotted_key(loc + (close[0],))!r}?" if close else None
            valid = ", ".join(fields)
            found.append(ConfigError(f"unknown key {key!r}; valid keys here: {valid}", where=src.where(loc + (key,)),
                                     hint=hint))
            continue
        item = _list_item(fields[key].annotation)
        if item is not None and isinstance(value, list):  # a list of sections (a regime's tasks)
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    check_keys(v, item, src, loc + (key, i), found)
            continue
        problem = number_problem(fields[key].annotation, value)
        if problem:
            found.append(ConfigError(problem, where=src.where(loc + (key,))))
            del data[key]  # reported; the rest of the section is still validated
            continue
        classes = _unwrap(fields[key].annotation)
        if not classes or not isinstance(value, (dict, str)):
            continue
        if len(classes) > 1:  # a registry union: pick the member by its kind
            kinds = {c.model_fields["kind"].default: c for c in classes}
            kind = value.get("kind") if isinstance(value, dict) else value
            if kind not in kinds:
                close = difflib.get_close_matches(str(kind), list(kinds), n=1)
                found.append(ConfigError(
                    f"{kind!r} is not a known {key} kind; choose from {', '.join(kinds)}",
                    where=src.where(loc + (key, "kind") if isinstance(value, dict) else loc + (key,)),
                    hint=f"did you mean {close[0]!r}?" if close else None,
                ))
                continue
            classes = [kinds[kind]]
        if isinstance(value, dict):
            check_keys(value, classes[0], src, loc + (key,), found)
    return found


def _describe(value: Any) -> str:
    text = repr(value)
    return (text[:60] + "...") if len(text) > 63 else text


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config; every failure is a ConfigError naming its place."""
    data, src = read_yaml(path)
    for text in overrides:
        apply_override(data, text, src)
    data.setdefault("name", Path(path).stem)
    if "stages" in data:
        raise ConfigError("this config lists stages; it runs as a staged run (tunesmith train handles both)",
                          where=src.where(("stages",)))
    return validate(data, src)


def _raise_all(errors: list[ConfigError]) -> None:
    # one error per place: a value that fits no member of a union fails each member alike
    unique = list({(e.where or e.message): e for e in reversed(errors)}.values())[::-1]
    if unique:
        first = unique[0]
        raise ConfigError(first.message, where=first.where, hint=first.hint, more=unique[1:])


_KEYED = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.S)


def validate(data: dict, src, context: str = "") -> RunConfig:
    """The raw config as a RunConfig; every failure a ConfigError naming its place (`src.where`), all of them
    at once. `context` names the part of the file the data came from (a stage)."""
    data = copy.deepcopy(data)
    found = check_keys(data, RunConfig, src)
    objective = data.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("distill"), dict) and \
            objective["distill"].get("keep_layers") is not None and "model" in data:
        found.append(ConfigError("the student is built from the teacher's layers (objective.distill.keep_layers), so "
                                 "it has no model of its own", where=src.where(("model",)),
                                 hint="leave model out, or drop keep_layers to distil into the model named here"))
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        # unknown keys and kinds are already in `found`, with suggestions
        found += [_config_error(err, data, src, context) for err in e.errors(include_url=False)
                  if err["type"] not in ("extra_forbidden", "union_tag_invalid", "union_tag_not_found")]
        _raise_all(found)
        raise
    _raise_all(found)
    return cfg


def _key_path(dotted: str) -> tuple:
    """`tasks[1].objective.kind` -> ("tasks", 1, "objective", "kind"), a location `src.where` finds lines for."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"\.|\[|\]\.?", dotted) if p)


def _config_error(err: dict, data: dict, src, context: str) -> ConfigError:
    loc = _data_loc(data, err["loc"])
    msg = err["msg"]
    if err["type"] == "missing":
        return ConfigError(f"required key {dotted_key(loc)!r} is missing", where=src.where(loc[:-1]))
    if err["type"] == "value_error":  # our own validators: the message starts with the key it is about
        msg = msg.removeprefix("Value error, ")
        keyed = _KEYED.match(msg)
        if keyed:
            key = loc + _key_path(keyed.group(1))
            return ConfigError(keyed.group(2), where=src.where(key))
        where = src.where(loc) if loc else (f"{src.path} ({context})" if context else src.path)
        return ConfigError(msg, where=where)
    return ConfigError(f"{msg}; got {_describe(err.get('input'))}", where=src.where(loc))


def _data_loc(data: Any, loc: tuple) -> tuple:
    """Drop the union-member tags pydantic puts into error locations, keeping real keys."""
    out, node = [], data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part == node.get("kind"):
            continue
        elif isinstance(part, str) and not part.startswith(("function-", "union[", "list[", "constrained-",
                                                                    "literal[", "tagged-union[")):
            out.append(part)
            node = None
    return tuple(out)


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default filled in (saved with each run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
