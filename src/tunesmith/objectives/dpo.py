"""Direct preference optimisation and its family: raise the likelihood of chosen answers over rejected ones
(or of thumbs-up answers over thumbs-down ones), with no reward model.

Data: preference pairs (objectives/pairs.py), rendered with the chat template exactly as sft renders them;
only answer tokens (closed by the end-of-turn token) count, prompt tokens are masked. `loss: kto` reads
unpaired rows `{"prompt", "completion", "label"}` instead (objectives/unpaired.py; preference rows are
unpaired for it, chosen -> true, rejected -> false).

The loss table (`objective.loss`). With logp the policy's log-probabilities summed over the answer tokens,
ref the reference's, avg = logp / answer tokens, and h = (logp_c - ref_c) - (logp_r - ref_r):
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (DPO, Rafailov et al. 2023;
           eps = label_smoothing: conservative DPO)
  ipo      (h' - 1 / (2 beta))^2, h' the same with per-token averaged log-ratios (Azar et al. 2023, as trl)
  orpo     -avg_c - beta log sigmoid(log odds(avg_c) - log odds(avg_r)),  odds(p) = p / (1 - p)
           (Hong et al. 2024: the SFT loss on the chosen answer plus an odds-ratio term; no reference)
  simpo    -(1 - eps) log sigmoid(beta (avg_c - avg_r) - gamma) - eps log sigmoid(-(...))
           (Meng et al. 2024: length-normalised, a target margin gamma; no reference)
  kto      per answer, r = logp - ref and z0 = max(0, mean over the batch of logp(y'|x) - ref(y'|x)) on
           mismatched pairs (each prompt with another row's answer), no gradient through z0:
           desirable  w_d (1 - sigmoid(beta (r - z0))),  undesirable  w_u (1 - sigmoid(beta (z0 - r)))
           (Ethayarajh et al. 2024, as trl's KTOTrainer)
A pair's two answers (or an answer and its mismatched KL answer) go through the model in one forward,
padded to one width. The loss unit is a pair (kto: an answer).

The reference is the starting model (orpo and simpo have none: no reference forward ever runs), and it is
never a second copy of the weights:
  - lora, qlora, dora, ia3, prefix, prompt (peft): the same model with the adapter switched off
    (`disable_adapter()`, which tunesmith's bottleneck adapters offer too);
  - full and freeze tuning change the base weights themselves, so there is no switch: the reference
    log-probs are computed once, before training, for every train/validation/test example and stored with
    the examples (`precompute_ref`, automatic for these tunings). A frozen copy of the model is never made.
`precompute_ref: true` does the same for adapters: no reference forward during training (about a third
less compute per step), at the price of one pass over the data first.

Metrics: `reward_accuracy` (share of pairs whose implicit reward is higher for the chosen answer; a tie
counts half), `reward_margin`, `chosen_reward`, `rejected_reward`, `chosen_logps`, `rejected_logps`,
`logp_accuracy` (share of pairs with logp(chosen) > logp(rejected)) and `loss`. The implicit reward is
beta (logp - ref), or beta avg for the reference-free orpo and simpo (as trl logs them).
With a reference, the starting model is its own, so its reward accuracy is exactly 0.5 (every margin is 0):
reward accuracy above 0.5 on held-out pairs is by construction "prefers the chosen answers more than the
starting model did", pair by pair; `logp_accuracy` gives the absolute comparison of base and tuned.
kto: pairs are the held-out rows that came from one preference row; a split of unpaired rows has no pairs,
and there `reward_accuracy` is the share of answers whose reward has the sign of their label (`logp_accuracy`
is not reported); chosen/rejected mean desirable/undesirable, and `kl` is the mean estimate z0.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..data.batches import eval_batches
from ..data.collate import IGNORE_INDEX, collate
from ..errors import TunesmithError
from ..models.dropout import disable_dropout
from ..progress import bar
from ..schema import Section
from . import shared_prompt
from .common import Loss, Prepared
from .lm import LOSS_CHUNK, causal_lm_forward
from .pairs import prepare_pairs
from .reward import preference_accuracy
from .unpaired import prepare_unpaired

HEAD = "causal-lm"
METRICS = {"reward_accuracy": "max", "reward_margin": "max", "chosen_reward": "max", "rejected_reward": "min",
           "chosen_logps": None, "rejected_logps": None, "logp_accuracy": "max", "loss": "min", "kl": None}
MAIN_METRIC = "reward_accuracy"
SEQUENCES_PER_EXAMPLE = 2  # chosen and rejected (kto: the answer and its KL answer) run as one batch (`plan`)


@dataclass(frozen=True)
class LossKind:
    """What a loss of the table needs."""

    reference: bool
    """It compares against the starting model (False: no reference forward, nothing precomputed)."""
    unpaired: bool
    """It reads single labelled answers (kto), not pairs."""


LOSSES = {
    "sigmoid": LossKind(reference=True, unpaired=False),
    "ipo": LossKind(reference=True, unpaired=False),
    "orpo": LossKind(reference=False, unpaired=False),
    "simpo": LossKind(reference=False, unpaired=False),
    "kto": LossKind(reference=True, unpaired=True),
}
SECOND = {False: "rejected_", True: "kl_"}
"""The prefix of an example's second sequence: a pair's rejected answer, or kto's mismatched KL answer."""
REF_KEYS = {False: ("ref_chosen_logps", "ref_rejected_logps"), True: ("ref_logps", "ref_kl_logps")}
"""Where precomputed reference log-probs are kept, for the first and the second sequence."""
SIMPO_GAMMA = 0.5  # trl's simpo_gamma


