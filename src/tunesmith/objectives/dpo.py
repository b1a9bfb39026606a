"""Direct preference optimisation: raise the likelihood of chosen answers over rejected ones, relative to
a frozen reference (the starting model), with no reward model (Rafailov et al. 2023).

Data: preference pairs (objectives/pairs.py), rendered with the chat template exactly as sft renders
them; only answer tokens (closed by the end-of-turn token) count, prompt tokens are masked.

Per pair, with log-probabilities summed over the answer tokens of the policy (logp) and the reference
(ref), and h = (logp_c - ref_c) - (logp_r - ref_r):
  sigmoid  -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)      (eps = label_smoothing: cDPO)
  ipo      (h' - 1 / (2 beta))^2, h' the same with per-token averaged log-ratios (Azar et al. 2023, as trl)
Chosen and rejected go through the model in one forward ([chosen; rejected], padded to one width).
The loss unit is a pair.

The reference is the starting model, and it is never a second copy of the weights:
  - lora, qlora, dora, ia3, prefix, prompt (peft): the same model with the adapter switched off
    (`disable_adapter()`, which tunesmith's bottleneck adapters offer too);
  - full and freeze tuning change the base weights themselves, so there is no switch: the reference
    log-probs are computed once, before training, for every train/validation/test pair and stored with
    the examples (`precompute_ref`, automatic for these tunings). A frozen copy of the model is never made.
`precompute_ref: true` does the same for adapters: no reference forward during training (about a third
less compute per step), at the price of one pass over the data first.

Metrics: `reward_accuracy` (share of pairs whose implicit reward beta (logp - ref) is higher for the chosen
answer; a tie counts half), `reward_margin`, `chosen_reward`, `rejected_reward`, `chosen_logps`,
`rejected_logps`, `logp_accuracy` (share of pairs with logp(chosen) > logp(rejected)) and `loss`.
The starting model is its own reference, so its reward accuracy is exactly 0.5 (every margin is 0):
reward accuracy above 0.5 on held-out pairs is by construction "prefers the chosen answers more than the
starting model did", pair by pair; `logp_accuracy` gives the absolute comparison of base and tuned.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..data.batches import eval_batches
from ..data.collate import IGNORE_INDEX, collate
from ..errors import TunesmithError
from ..progress import bar
from ..schema import Section
from .common import Loss, Prepared
from .lm import LOSS_CHUNK, causal_lm_forward
from .pairs import prepare_pairs
from .reward import preference_accuracy

HEAD = "causal-lm"
METRICS = {"reward_accuracy": "max", "reward_margin": "max", "chosen_reward": "max", "rejected_reward": "min",
           "chosen_logps": None, "rejected_logps": None, "logp_accuracy": "max", "loss": "min"}
MAIN_METRIC = "reward_accuracy"
SEQUENCES_PER_EXAMPLE = 2  # chosen and rejected run as one batch (for `tunesmith plan`)
REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


class Config(Section):
    kind: Literal["dpo"] = "dpo"
    """Direct preference optimisation on preference pairs, against the frozen starting model."""
    beta: float = Field(0.1, gt=0)
    """Strength of the pull towards the reference: higher keeps the policy closer (sigmoid: the scale of the
    implicit reward; ipo: the target margin is 1 / (2 beta))."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO (Rafailov et al. 2023); ipo: squared loss on per-token log-ratios (Azar et al. 2023)."""
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """Probability that a pair's label is flipped (conservative DPO); 0: plain DPO. sigmoid loss only."""
    precompute_ref: Optional[bool] = None
    """Compute the reference log-probs once before training and keep them with the examples, so no reference
    runs during training; null: only when the tuning has no adapter to switch off (full, freeze)."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template (as in sft): the tokenizer's own, or a fallback. Saved with the tuned tokenizer."""
    system: Optional[str] = None
    """System message put first in every conversation that has none."""
    loss_chunk: int = Field(LOSS_CHUNK, ge=0)
    """Answer tokens whose vocabulary-wide logits exist at a time: the output layer and the loss run over them
    chunk by chunk, recomputed in the backward pass, so a batch's logits are never all held (objectives/lm.py);
    0: the whole batch's logits at once."""

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self):
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError("objective.label_smoothing applies to loss: sigmoid only (IPO has no labels to flip)")
        return self


def check(run_cfg, methods) -> None:
    if run_cfg.objective.precompute_ref is False and methods.tuning.TRAINS_BASE:
        raise ValueError(f"objective.precompute_ref: false needs a reference model, and tuning {run_cfg.tuning.kind!r} "
                         "trains the base weights, so there is no adapter to switch off; tunesmith does not keep "
                         "a frozen copy (twice the memory): leave precompute_ref null or set it true")


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    return prepare_pairs(splits, tokenizer, cfg.template, cfg.system, data, labels=True)


# ---------------------------------------------------------------------------------------------
# Log-probs, the reference, the loss


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.size(1)), value=value)


