"""RLHF with PPO (Ziegler et al. 2019; Ouyang et al. 2022): the policy answers prompts, a reward scores the
answers, and PPO raises the reward while a per-token KL penalty keeps the policy near where it started.

Data: prompts scored by `objective.reward`, or an environment's episodes (`objective.env`, tunesmith/envs); both,
and the settings PPO shares with the other RL objectives, are in rl.py.

The pieces, each a small function here (the loop is train/ppo.py, its rollouts train/rollout.py; the reward's
config rewards.py, its scorer built by the run layer in scorers.py):
  per-token rewards   -kl_coef * (log pi - log pi_ref) on every answer token, the score added at the last one
  gae                 advantages and returns (Schulman et al. 2016), gamma and lam
  policy_loss         the clipped surrogate, on whitened advantages
  value_loss          the clipped value loss (a linear value head on the policy's last hidden state)
  KLController        the adaptive coefficient: coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon

PPO owns its step (rollouts, then several epochs of minibatch updates), so it has no `loss` for the
shared loop; run.py hands it to train/ppo.py instead (`OWNS_STEP`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..schema import Section
from .rl import (PROMPT_FORMATS, UNUSED_TRAIN_SETTINGS, RLConfig, _prompt_of, check, make_splits,  # noqa: F401
                 masked_mean, prepare, shorten)
from .rewards import RewardConfig  # noqa: F401  (re-exported: the reward's config)

HEAD = "causal-lm"
METRICS = {"reward": "max", "kl": None}  # kl: some drift is the point; kl_bound warns when there is too much
MAIN_METRIC = "reward"
OWNS_STEP = True


class KLConfig(Section):
    coef: float = Field(0.1, ge=0)
    """Starting weight of the per-token KL penalty against the reference (the frozen starting model)."""
    adaptive: bool = True
    """Adapt the weight towards `target` (Ziegler et al. 2019); false keeps `coef` fixed."""
    target: float = Field(4.0, gt=0)
    """Target KL per answer (nats, summed over its tokens) for the adaptive weight."""
    horizon: int = Field(10000, ge=1)
    """Answers over which the adaptive weight may change by about e^0.2 (larger: slower adaptation)."""


class Config(RLConfig):
    """PPO's own settings; the reward (or environment), sampling and prompt settings are `RLConfig`'s."""

    kind: Literal["ppo"] = "ppo"
    """RLHF with PPO: generate answers to prompts, score them with a reward, maximise it under a KL penalty."""
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


def kl_hint(cfg) -> str:
    """What to change when the tuned policy drifted past `kl_bound`."""
    return (f"raise objective.kl.coef ({cfg.kl.coef:g} -> {cfg.kl.coef * 2 or 0.1:g})"
            + (f" or lower objective.kl.target ({cfg.kl.target:g} -> {cfg.kl.target / 2:g})" if cfg.kl.adaptive else ""))


# ---------------------------------------------------------------------------------------------
# The PPO pieces. Shapes: (batch, answer tokens), answers left-aligned; `mask` is 1 on answer tokens.


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