class Config(Section):
    kind: Literal["dpo"] = "dpo"
    """Direct preference optimisation on preference pairs, against the frozen starting model."""
    beta: float = Field(0.1, gt=0)
    """sigmoid, kto: strength of the pull towards the reference (the scale of the implicit reward), higher keeps
    the policy closer; ipo: the target margin is 1 / (2 beta); orpo: the weight of the odds-ratio term beside
    the SFT loss (the paper's lambda); simpo: the scale of the length-normalised reward (the paper uses 2-10)."""
    loss: Literal["sigmoid", "ipo", "orpo", "simpo", "kto"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: squared loss on per-token log-ratios (Azar et al. 2023);
    orpo: SFT plus an odds-ratio term, no reference (Hong et al. 2024); simpo: length-normalised, with a margin,
    no reference (Meng et al. 2024); kto: unpaired thumbs-up/down answers (Ethayarajh et al. 2024)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a pair's label is flipped (conservative DPO); 0: plain DPO. sigmoid and simpo only."""
    gamma: Optional[float] = Field(None, ge=0)
    """simpo only: the target reward margin between chosen and rejected (trl's simpo_gamma); null: 0.5."""
    desirable_weight: float = Field(1.0, gt=0)
    """kto only: weight of the desirable (label true) answers' losses. With unbalanced data, trl suggests
    desirable_weight x desirable answers within 1 to 4/3 of undesirable_weight x undesirable answers."""
    undesirable_weight: float = Field(1.0, gt=0)
    """kto only: weight of the undesirable (label false) answers' losses."""
    precompute_ref: Optional[bool] = None
    """Compute the reference log-probs once before training and keep them with the examples, so no reference
    runs during training; null: only when the tuning has no adapter to switch off (full, freeze)."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template (as in sft): the tokenizer's own, or a fallback. Saved with the tuned tokenizer."""
    system: Optional[str] = None
    """System message put first in every conversation that has none."""
    dropout: bool = False
    """Keep the model's and the adapter's dropout while training. Off by default, as in trl: with dropout the
    policy's log-probs are noisy copies of the ones the reference was computed with (the starting model without
    dropout), so the implicit rewards carry that noise and a pair's margin is not 0 at the start."""
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)
    """Answer tokens whose vocabulary-wide logits exist at a time: the output layer and the loss run over them
    chunk by chunk, recomputed in the backward pass, so a batch's logits are never all held (objectives/lm.py);
    0: the whole batch's logits at once."""

    @model_validator(mode="after")
    def _settings_fit_the_loss(self):
        if self.label_smoothing and self.loss not in ("sigmoid", "simpo"):
            raise ValueError(f"objective.label_smoothing applies to loss: sigmoid or simpo only ({self.loss} has no "
                             "pair labels to flip)")
        if self.gamma is not None and self.loss != "simpo":
            raise ValueError(f"objective.gamma is simpo's margin; loss {self.loss} does not use it")
        if (self.desirable_weight != 1 or self.undesirable_weight != 1) and self.loss != "kto":
            raise ValueError(f"objective.desirable_weight and undesirable_weight are kto's; loss {self.loss} does "
                             "not use them")
        if self.precompute_ref and not LOSSES[self.loss].reference:
            raise ValueError(f"loss {self.loss} has no reference model, so there is nothing to precompute: "
                             "remove objective.precompute_ref")
        return self