def sequence_logps(model, batch, chunk: int = LOSS_CHUNK
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp chosen, logp rejected, answer tokens chosen, answer tokens rejected): log-probs summed over the
    answer tokens, from one forward over [chosen; rejected], their logits `chunk` answer tokens at a time."""
    width = max(batch["input_ids"].size(1), batch["rejected_input_ids"].size(1))
    ids = torch.cat([_pad_to(batch["input_ids"], width, 0), _pad_to(batch["rejected_input_ids"], width, 0)])
    mask = torch.cat([_pad_to(batch["attention_mask"], width, 0), _pad_to(batch["rejected_attention_mask"], width, 0)])
    labels = torch.cat([_pad_to(batch["labels"], width, IGNORE_INDEX),
                        _pad_to(batch["rejected_labels"], width, IGNORE_INDEX)])
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


def reference_logps(model, batch, chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (logp chosen, logp rejected): stored in the batch if precomputed, else the same model
    with its adapters off, without gradient."""
    if REF_KEYS[0] in batch:
        return batch[REF_KEYS[0]].float(), batch[REF_KEYS[1]].float()
    switch = reference_switch(model)
    if switch is None:
        raise TunesmithError("dpo has no reference: this tuning trains the base weights and the reference "
                             "log-probs were not precomputed", where="objective.precompute_ref",
                             hint="set objective.precompute_ref: true (or leave it null)")
    with torch.no_grad(), switch:
        c, r, _, _ = sequence_logps(model, batch, chunk)
    return c.detach(), r.detach()


def pair_losses(logp_c, logp_r, ref_c, ref_r, cfg: Config, tokens_c=None, tokens_r=None) -> torch.Tensor:
    """The per-pair loss of `cfg.loss` (see the module docstring)."""
    if cfg.loss == "ipo":
        h = (logp_c - ref_c) / tokens_c.clamp(min=1) - (logp_r - ref_r) / tokens_r.clamp(min=1)
        return (h - 1 / (2 * cfg.beta)) ** 2
    h = (logp_c - ref_c) - (logp_r - ref_r)
    eps = cfg.label_smoothing
    return -(1 - eps) * F.logsigmoid(cfg.beta * h) - eps * F.logsigmoid(-cfg.beta * h)


def loss(model, batch, cfg: Config) -> Loss:
    ref_c, ref_r = reference_logps(model, batch, cfg.loss_chunk)
    logp_c, logp_r, n_c, n_r = sequence_logps(model, batch, cfg.loss_chunk)
    per_pair = pair_losses(logp_c, logp_r, ref_c, ref_r, cfg, n_c, n_r)
    return Loss(per_pair.sum(), per_pair.numel())


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    ref_c, ref_r = reference_logps(model, batch, cfg.loss_chunk)
    logp_c, logp_r, n_c, n_r = sequence_logps(model, batch, cfg.loss_chunk)
    return {"chosen_logps": logp_c.tolist(), "rejected_logps": logp_r.tolist(), "ref_chosen_logps": ref_c.tolist(),
            "ref_rejected_logps": ref_r.tolist(),
            "loss": pair_losses(logp_c, logp_r, ref_c, ref_r, cfg, n_c, n_r).tolist()}


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    n = max(1, len(outputs["loss"]))
    chosen = [cfg.beta * (p - r) for p, r in zip(outputs["chosen_logps"], outputs["ref_chosen_logps"])]
    rejected = [cfg.beta * (p - r) for p, r in zip(outputs["rejected_logps"], outputs["ref_rejected_logps"])]
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {
        "reward_accuracy": preference_accuracy(margins),
        "reward_margin": sum(margins) / n,
        "chosen_reward": sum(chosen) / n,
        "rejected_reward": sum(rejected) / n,
        "chosen_logps": sum(outputs["chosen_logps"]) / n,
        "rejected_logps": sum(outputs["rejected_logps"]) / n,
        "logp_accuracy": preference_accuracy([c - r for c, r in zip(outputs["chosen_logps"],
                                                                     outputs["rejected_logps"])]),
        "loss": sum(outputs["loss"]) / n,
    }


# ---------------------------------------------------------------------------------------------
# Precomputed reference


def uses_precomputed(model, cfg: Config) -> bool:
    return cfg.precompute_ref if cfg.precompute_ref is not None else reference_switch(model) is None


@torch.no_grad()
def attach_reference(model, examples: dict[str, list[dict]], cfg: Config, batch_size: int, pad_id: int,
                     accelerator=None) -> None:
    """Before training (the model is its starting point): if the reference is precomputed, store its log-probs
    in every example of every split. Batches are formed as evaluation forms them, so the starting model's
    held-out margins come out exactly 0."""
    if not uses_precomputed(model, cfg):
        return
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
                    c, r, _, _ = sequence_logps(model, batch, cfg.loss_chunk)
                for i, ci, ri in zip(idx, c.tolist(), r.tolist()):
                    split[i][REF_KEYS[0]], split[i][REF_KEYS[1]] = ci, ri
    model.train(was_training)


def attach_reference_for(trained, examples: dict[str, list[dict]], batch_size: int, starting_model) -> None:
    """Scoring a finished run (`tunesmith eval`): give its examples the reference log-probs. A run whose
    tuning has an adapter to switch off is its own reference; one that trained the base weights has its
    starting model loaded again to compute them (`starting_model()`, built by the caller)."""
    has_switch = reference_switch(trained.model) is not None
    if has_switch and not trained.obj_cfg.precompute_ref:
        return  # computed on the fly with the adapter off
    reference = trained.model if has_switch else starting_model()
    cfg = trained.obj_cfg.model_copy(update={"precompute_ref": True})
    attach_reference(reference, examples, cfg, batch_size, trained.tokenizer.pad_token_id)
