"""GRPO (Shao et al. 2024, DeepSeekMath): RL from verifiable rewards without a value model. Each prompt (or
environment episode) is answered G times; an answer's advantage is its reward against its group's:

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      scale_rewards: group (the paper)
    A_i =  r_i - mean(r_group)                               scale_rewards: none (Dr. GRPO, Liu et al. 2025)

(std: the sample standard deviation of the group, as trl computes it). Every token of an answer gets its
answer's advantage; the loss per token is PPO's clipped ratio plus an optional KL to the reference,

    l_t = -min(rho_t A, clip(rho_t, 1 - clip, 1 + clip_high) A) + beta * (exp(q_t) - q_t - 1),  q_t = log pi_ref - log pi

(rho_t = pi / pi_old per token; the KL term is the unbiased k3 estimator of the paper). Aggregation:
    loss_agg: sequence   each answer's mean over its tokens, then the mean over answers (the paper)
    loss_agg: token      the mean over every token of the minibatch (DAPO, Yu et al. 2025: long answers count
                         by their length)

beta 0 runs no reference forward in training at all (the KL to the reference is still measured on the held-out
prompts before and after). No value head. Any tuning; LoRA's reference is the same weights with the adapter off.

Answers come from `objective.reward` on the data's prompts or from an environment (`objective.env`); the prompts,
sampling and loop settings it shares with ppo are in rl.py, its loop is train/grpo.py.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from .rl import UNUSED_TRAIN_SETTINGS, RLConfig, check, make_splits, masked_mean, prepare  # noqa: F401

HEAD = "causal-lm"
METRICS = {"reward": "max", "kl": None}  # kl: some drift is the point; kl_bound warns when there is too much
MAIN_METRIC = "reward"
OWNS_STEP = True


class Config(RLConfig):
    """GRPO's own settings; the reward (or environment), sampling and prompt settings are `RLConfig`'s."""

    kind: Literal["grpo"] = "grpo"
    """GRPO: G sampled answers per prompt, advantages against the group's mean reward, a clipped ratio loss."""
    group_size: int = Field(8, ge=2)
    """G: answers sampled per prompt (or episodes per seed); a step answers train.batch_size prompts G times."""
    beta: float = Field(0.04, ge=0)
    """Weight of the per-token KL to the reference (the starting model); 0: no reference forward in training."""
    clip: float = Field(0.2, gt=0, lt=1)
    """Clip range of the policy ratio (below 1: 1 - clip)."""
    clip_high: Optional[float] = Field(None, gt=0)
    """Upper clip range (1 + clip_high; DAPO's clip-higher, e.g. 0.28); null: the same as `clip`."""
    scale_rewards: Literal["group", "none"] = "group"
    """Divide advantages by their group's reward std (group, the paper) or not (none, Dr. GRPO: no bias towards
    groups whose rewards barely differ)."""
    loss_agg: Literal["sequence", "token"] = "sequence"
    """Average the per-token losses per answer then over answers (sequence), or over all tokens (token, DAPO)."""
    epochs: int = Field(1, ge=1)
    """Optimisation passes over each rollout batch (mu in the paper); 1: one update per batch on fresh samples."""
    minibatch: Optional[int] = Field(None, ge=1)
    """Answers per optimizer update within a pass; null: all answers of the step in one update."""
    micro_batch: int = Field(16, ge=1)
    """Answers per forward pass within an update (their gradients accumulate); only memory depends on it."""



def kl_hint(cfg) -> str:
    """What to change when the tuned policy drifted past `kl_bound`."""
    return f"raise objective.beta ({cfg.beta:g} -> {cfg.beta * 2 or 0.04:g})"


# ---------------------------------------------------------------------------------------------
# The GRPO pieces. Shapes: scores and advantages (N,), N = prompts x G, each group's answers consecutive;
# per-token tensors (N, L), answers left-aligned; `mask` is 1 on answer tokens.


def group_advantages(scores: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Each answer's reward against its group's mean, divided by the group's std with scale `group`."""
    groups = scores.view(-1, group_size)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        advantages = advantages / (groups.std(1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


def per_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float,
                   clip_high: float | None = None, ref_logp: torch.Tensor | None = None, beta: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The loss of every token (to minimise), where the clip was active (1.0/0.0), and the k3 KL to the reference
    per token (None without a reference)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip, 1 + (clip if clip_high is None else clip_high)) * a
    loss = -torch.min(unclipped, clipped)
    kl = None
    if ref_logp is not None:
        q = ref_logp - logp
        kl = torch.exp(q) - q - 1
        loss = loss + beta * kl
    return loss, (clipped < unclipped).float(), kl


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, units it is summed over): per answer means summed over answers (sequence), or the sum over
    tokens (token). Divide the sum over a minibatch's pieces by the minibatch's units: the mean the paper takes."""
    if how == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum(), torch.tensor(float(len(mask)))
    return (per_token * mask).sum(), mask.sum()
