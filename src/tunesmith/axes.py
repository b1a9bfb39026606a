"""What a method module provides, per axis: the one written-down interface for tunings, objectives and regimes.

A method is a module (e.g. `tuning/lora.py`, `objectives/dpo.py`, `regimes/continual.py`) listed in its
folder's registry dict (`TUNINGS`, `OBJECTIVES`, `REGIMES`). Shared code only ever asks the module through
the names below, never compares kind names; a rule that spans two axes is the method's own `check(run_cfg)`.

For each axis two Protocols:
  <Axis>          what every module must provide (checked by tests/test_axes.py over every registry entry)
  <Axis>Hooks     what a module may provide; shared code looks for it with `hasattr` and has a default

Every hook named here is called somewhere in src/ (a test fails otherwise), so a hook cannot be declared
and silently ignored. Method modules are leaves: they import nothing from the run layer (`run`, `trained`,
`train`, `artifacts`, `stages`, `cli`); what they need from it is passed in.

Heads: `sequence-classification` (a new classifier head), `causal-lm`, `masked-lm`, `encoder` (the bare body, its
hidden states pooled into an embedding; no head, no pooler).
Metric directions: "max" (higher is better), "min" (lower is better), None (neither, e.g. answer length);
compare two values with `better` below, never with a hand-written list of lower-is-better names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Protocol, runtime_checkable

Direction = Optional[Literal["max", "min"]]
HEADS = ("sequence-classification", "causal-lm", "masked-lm", "encoder")


def better(direction: Direction, a: float, b: float | None, min_delta: float = 0.0) -> bool:
    """True if `a` is better than `b` by more than `min_delta` for a metric of this direction (b None: a is
    the first value, so better). A metric with no direction (None) is never better."""
    if b is None:
        return True
    if direction == "min":
        return a < b - min_delta
    if direction == "max":
        return a > b + min_delta
    return False


def improves(direction: Direction, a: float, best: float | None, min_delta: float = 0.0,
             loss: float | None = None, best_loss: float | None = None) -> bool:
    """True if a score `a` (with its loss) should replace the best so far: `better` by more than `min_delta`, or
    a tie with a lower loss. A tie is a score at least as good as the best but not better by more than
    `min_delta` (never a worse one), so among evaluations equal on the metric the one with the lowest loss wins."""
    if better(direction, a, best, min_delta):
        return True
    if best is None or direction is None or loss is None or best_loss is None:
        return False
    at_least = a >= best if direction == "max" else a <= best
    return at_least and loss < best_loss


def metric_directions(objective) -> dict[str, Direction]:
    """Every metric an objective reports (training-time and generation metrics) with its direction."""
    return {**objective.METRICS, **getattr(objective, "GENERATION_METRICS", {})}


Symptom = Literal["overfit", "underfit", "forget"]
"""What a finished run showed, for advice (evaluate/advice.py): overfitting, underfitting, forgetting."""


class Change(NamedTuple):
    """One change of a run's config that advice proposes: the dotted key, its value in the run, the value to try,
    and an optional note (e.g. what else to set with it)."""

    key: str
    now: Any
    to: Any
    note: str = ""


@dataclass(frozen=True)
class Methods:
    """The three modules a run config chose, handed to every `check(run_cfg, methods)`: a rule that spans axes
    asks the other axes' capabilities here (e.g. `methods.tuning.TRAINS_BASE`) instead of naming kinds."""

    tuning: Any
    objective: Any
    regime: Any


# ---------------------------------------------------------------------------------------------- tuning


