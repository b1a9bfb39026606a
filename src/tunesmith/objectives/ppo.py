"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022): the policy answers prompts, a reward scores the
answers, and PPO raises the reward while a per-token KL penalty keeps the policy near where it started.

Data: prompts only (`{"prompt": ...}` rows; plain `text` rows, every sft format (the last assistant turn
dropped) and preference rows (their prompt) also work). Prompts render through the chat template exactly as sft renders them.

The pieces, each a small function here (the loop is train/ppo.py; the reward's config rewards.py, its scorer
built by the run layer in scorers.py):
  per-token rewards   -kl_coef * (log pi - log pi_ref) on every answer token, the score added at the last one
  gae                 advantages and returns (Schulman et al. 2016), gamma and lam
  policy_loss         the clipped surrogate, on whitened advantages
  value_loss          the clipped value loss (a linear value head on the policy's last hidden state)
  KLController        the adaptive coefficient: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon

PPO owns its step (rollouts, then several epochs of minibatch updates), so it has no `loss` for the
shared loop; run.py hands it to train/ppo.py instead (`OWNS_STEP`).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from ..data.formats import FormatError, _prompt_messages, row_error, split_format, to_conversation, to_preference
from ..data.templates import ChatFormat, TemplateError
from ..data.tokenize import length_stats
from ..errors import DataError
from ..schema import Section
from .common import Prepared
from .rewards import RewardConfig

HEAD = "causal-lm"
METRICS = {"reward": "max", "kl": None}  # kl: some drift is the point; kl_bound warns when there is too much
MAIN_METRIC = "reward"
OWNS_STEP = True
PROMPT_FORMATS = ("prompt", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference",
                  "sharegpt_preference")


class KLConfig(Section):
    coef: float = Field(0.1, ge=0)
    """Starting weight of the per-token KL penalty against the reference (the frozen starting model)."""
    adaptive: bool = True
    """Adapt the weight towards `target` (Ziegler et al. 2019); false keeps `coef` fixed."""
    target: float = Field(4.0, gt=0)
    """Target KL per answer (nats, summed over its tokens) for the adaptive weight."""
    horizon: int = Field(10000, ge=1)
    """Answers over which the adaptive weight may change by about e^0.2 (larger: slower adaptation)."""


class Config(Section):
    kind: Literal["ppo"] = "ppo"
    """RLHF with PPO: generate answers to prompts, score them with a reward, maximise it under a KL penalty."""
    reward: RewardConfig
    """The reward: a reward-model run, a classifier run and label, or a Python function."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template the prompts render with (as in sft); `raw` continues the prompt text with no markup."""
    system: Optional[str] = None
    """System message put first in every prompt that has none."""
    prompt_words: Optional[int] = Field(None, ge=1)
    """Keep only the first N words of each prompt (e.g. the start of a review for the policy to continue)."""
    max_new_tokens: int = Field(24, ge=1)
    """Most tokens per answer, in rollouts and in the evaluation before and after training."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts (1.0: the whole distribution, as PPO's ratios assume)."""
    ppo_epochs: int = Field(4, ge=1)
    """Optimisation passes over each rollout batch (train.batch_size answers)."""
    minibatch: int = Field(8, ge=1)
    """Answers per optimizer update within a pass."""
    clip: float = Field(0.2, gt=0)
    """Clip range of the policy ratio."""
    value_clip: float = Field(0.2, gt=0)
    """Clip range of the value prediction around its rollout-time value."""
    value_coef: float = Field(0.1, ge=0)
    """Weight of the value loss beside the policy loss."""
    gamma: float = Field(1.0, gt=0, le=1)
    """Discount per token."""
    lam: float = Field(0.95, ge=0, le=1)
    """GAE lambda: 1 uses the full return, 0 one-step temporal differences."""
    kl: KLConfig = KLConfig()
    """The KL penalty against the reference model."""
    kl_bound: float = Field(10.0, gt=0)
    """Warn when the tuned model's KL to the reference on held-out prompts (nats per answer) ends above this."""


# ---------------------------------------------------------------------------------------------
# Data: prompts


def _prompt_of(row: dict, fmt: str) -> list[dict]:
    if fmt == "prompt":
        if "prompt" not in row:
            raise FormatError("missing prompt")
        return _prompt_messages(row["prompt"])
    if fmt == "text":
        return [{"role": "user", "content": to_conversation(row, "text")}]
    if fmt in ("preference", "sharegpt_preference"):  # the prompts a reward model was trained on
        return to_preference(row, fmt)[0]
    return to_conversation(row, fmt)[:-1]


def shorten(conv: list[dict], words: int | None) -> list[dict]:
    """The prompt with its last message cut to its first `words` words."""
    if words is None:
        return conv
    return conv[:-1] + [{**conv[-1], "content": " ".join(conv[-1]["content"].split()[:words])}]


def prepare(splits, tokenizer, cfg: Config, data) -> Prepared:
    chat = ChatFormat.build(tokenizer, cfg.template, cfg.system)
    longest = data.max_length - cfg.max_new_tokens
    if longest < 1:
        raise DataError(f"data.max_length {data.max_length} leaves no room for prompts beside "
                        f"objective.max_new_tokens {cfg.max_new_tokens}", where="data.max_length")
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = split_format(part, data.format, PROMPT_FORMATS)
        encoded, convs, cut = [], [], 0
        for i, row in enumerate(part.rows):
            try:
                conv = shorten(_prompt_of(row, fmt), cfg.prompt_words)
                ids = chat.encode_prompt(conv)
            except (FormatError, TemplateError) as e:
                raise row_error(part, i, fmt, str(e), PROMPT_FORMATS) from None
            if len(ids) > longest:  # keep the end: the generation prompt sits there
                ids, cut = ids[-longest:], cut + 1
            encoded.append({"input_ids": ids})
            convs.append(conv)
        examples[name] = encoded
        prompts[name] = [{"messages": c, "reference": ""} for c in convs]
        card[name] = {"rows": len(encoded), "format": fmt, "truncated": cut,
                      "tokens": length_stats([len(e["input_ids"]) for e in encoded])}
    card["template"], card["end_of_turn"] = chat.name, chat.end_of_turn
    return Prepared(examples, {}, card, chat=chat, prompts=prompts)


UNUSED_TRAIN_SETTINGS = {
    "eval_every": "it measures reward and KL on held-out prompts once, before and after training",
    "early_stopping": "it trains for train.max_steps (or train.epochs) rollout steps",
    "precision": "its rollouts and updates run in the weights' own dtype (see model.dtype)",
}


def check(run_cfg, methods) -> None:
    """Settings of the shared loop that PPO's own loop does not take."""
    if run_cfg.train.grad_accum != 1:
        raise ValueError(f"train.grad_accum: {run_cfg.objective.kind} takes train.batch_size answers per step and "
                         "updates on them in objective.minibatch pieces; it does not accumulate")
    default = type(run_cfg.train)()
    for key, why in UNUSED_TRAIN_SETTINGS.items():
        # a value, not whether it was written: a saved run config spells out every default
        if getattr(run_cfg.train, key) != getattr(default, key):
            raise ValueError(f"train.{key}: {run_cfg.objective.kind} does not use it ({why}); remove it")
    if methods.regime.ALTERS_TRAINING:
        raise ValueError(f"regime.kind: {run_cfg.objective.kind} trains in its own loop, which takes no replay rows or "
                         f"penalty (regime {run_cfg.regime.kind!r}); its KL penalty already holds it near the start")


# ---------------------------------------------------------------------------------------------
# The PPO pieces. Shapes: (batch, answer tokens), answers left-aligned; `mask` is 1 on answer tokens.


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    return (out if shift_mean else out + mean) * mask


def token_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: the KL penalty on every answer token, the answer's score added at its last token.
    Returns (rewards, per-token KL)."""
    kl = (logp - ref_logp) * mask
    rewards = -kl_coef * kl
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; the value after an answer's last token is 0."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        nxt = values[:, t + 1] * mask[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - values[:, t]
        carry = last * mask[:, t + 1] if t + 1 < rewards.shape[1] else last
        last = delta + gamma * lam * carry
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (to minimise) and the fraction of tokens where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss 0.5 * max((v - R)^2, (v_clipped - R)^2) and the fraction clipped."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    a, b = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * masked_mean(torch.max(a, b), mask), masked_mean((b > a).float(), mask)


class KLController:
    """The KL penalty's weight: fixed, or adapted towards a target KL (Ziegler et al. 2019, eq. 2)."""

    def __init__(self, cfg: KLConfig, value: float | None = None):
        self.cfg = cfg
        self.value = cfg.coef if value is None else value

    def update(self, kl: float, n: int) -> None:
        """After a batch of `n` answers whose mean KL (per answer) was `kl`."""
        if not self.cfg.adaptive:
            return
        error = min(max(kl / self.cfg.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n / self.cfg.horizon
