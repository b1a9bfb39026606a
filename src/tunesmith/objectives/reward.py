"""Reward modelling: a scalar score per (prompt, answer), trained so preferred answers score higher.

Data: preference pairs (objectives/pairs.py: prompt/chosen/rejected rows, sharegpt preference rows,
scored answers), rendered with the chat template as sft renders them. The model is the base with a
one-output classification head (`AutoModelForSequenceClassification`, num_labels=1); on a causal LM the
score is read at the last token that is not padding (transformers finds it by config.pad_token_id,
which tunesmith sets from the tokenizer).

Loss (Bradley-Terry, as in InstructGPT and trl's RewardTrainer), per pair:
    -log sigmoid(r_chosen - r_rejected)  +  center * (r_chosen + r_rejected)^2
the second term (off by default) keeps scores centred on zero, so they can be compared across prompts.
Chosen and rejected go through the model in one forward. The loss unit is a pair.

Metrics on held-out pairs: `accuracy` (share of pairs with r_chosen > r_rejected, a tie counting half),
`margin` (mean r_chosen - r_rejected) and `loss`.

Using a trained reward model (what a later stage or PPO does):

    from tunesmith.trained import load_trained
    from tunesmith.objectives.reward import score
    rm = load_trained("runs/my-reward")           # a finished reward run folder
    score(rm, prompts, answers)                   # -> list[float], one score per (prompt, answer)

`prompts` are strings (one user turn) or lists of `{"role", "content"}` messages; `answers` are strings.
Each pair is rendered with the run's own chat template and answer closed by its end-of-turn token,
exactly as in training, and scored in batches (`batch_size`, default 16) with no gradient.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field

from ..data.collate import collate
from ..errors import ConfigError
from ..evaluate.baselines import chance_pairs
from ..schema import Section
from .common import Loss, Prepared
from .pairs import prepare_pairs
from .sft import fit_length

HEAD = "sequence-classification"
METRICS = {"accuracy": "max", "margin": "max", "loss": "min"}
MAIN_METRIC = "accuracy"
CHAT = True
"""Renders conversations with a chat template (kept with the trained tokenizer) though its head is no LM."""


class Config(Section):
    kind: Literal["reward"] = "reward"
    """Reward model: a scalar score per answer, Bradley-Terry loss on preference pairs."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template rendering prompt and answer (as in sft): the tokenizer's own, or a fallback."""
    system: Optional[str] = None
    """System message put first in every conversation that has none (also when scoring)."""
    center: float = Field(0.0, ge=0)
    """Weight of (r_chosen + r_rejected)^2 in the loss: keeps scores near zero (trl's center_rewards_coefficient,
    suggested 0.01); 0 turns it off."""


def check_model(cfg: Config, model_config) -> None:
    """A reward model needs a sequence-classification class for this architecture."""
    from transformers import AutoModelForSequenceClassification

    if type(model_config) not in AutoModelForSequenceClassification._model_mapping:
        raise ConfigError(f"{model_config.model_type!r} models have no sequence-classification class in "
                          "transformers, so they cannot carry a reward head", where="objective.kind",
                          hint="use a base model of another architecture (llama, qwen2, mistral, gpt2, bert, ...)")


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    prepared = prepare_pairs(splits, tokenizer, cfg.template, cfg.system, data, labels=False)
    prepared.model_kwargs = plan_kwargs(cfg)
    return prepared


def _stack(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] ids and masks, padded to one width (pads right: the score reads the last real token)."""
    c, r = batch["input_ids"], batch["rejected_input_ids"]
    width = max(c.size(1), r.size(1))
    ids = torch.cat([F.pad(c, (0, width - c.size(1))), F.pad(r, (0, width - r.size(1)))])
    mask = torch.cat([F.pad(batch["attention_mask"], (0, width - c.size(1))),
                      F.pad(batch["rejected_attention_mask"], (0, width - r.size(1)))])
    return ids, mask


def rewards(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of a batch of pairs, from one forward over both."""
    ids, mask = _stack(batch)
    ids = ids.masked_fill(mask == 0, _pad_id(model))  # the head finds the last real token by the pad id
    scores = model(input_ids=ids, attention_mask=mask).logits.float().squeeze(-1)
    return scores.chunk(2)


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    return 0 if pad is None else pad


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0) -> torch.Tensor:
    """Per-pair loss: -log sigmoid(r_c - r_r) (+ center * (r_c + r_r)^2)."""
    loss = -F.logsigmoid(chosen - rejected)
    return loss + center * (chosen + rejected) ** 2 if center else loss


def loss(model, batch, cfg: Config) -> Loss:
    chosen, rejected = rewards(model, batch)
    per_pair = bradley_terry(chosen, rejected, cfg.center)
    return Loss(per_pair.sum(), chosen.numel(), {"accuracy": float((chosen > rejected).float().mean())})


def eval_step(model, batch, cfg: Config) -> dict[str, list]:
    chosen, rejected = rewards(model, batch)
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist(),
            "loss": bradley_terry(chosen, rejected, cfg.center).tolist()}


def preference_accuracy(margins: list[float]) -> float:
    """Share of pairs whose margin is positive; a tie (margin 0, e.g. a model equal to its reference) counts half."""
    return sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / max(1, len(margins))


def metrics(outputs: dict[str, list], cfg: Config) -> dict[str, float]:
    margins = [c - r for c, r in zip(outputs["chosen"], outputs["rejected"])]
    n = max(1, len(margins))
    return {"accuracy": preference_accuracy(margins), "margin": sum(margins) / n, "loss": sum(outputs["loss"]) / n}


def baselines(prepared: Prepared, cfg: Config, seed: int) -> dict:
    """Chance: a model that cannot tell the answers apart ties every held-out pair (accuracy 0.5, loss log 2)."""
    held = {s: len(prepared.examples[s]) for s in ("validation", "test") if prepared.examples.get(s)}
    if not held:
        return {}
    return {"chance": {"about": "a coin toss between the two answers",
                       **{s: metrics(chance_pairs(n), cfg) for s, n in held.items()}}}


@torch.no_grad()
def score(trained, prompts: list, answers: list[str], batch_size: int = 16) -> list[float]:
    """The reward of each (prompt, answer): a `load_trained` reward run, prompts as strings or message lists.

    Rendered with the run's chat template as training rendered them, cut to the run's data.max_length
    (the prompt shortened first, as in training), scored in batches of `batch_size`, in the order given.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    if getattr(trained.obj_cfg, "kind", None) != "reward" or trained.chat is None:
        raise ConfigError(f"{trained.name} is not a reward run (objective: {getattr(trained.obj_cfg, 'kind', None)})",
                          hint="train one with objective: {kind: reward}")
    model = trained.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = []
    for prompt, answer in zip(prompts, answers):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        ids, _, _, _ = fit_length(trained.chat, messages + [{"role": "assistant", "content": answer}], "last",
                                  trained.data_cfg.max_length)
        encoded.append({"input_ids": ids})
    pad = _pad_id(model)
    out: list[float] = []
    for s in range(0, len(encoded), batch_size):
        batch = collate(encoded[s:s + batch_size], pad)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out += logits.float().squeeze(-1).tolist()
    model.train(was_training)
    return out


def plan_kwargs(cfg: Config) -> dict:
    """The head for planning without reading data: one output."""
    return {"num_labels": 1}