@runtime_checkable
class Tuning(Protocol):
    """Which parameters train. Required of every module in `tuning.TUNINGS`."""

    Config: type
    """The `tuning:` section (a `schema.Section`) with `kind: Literal["<kind>"]`."""
    MERGEABLE: bool
    """True if `export --format merged` can fold the trained weights into the base weights."""
    TRAINS_BASE: bool
    """True if the base model's own weights train (full, freeze). Then the base is stored in fp32 (a frozen
    base may be stored in bf16 on a GPU) and there is no adapter to switch off for a reference model."""
    HEADS: frozenset
    """The heads this tuning can train (see HEADS above). A masked-LM head is often missing from the checkpoint
    and starts random; an adapter over a frozen random head neither learns it nor saves it."""

    def apply(self, model, cfg, head: str, tokenizer=None):
        """The model to train, `requires_grad` set, logits lined up with the input ids whatever the method adds.
        `tokenizer` is None on the meta device (plan, the checks before loading), where no weights are read."""


class TuningHooks(Protocol):
    """Optional hooks of a tuning module; shared code has a default for each."""

    def check_model(self, cfg, model_config, head: str) -> None:
        """Combinations that cannot work, found from the model's config alone (before any weights are read).
        Raise `ConfigError` naming the key."""

    def check(self, run_cfg, methods: Methods) -> None:
        """Rules that span axes, found from the whole run config at validation time (e.g. a tuning that
        cannot serve an objective). Raise `ValueError` (pydantic reports it with the file and line)."""

    def load_kwargs(self, cfg, model_config, head: str, dtype) -> dict:
        """Extra `from_pretrained` arguments for the base (qlora: 4-bit quantization). A tuning with this hook
        quantizes pretrained weights, so it refuses random `arch:` models."""

    def added_positions(self, cfg) -> int:
        """Positions the method adds in front of every sequence (prompt tuning's virtual tokens); plan counts
        them in the activation estimate. Default 0."""

    def trainable_count(self, base, cfg, head_params: int) -> int:
        """Trainable values of a low-rank method, counted on a meta-device model: `tunesmith plan` shows the run
        beside LoRA and QLoRA with these settings (default: `tuning.PLAN_BASELINE`'s defaults)."""

    LR_RANGE: tuple
    """(low, high): learning rates that usually suit this tuning. Advice proposes a lower train.lr only above
    `low` and a higher one only below `high` (default: no bounds)."""

    def advice(self, cfg, symptom: Symptom, head: str) -> list[Change]:
        """What trains fewer weights (`overfit`, `forget`: less of the base) or more (`underfit`) for this kind,
        as `Change`s of `tuning.` keys built from `cfg`'s current values; [] when nothing within reach does (the
        run already trains the least, or the most). Default: []."""

    def speed_up(self, cfg, model) -> str | None:
        """Make training this tuned model faster without changing its results beyond float rounding (freeze: the
        frozen part's outputs computed once per example and looked up after; lora: the adapter's product added into
        the base output in place). Called once, on the tuned model before base scoring; returns a line for the
        log, or None. Default: nothing."""

    def speed_up_done(self, cfg, model) -> str | None:
        """Called once after the last evaluation, before the weights are written: say what `speed_up` saved and
        keep what it built for later runs (freeze: the frozen part's passes run and read; with `cache_features:
        disk`, the feature cache's file). A line for the log, or None."""

    def save(self, run_dir: Path, model, tokenizer) -> str:
        """Write the trained weights into the run folder; return the folder's name. Default: `artifacts.save_weights`
        (a peft adapter, or the full model)."""

    def load(self, cfg, weights: Path, head: str, base):
        """Rebuild the trained model from a run's weights folder on `base`, the base model loaded by the run
        layer as this tuning needs it. Default: the base with the peft adapter on top, or the full weights."""


# ---------------------------------------------------------------------------------------------- objective