def check(run_cfg, methods) -> None:
    if run_cfg.objective.precompute_ref is False and methods.tuning.TRAINS_BASE and \
            LOSSES[run_cfg.objective.loss].reference:
        raise ValueError(f"objective.precompute_ref: false needs a reference model, and tuning {run_cfg.tuning.kind!r} "
                         "trains the base weights, so there is no adapter to switch off; tunesmith does not keep "
                         "a frozen copy (twice the memory): leave precompute_ref null or set it true")


def example_length(example: dict, cfg: Config) -> int:
    """An example's positions in a batch: both sequences, the prompt once (objectives/shared_prompt.py)."""
    second = SECOND[LOSSES[cfg.loss].unpaired]
    if f"{second}input_ids" not in example:
        return len(example["input_ids"])
    return shared_prompt.row_length(example, second)


def overrides(cfg: Config) -> set[str]:
    """Config keys that change nothing here: the adapter's dropout while `dropout` is off."""
    return set() if cfg.dropout else {"tuning.dropout"}


def prepare_model(model, cfg: Config) -> str | None:
    """Dropout off (`dropout: false`, the default): every dropout layer's p set to 0."""
    if cfg.dropout:
        return None
    n = disable_dropout(model)
    return (f"dpo: dropout off in {n} layers (objective.dropout: false; tuning.dropout does not apply)"
            if n else None)


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    if LOSSES[cfg.loss].unpaired:
        return prepare_unpaired(splits, tokenizer, cfg.template, cfg.system, data)
    return prepare_pairs(splits, tokenizer, cfg.template, cfg.system, data, labels=True)


# ---------------------------------------------------------------------------------------------
# Log-probs, the reference, the loss


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.size(1)), value=value)


def sequence_logps(model, batch, chunk: int = LOSS_CHUNK, second: str = "rejected_"
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp first, logp second, answer tokens first, answer tokens second): log-probs summed over the answer
    tokens of an example's two sequences (a pair: chosen and `rejected_`; kto: the answer and its `kl_` answer),
    from one forward over both, their logits `chunk` answer tokens at a time. The prompt runs once where the
    model allows it (objectives/shared_prompt.py), else both sequences run padded to one width."""
    shared = shared_prompt.logps(model, batch, chunk, second)
    if shared is not None:
        return shared
    width = max(batch["input_ids"].size(1), batch[f"{second}input_ids"].size(1))
    ids = torch.cat([_pad_to(batch["input_ids"], width, 0), _pad_to(batch[f"{second}input_ids"], width, 0)])
    mask = torch.cat([_pad_to(batch["attention_mask"], width, 0), _pad_to(batch[f"{second}attention_mask"], width, 0)])
    labels = torch.cat([_pad_to(batch["labels"], width, IGNORE_INDEX),
                        _pad_to(batch[f"{second}labels"], width, IGNORE_INDEX)])
    sums, counts = causal_lm_forward(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}, chunk)
    logps, counts = (-sums).chunk(2), counts.chunk(2)
    return logps[0], logps[1], counts[0], counts[1]


def reference_switch(model):
    """A context in which `model` computes as its starting point (its adapters off: `disable_adapter()`, as
    peft models and tunesmith's bottleneck adapters offer it), or None if its tuning has no switch (the base
    weights themselves train)."""
    inner = getattr(model, "module", model)  # under DDP
    switch = getattr(inner, "disable_adapter", None)
    return switch() if switch is not None else None


def reference_logps(model, batch, chunk: int = LOSS_CHUNK, unpaired: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's log-probs of an example's two sequences: stored in the batch if precomputed, else the
    same model with its adapters off, without gradient."""
    keys = REF_KEYS[unpaired]
    if keys[0] in batch:
        return batch[keys[0]].float(), batch[keys[1]].float()
    switch = reference_switch(model)
    if switch is None:
        raise TunesmithError("dpo has no reference: this tuning trains the base weights and the reference "
                             "log-probs were not precomputed", where="objective.precompute_ref",
                             hint="set objective.precompute_ref: true (or leave it null)")
    with torch.no_grad(), switch:
        c, r, _, _ = sequence_logps(model, batch, chunk, SECOND[unpaired])
    return c.detach(), r.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -ln 2, as trl's ORPO)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_losses(logp_c, logp_r, ref_c, ref_r, cfg: Config, tokens_c=None, tokens_r=None) -> torch.Tensor:
    """The per-pair loss of `cfg.loss` (see the module docstring); orpo and simpo take no reference (None)."""
    if cfg.loss in ("orpo", "simpo"):
        avg_c, avg_r = logp_c / tokens_c.clamp(min=1), logp_r / tokens_r.clamp(min=1)
        if cfg.loss == "orpo":
            log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
            return -avg_c - cfg.beta * F.logsigmoid(log_odds)
        z = cfg.beta * (avg_c - avg_r) - (SIMPO_GAMMA if cfg.gamma is None else cfg.gamma)
        eps = cfg.label_smoothing
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if cfg.loss == "ipo":
        h = (logp_c - ref_c) / tokens_c.clamp(min=1) - (logp_r - ref_r) / tokens_r.clamp(min=1)
        return (h - 1 / (2 * cfg.beta)) ** 2
    h = (logp_c - ref_c) - (logp_r - ref_r)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch's mean log-ratio on mismatched answers, at least 0, no gradient."""
    return (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_losses(logps, ref, desirable, z0, cfg: Config) -> torch.Tensor:
    """The per-answer KTO loss (see the module docstring)."""
    r = logps - ref
    good = cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (r - z0)))
    bad = cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z0 - r)))
    return torch.where(desirable.bool(), good, bad)


