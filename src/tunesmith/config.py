"""The run config: one YAML file, typed and validated, plus `a.b=c` overrides from the command line.

Errors name the file and line, the key's dotted path, and for a misspelt key the nearest valid one.
Tuning, objective and regime sections are the `Config` classes of the modules in their registries,
picked by their `kind` key.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from .data.config import ChecksConfig, DataConfig, LeakageConfig, Policy, SplitConfig  # noqa: F401 (re-exported)
from .errors import ConfigError
from .objectives import OBJECTIVES
from .regimes import REGIMES
from .schema import Section
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
    """Evaluations without improvement before stopping."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""


class TrainConfig(Section):
    epochs: float = Field(3, gt=0)
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
    seed: int = 0
    """One seed for data order, initialisation and dropout; a CPU run with the same seed repeats exactly."""
    group_by_length: bool = True
    """Batch examples of similar length together to cut padding (order is still shuffled)."""
    gradient_checkpointing: bool = False
    """Keep only each block's input in the forward pass and recompute the rest during backward: less memory
    for one extra forward per step (sft-alpaca-lora, 4 steps on CPU: peak RSS 12.0 -> 7.9 GiB, 37% slower).
    The loss and gradients are unchanged. qlora has its own switch, on by default."""
    eval_every: Union[int, Literal["epoch"]] = "epoch"
    """Evaluate on validation every N optimizer steps, or at the end of each epoch."""
    save_every: Optional[int] = Field(None, ge=1)
    """Checkpoint every N steps for --resume (default: at every evaluation)."""
    log_every: int = Field(10, ge=1)
    """Write a line to metrics.jsonl every N optimizer steps."""
    eval_batch_size: Optional[int] = Field(None, ge=1)
    """Batch size for evaluation (default: 2 x batch_size)."""
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    """Early stopping on a validation metric, restoring the best checkpoint at the end."""


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
    """Also score the starting model on the test split, so every run reports base vs tuned."""
    generate: GenerateConfig = GenerateConfig()
    """Generation settings: for sft's generation metrics, and the defaults of generate, chat and compare."""


    """Also score the starting model on the test and validation splits, so every run reports base vs tuned
    (and the diagnosis can tell whether training beat the start)."""
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
    tuning: TuningConfig = Field(default_factory=lambda: TUNINGS["lora"].Config())
    """Which parameters train (`kind`: full, freeze, lora, qlora, dora, ia3, prefix, prompt, adapter; see docs/peft.md)."""
    objective: ObjectiveConfig = Field(default_factory=lambda: OBJECTIVES["classify"].Config())
    """What is optimised (`kind`: classify, clm, mlm, sft, reward, dpo, ppo)."""
    regime: RegimeConfig = Field(default_factory=lambda: REGIMES["single"].Config())
    """How tasks are scheduled (`kind`: single, continual)."""
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
        (`objective.distill.keep_layers`) has no `model` of its own: the teacher's is the start."""
        if not isinstance(data, dict):
            return data
        regime, objective = data.get("regime"), data.get("objective")
        tasks = regime.get("tasks") if isinstance(regime, dict) else None
        if "data" not in data and isinstance(tasks, list) and tasks and isinstance(tasks[0], dict) and "data" in tasks[0]:
            data = {**data, "data": tasks[0]["data"]}
        distill = objective.get("distill") if isinstance(objective, dict) else None
        if isinstance(distill, dict) and distill.get("keep_layers") is not None and "model" not in data:
            data = {**data, "model": {"name": distill.get("teacher")}}
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
        regime = REGIMES[self.regime.kind]
        if hasattr(regime, "check"):  # rules across sections that the regime owns (multitask: its own objective)
            regime.check(self)
            return self
        objective = OBJECTIVES[self.objective.kind]
        metric = self.train.early_stopping.metric
        if metric is not None and metric not in objective.METRICS:
            raise ValueError(f"train.early_stopping.metric: {metric!r} is not a metric of objective "
                             f"{self.objective.kind!r} (choose from {', '.join(objective.METRICS)})")
        offered = objective.METRICS + getattr(objective, "GENERATION_METRICS", ())
        if getattr(self.objective, "distill", None) is not None:
            offered += ("teacher_agreement",)
        for m in self.eval.metrics or []:
            if m not in offered:
                raise ValueError(f"eval.metrics: {m!r} is not a metric of objective {self.objective.kind!r} "
                                 f"(choose from {', '.join(offered)})")
        if getattr(objective, "OWNS_STEP", False):
            if self.train.grad_accum != 1:
                raise ValueError(f"train.grad_accum: {self.objective.kind} takes train.batch_size answers per step and "
                                 "updates on them in objective.minibatch pieces; it does not accumulate")
            if self.regime.kind != "single":
                raise ValueError(f"regime.kind: {self.objective.kind} trains in its own loop, under the single regime "
                                 "only (its KL penalty already holds it near the start)")
        if self.objective.kind == "dpo" and self.objective.precompute_ref is False and \
                self.tuning.kind in ("full", "freeze"):
            raise ValueError(f"objective.precompute_ref: false needs a reference model, and tuning {self.tuning.kind!r} "
                             "trains the base weights, so there is no adapter to switch off; tunesmith does not keep "
                             "a frozen copy (twice the memory): leave precompute_ref null or set it true")
        if self.regime.kind == "continual" and objective.HEAD == "sequence-classification":
            if self.regime.penalty.kind == "ewc":
                raise ValueError("regime.penalty.kind: ewc weighs weights by the starting model's own loss on "
                                 "general text, which a new classifier head does not have; use l2sp")
            if self.regime.replay.fraction > 0 and "data" not in self.regime.replay.model_fields_set:
                raise ValueError("regime.replay.data: a classifier replays an earlier task's labelled rows (same "
                                 "labels); the default general text has no labels, so name the rows to replay")
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
        dotted = dotted_key(loc) or "(top level)"
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