@runtime_checkable
class Objective(Protocol):
    """What is optimised. Required of every module in `objectives.OBJECTIVES`.

    A supervised objective also provides `loss`, `eval_step` and `metrics` (see `SupervisedObjective`); an
    objective that owns its step (`OWNS_STEP = True`, ppo: rollouts and several updates per batch) trains
    through its own stepper instead.
    """

    Config: type
    """The `objective:` section with `kind: Literal["<kind>"]`."""
    HEAD: str
    """The head it trains (one of HEADS)."""
    METRICS: dict
    """Every metric it reports during training and evaluation, with its direction: {"accuracy": "max", "loss": "min"}.
    Early stopping, the diagnosis and the base-vs-tuned report read the direction from here."""
    MAIN_METRIC: str
    """The metric early stopping watches by default (a key of METRICS with a direction)."""

    def prepare(self, splits, tokenizer, cfg, data):
        """Rows per split -> `objectives.common.Prepared` (tokenized examples, model kwargs, data card facts)."""


@runtime_checkable
class SupervisedObjective(Objective, Protocol):
    """An objective the shared loop trains (every objective without `OWNS_STEP`)."""

    def loss(self, model, batch, cfg):
        """A micro-batch -> `objectives.common.Loss` (summed loss and its unit count, for exact accumulation)."""

    def eval_step(self, model, batch, cfg) -> dict[str, list]:
        """A batch -> per-example lists, merged over batches and processes before `metrics`."""

    def metrics(self, outputs: dict[str, list], cfg) -> dict[str, float]:
        """The merged per-example lists -> the metrics named in METRICS."""


class ObjectiveHooks(Protocol):
    """Optional hooks of an objective module."""

    OWNS_STEP: bool
    """True if the objective trains in its own stepper (rollout and update) rather than through `loss`."""
    GENERATION_METRICS: dict
    """Metrics of generated answers (with directions), measured once after training on the test prompts (sft)."""
    CHAT: bool
    """True if it renders chats with a template though its head is no LM (a reward model)."""
    UNUSED_TRAIN_SETTINGS: dict
    """`train.` keys its own stepper does not take, each with the reason: a value other than the default is
    refused by its `check`, and a staged config does not pass the top level's value down to its stage."""

    def check_model(self, cfg, model_config) -> None:
        """Combinations that cannot work, found from the model's config alone (before any weights are read)."""

    def check(self, run_cfg, methods: Methods) -> None:
        """Rules that span axes, at config validation (e.g. dpo without a precomputed reference needs a tuning
        that does not train the base). Raise `ValueError`."""

    def example_length(self, example: dict, cfg) -> int:
        """The positions an example takes in a batch, by which training batches group examples of similar
        length (dpo: a pair's two answers and its prompt once). Default: its `input_ids` length."""

    def overrides(self, cfg) -> set[str]:
        """Config keys of other sections that this objective's settings make inert (dpo without dropout:
        `tuning.dropout`); advice never proposes changing them. Default: none."""

    def prepare_model(self, model, cfg) -> str | None:
        """Adjust the tuned model before anything runs on it (dpo: dropout off, as trl); a line for the log, or
        None."""

    def make_splits(self, cfg, data) -> dict | None:
        """Rows the objective makes itself instead of reading `data` ({split: data.sources.Split}: an RL objective
        playing an environment, one row per episode seed), or None to read `data` as usual."""

    def kl_hint(self, cfg) -> str:
        """An objective that owns its step: what to change when the tuned model's KL to the reference ended above
        `cfg.kl_bound` (a stronger KL weight)."""

    def attach_reference(self, model, examples, cfg, batch_size: int, pad_id: int, accelerator=None) -> None:
        """Run once on the starting model, before base scoring: store what training compares against
        (dpo's reference log-probs)."""

    def attach_reference_for(self, trained, examples, batch_size: int, starting_model) -> None:
        """The same for a finished run loaded back (`tunesmith eval`); `starting_model()` loads the run's
        starting model (built by the run layer), for a tuning that trained the base weights."""

    def predict(self, model, tokenizer, texts: list[str], data) -> list[dict]:
        """`tunesmith predict`: one result per text (classifiers)."""

    def encode(self, model, tokenizer, texts: list[str], cfg, data) -> list[list[float]]:
        """One embedding per text, as training pooled them (embedding models); `tunesmith serve` answers
        `/v1/embeddings` with it."""

    def configure_from_model(self, cfg, model):
        """The objective's config completed from a loaded model (a classifier's labels)."""

    def plan_kwargs(self, cfg) -> dict:
        """Model-building arguments when no data is read (`tunesmith plan`: e.g. num_labels)."""

    def baselines(self, prepared, cfg, seed: int) -> dict:
        """Trivial predictors scored on the held-out splits beside base and tuned (evaluate/baselines.py: the
        majority class, a bag-of-words model, chance): {name: {"about": what it does, <split>: metrics in
        METRICS}}, or {"about", "skipped": why} for one that would not be cheap. The diagnosis warns when the
        tuned model does not beat them."""