def implicit_rewards(logp, ref, tokens, cfg: Config) -> torch.Tensor:
    """The implicit reward: beta (logp - ref), or beta avg without a reference."""
    return cfg.beta * (logp / tokens.clamp(min=1) if ref is None else logp - ref)


def _forward(model, batch, cfg: Config):
    """(policy logps and tokens of both sequences, reference logps of both or Nones)."""
    kind = LOSSES[cfg.loss]
    ref = reference_logps(model, batch, cfg.loss_chunk, kind.unpaired) if kind.reference else (None, None)
    return sequence_logps(model, batch, cfg.loss_chunk, SECOND[kind.unpaired]), ref


def loss(model, batch, cfg: Config) -> Loss:
    (first, second, n_1, n_2), (ref_1, ref_2) = _forward(model, batch, cfg)
    if LOSSES[cfg.loss].unpaired:
        z0 = kto_kl(second, ref_2)
        per_answer = kto_losses(first, ref_1, batch["desirable"], z0, cfg)
        return Loss(per_answer.sum(), per_answer.numel(), {"kl": float(z0)})
    per_pair = pair_losses(first, second, ref_1, ref_2, cfg, n_1, n_2)
    return Loss(per_pair.sum(), per_pair.numel())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    (first, second, n_1, n_2), (ref_1, ref_2) = _forward(model, batch, cfg)
    if LOSSES[cfg.loss].unpaired:
        z0 = kto_kl(second, ref_2)
        return {"logps": first.tolist(), "rewards": implicit_rewards(first, ref_1, n_1, cfg).tolist(),
                "desirable": batch["desirable"].tolist(), "pair": batch["pair"].tolist(),
                "kl": [float(z0)] * first.numel(),
                "loss": kto_losses(first, ref_1, batch["desirable"], z0, cfg).tolist()}
    return {"chosen_logps": first.tolist(), "rejected_logps": second.tolist(),
            "chosen_rewards": implicit_rewards(first, ref_1, n_1, cfg).tolist(),
            "rejected_rewards": implicit_rewards(second, ref_2, n_2, cfg).tolist(),
            "loss": pair_losses(first, second, ref_1, ref_2, cfg, n_1, n_2).tolist()}


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(1, len(xs))


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    if "desirable" in outputs:
        return _kto_metrics(outputs)
    chosen, rejected = outputs["chosen_rewards"], outputs["rejected_rewards"]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "reward_accuracy": preference_accuracy(margins),
        "reward_margin": _mean(margins),
        "chosen_reward": _mean(chosen),
        "rejected_reward": _mean(rejected),
        "chosen_logps": _mean(outputs["chosen_logps"]),
        "rejected_logps": _mean(outputs["rejected_logps"]),
        "logp_accuracy": preference_accuracy([c - r for c, r in zip(outputs["chosen_logps"],
                                                                     outputs["rejected_logps"])]),
        "loss": _mean(outputs["loss"]),
    }