def _to_python(node, src: _Source, loc: tuple = ()):
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key in out:
                raise ConfigError(f"key {key!r} appears twice", where=f"{src.path}:{key_node.start_mark.line + 1}")
            src.lines[loc + (key,)] = key_node.start_mark.line + 1
            out[key] = _to_python(value_node, src, loc + (key,))
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(v, src, loc + (i,)) for i, v in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def read_yaml(path: str | Path) -> tuple[dict, _Source]:
    path = Path(path)
    src = _Source(str(path))
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"not valid YAML: {getattr(e, 'problem', e)}", where=where) from None
    data = _to_python(node, src) if node is not None else {}
    if not isinstance(data, dict):
        raise ConfigError("a config must be a mapping of keys to values", where=str(path))
    return data, src


def apply_override(data: dict, text: str, src: _Source) -> None:
    """Set `a.b.c=value` in the raw config; the value is parsed as YAML (`lr=1e-4`, `targets=[q,v]`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value")
    key, _, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    loc = tuple(int(p) if p.isdigit() else p for p in parts)  # `regime.tasks.1.data.max_length`: item 1 of a list
    node = data
    for i, part in enumerate(loc[:-1]):
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i])} is a list of {len(node)} items; "
                                  f"name one by its index (0 to {len(node) - 1})")
            child = node[part]
        else:
            child = node.get(part)
            if isinstance(child, str) and part in ("model", "tuning", "objective", "regime"):
                # expand a shorthand (`tuning: lora`) so a nested override can land in it
                child = {"name": child} if part == "model" else {"kind": child}
                node[part] = child
            if child is None:
                child = node[part] = {}
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} is not a section")
        node = child
    if isinstance(node, list):
        if not isinstance(loc[-1], int) or loc[-1] >= len(node):
            raise ConfigError(f"override {text!r}: {'.'.join(parts[:-1])} is a list of {len(node)} items")
    node[loc[-1]] = value
    src.overrides[loc] = text


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


def check_keys(data: dict, model: type[BaseModel], src: _Source, loc: tuple = ()) -> None:
    """Unknown keys and unknown `kind`s, reported with the nearest valid name."""
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean {dotted_key(loc + (close[0],))!r}?" if close else None
            valid = ", ".join(fields)
            raise ConfigError(f"unknown key {key!r}; valid keys here: {valid}", where=src.where(loc + (key,)),
                              hint=hint)
        item = _list_item(fields[key].annotation)
        if item is not None and isinstance(value, list):  # a list of sections (a regime's tasks)
            for i, v in enumerate(value):
                if isinstance(v, dict):
                    check_keys(v, item, src, loc + (key, i))
            continue
        classes = _unwrap(fields[key].annotation)
        if not classes or not isinstance(value, (dict, str)):
            continue
        if len(classes) > 1:  # a registry union: pick the member by its kind
            kinds = {c.model_fields["kind"].default: c for c in classes}
            kind = value.get("kind") if isinstance(value, dict) else value
            if kind not in kinds:
                close = difflib.get_close_matches(str(kind), list(kinds), n=1)
                raise ConfigError(
                    f"{kind!r} is not a known {key} kind; choose from {', '.join(kinds)}",
                    where=src.where(loc + (key, "kind") if isinstance(value, dict) else loc + (key,)),
                    hint=f"did you mean {close[0]!r}?" if close else None,
                )
            classes = [kinds[kind]]
        if isinstance(value, dict):
            check_keys(value, classes[0], src, loc + (key,))


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


def validate(data: dict, src, context: str = "") -> RunConfig:
    """The raw config as a RunConfig; every failure a ConfigError naming its place (`src.where`).
    `context` names the part of the file the data came from (a stage), for our own validators' messages."""
    check_keys(data, RunConfig, src)
    objective = data.get("objective")
    if isinstance(objective, dict) and isinstance(objective.get("distill"), dict) and \
            objective["distill"].get("keep_layers") is not None and "model" in data:
        raise ConfigError("the student is built from the teacher's layers (objective.distill.keep_layers), so it has "
                          "no model of its own", where=src.where(("model",)),
                          hint="leave model out, or drop keep_layers to distil into the model named here")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = _data_loc(data, err["loc"])
        msg = err["msg"]
        if err["type"] == "missing":
            raise ConfigError(f"required key {'.'.join(map(str, loc))!r} is missing",
                              where=src.where(loc[:-1])) from None
        if err["type"] == "value_error":  # raised by our own validators: message carries the key
            where = f"{src.path} ({context})" if context else src.path
            raise ConfigError(msg.removeprefix("Value error, "), where=where) from None
        raise ConfigError(f"{msg}; got {_describe(err.get('input'))}", where=src.where(loc)) from None


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
        elif isinstance(part, str) and not part.startswith(("function-", "union[", "list[")):
            out.append(part)
            node = None
    return tuple(out)


def dump(cfg: RunConfig) -> str:
    """The resolved config as YAML, every default filled in (saved with each run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