# ---------------------------------------------------------------------------------------------- regime


@runtime_checkable
class Regime(Protocol):
    """How tasks and data are scheduled. Required of every module in `regimes.REGIMES`."""

    Config: type
    """The `regime:` section with `kind: Literal["<kind>"]`."""
    ALTERS_TRAINING: bool
    """True if the regime changes the data or the update (replay rows, a penalty, task sampling, episodes); an
    objective that owns its step (ppo) refuses such a regime in its `check`."""

    def extra_splits(self, cfg, train_rows: int, seed: int) -> dict:
        """{name: data.sources.Split} mixed into train (e.g. `replay`); checked and tokenized with the task's
        splits. {} for none."""

    def make_penalty(self, cfg, model, head: str, tokenizer, device, log=print) -> Any:
        """A pull towards the starting weights (`add_gradient()` once per optimizer step, `value()` for the log),
        or None."""


class RegimeHooks(Protocol):
    """Optional hooks of a regime module."""

    def check(self, run_cfg, methods: Methods) -> None:
        """Rules that span axes, at config validation (e.g. EWC needs a head with a pretrained loss). Raise
        `ValueError`."""

    def advice(self, cfg, symptom: Symptom, head: str) -> list[Change]:
        """The regime's changes for a symptom (`forget`: replay or a penalty, from `cfg`'s current values), as
        `Change`s of `regime.` keys; [] for none. Default: []."""

    # A regime over several tasks (multitask) reads its tasks' data itself and trains one objective over them:

    def prepare(self, run_cfg, tokenizer):
        """Every task's data read, checked (within and across tasks) and tokenized, in place of the top-level
        `data:` section: (objectives.common.Prepared, data.checks.Report); the data card holds each task's."""

    def wrap_objective(self, objective, cfg, prepared):
        """The objective the loop and evaluation use for this regime (multitask: each task's loss and metrics on
        its own head, metric keys `<task>/<metric>`), built from the task objective and `prepare`'s result."""

    def batches(self, cfg, train_examples: list[dict], train_cfg, within):
        """epoch -> batches of train example indices (multitask: one task per batch, tasks drawn in shares); a
        pure function of the epoch, so --resume rebuilds the same order. `within` is the loop's own batching
        (`data.batches.train_batches`), for the batches inside one task. Default: the loop's batching."""

    def task_view(self, trained, name: str | None):
        """A finished run narrowed to one task (`predict/eval RUN --task NAME`): a `trained.Trained` whose model,
        objective config and data section are that task's. Raise `TunesmithError` for a missing or unknown name."""


AXES = {
    "tuning": (Tuning, TuningHooks),
    "objective": (Objective, ObjectiveHooks),
    "regime": (Regime, RegimeHooks),
}
"""Per axis: the required Protocol and the optional hooks (the conformance test reads this)."""


def members(protocol: type) -> list[str]:
    """The names a Protocol declares (attributes and methods), its bases' included."""
    names: list[str] = []
    for cls in reversed(protocol.__mro__):
        if cls is object or cls is Protocol or cls.__name__ == "Generic":
            continue
        for name in [*getattr(cls, "__annotations__", {}), *vars(cls)]:
            if not name.startswith("_") and name not in names:
                names.append(name)
    return names