def _kto_metrics(outputs: dict[str, list]) -> dict[str, float]:
    rows = list(zip(outputs["logps"], outputs["rewards"], outputs["desirable"], outputs["pair"]))
    good = [(lp, r) for lp, r, d, _ in rows if d]
    bad = [(lp, r) for lp, r, d, _ in rows if not d]
    sides: dict[int, dict[bool, tuple]] = {}
    for lp, r, d, pair in rows:
        if pair >= 0:
            sides.setdefault(pair, {})[bool(d)] = (lp, r)
    pairs = [(s[True], s[False]) for s in sides.values() if len(s) == 2]
    out = {"chosen_reward": _mean([r for _, r in good]), "rejected_reward": _mean([r for _, r in bad]),
           "chosen_logps": _mean([lp for lp, _ in good]), "rejected_logps": _mean([lp for lp, _ in bad]),
           "kl": _mean(outputs["kl"]), "loss": _mean(outputs["loss"])}
    if pairs:  # held-out rows that came from preference pairs: compared pair by pair, as the other losses
        margins = [c[1] - r[1] for c, r in pairs]
        out.update(reward_accuracy=preference_accuracy(margins), reward_margin=_mean(margins),
                   logp_accuracy=preference_accuracy([c[0] - r[0] for c, r in pairs]))
    else:  # truly unpaired: does each answer's reward have the sign of its label?
        out.update(reward_accuracy=preference_accuracy([r if d else -r for _, r, d, _ in rows]),
                   reward_margin=out["chosen_reward"] - out["rejected_reward"])
    return out


# ---------------------------------------------------------------------------------------------
# Precomputed reference


def uses_precomputed(model, cfg: Config) -> bool:
    if not LOSSES[cfg.loss].reference:
        return False
    return cfg.precompute_ref if cfg.precompute_ref is not None else reference_switch(model) is None


@torch.no_grad()
def attach_reference(model, examples: dict[str, list[dict]], cfg: Config, batch_size: int, pad_id: int,
                     accelerator=None) -> None:
    """Before training (the model is its starting point): if the reference is precomputed, store its log-probs
    in every example of every split. Batches are formed as evaluation forms them, so the starting model's
    held-out margins come out exactly 0. A loss without a reference (orpo, simpo) stores nothing."""
    if not uses_precomputed(model, cfg):
        return
    unpaired = LOSSES[cfg.loss].unpaired
    keys = REF_KEYS[unpaired]
    device = accelerator.device if accelerator else next(model.parameters()).device
    was_training = model.training
    model.eval()
    switch = reference_switch(model) or nullcontext()
    with switch:
        for name, split in examples.items():
            batches = eval_batches([len(e["input_ids"]) for e in split], batch_size)
            for idx in bar(batches, f"reference {name}"):
                batch = {k: v.to(device) for k, v in collate([split[i] for i in idx], pad_id).items()}
                with accelerator.autocast() if accelerator else nullcontext():
                    c, r, _, _ = sequence_logps(model, batch, cfg.loss_chunk, SECOND[unpaired])
                for i, ci, ri in zip(idx, c.tolist(), r.tolist()):
                    split[i][keys[0]], split[i][keys[1]] = ci, ri
    model.train(was_training)


def attach_reference_for(trained, examples: dict[str, list[dict]], batch_size: int, starting_model) -> None:
    """Scoring a finished run (`tunesmith eval`): give its examples the reference log-probs. A run whose
    tuning has an adapter to switch off is its own reference; one that trained the base weights has its
    starting model loaded again to compute them (`starting_model()`, built by the caller)."""
    if not LOSSES[trained.obj_cfg.loss].reference:
        return
    has_switch = reference_switch(trained.model) is not None
    if has_switch and not trained.obj_cfg.precompute_ref:
        return  # computed on the fly with the adapter off
    reference = trained.model if has_switch else starting_model()
    cfg = trained.obj_cfg.model_copy(update={"precompute_ref": True})
    attach_reference(reference, examples, cfg, batch_size, trained.tokenizer.pad_token_id)
