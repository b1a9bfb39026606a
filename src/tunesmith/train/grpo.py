"""GRPO's loop: each step answers train.batch_size prompts (or episode seeds) G times, scores the answers, and
updates the policy on group-normalised advantages (objectives/grpo.py), with no value head.

Its steps run in the RL loop (train/rl.py: schedule, progress, checkpoints for `--resume`, metrics.jsonl); its
answers come from train/rollout.py. The log-probabilities at sampling time ("old") are measured in a forward
pass only when a step makes more than one update (objective.epochs > 1, or minibatches): with one update they
equal the current ones, as in trl. The reference is asked only when objective.beta > 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import GenerateConfig
from . import rl
from .loop import TrainingDiverged
from ..objectives import grpo as objective
from .rollout import measure, token_logps

LOGGED = ("reward", "reward_std", "flat_groups", "kl_per_token", "loss", "clip_frac", "entropy",
          "answer_tokens")


class Policy(nn.Module):
    """The policy alone, under the same name as PPO's (`policy.`), so its checkpoints read alike."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy


OBJECTIVE = objective
"""The objective this loop trains."""


def wrap(model: nn.Module) -> Policy:
    return Policy(model)


def save_extra(trainee: Policy, run_dir: Path) -> None:
    """Nothing beside the policy's weights (GRPO has no value head)."""


def updates_per_step(answers: int, obj) -> int:
    return obj.epochs * math.ceil(answers / (obj.minibatch or answers))


def grpo_step(trainee: Policy, reference, source, idx, obj, seed: int, optimizer, scheduler, max_grad_norm
              ) -> dict[str, float]:
    """One rollout batch (each prompt answered G times) and the updates on it; returns the step's statistics."""
    policy, G = trainee.policy, obj.group_size
    settings = GenerateConfig(max_new_tokens=obj.max_new_tokens, do_sample=True, temperature=obj.temperature,
                              top_p=obj.top_p, batch_size=len(idx) * G)
    batch = source.sample(policy, "train", idx, settings, seed, copies=G)
    r, n = batch.rollout, len(batch.rollout)
    advantages = objective.group_advantages(batch.scores, G, obj.scale_rewards)
    size = obj.minibatch or n
    with torch.no_grad():  # what the updates compare against, measured once on the sampled answers
        if updates_per_step(n, obj) > 1:
            r.logp = measure(lambda rows: token_logps(policy, rows)[0], r, obj.micro_batch)
        ref_logp = measure(reference, r, obj.micro_batch) if obj.beta > 0 else None
    trainable = [p for p in trainee.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(obj.epochs):
        order = torch.randperm(n, generator=generator).to(r.ids.device) if size < n else \
            torch.arange(n, device=r.ids.device)
        for s in range(0, n, size):
            rows = order[s:s + size]
            _, units = objective.aggregate(torch.zeros_like(r.mask[rows]), r.mask[rows], obj.loss_agg)
            total = {"loss": 0.0, "clip_frac": 0.0, "entropy": 0.0, "kl_per_token": 0.0}
            for c in range(0, len(rows), obj.micro_batch):
                part = rows[c:c + obj.micro_batch]
                mb = r.rows(part)
                logp, entropy, _ = token_logps(policy, mb)
                old = mb.logp if mb.logp is not None else logp.detach()
                per_token, clipped, kl = objective.per_token_loss(
                    logp, old, advantages[part], obj.clip, obj.clip_high,
                    ref_logp[part] if ref_logp is not None else None, obj.beta)
                loss, _ = objective.aggregate(per_token, mb.mask, obj.loss_agg)
                if not math.isfinite(float(loss.detach())):
                    raise TrainingDiverged(f"the GRPO loss became {float(loss.detach())}",
                                           hint="lower train.lr or objective.clip; the last good checkpoint is kept")
                (loss / units).backward()
                with torch.no_grad():
                    share = mb.mask.sum() / r.mask[rows].sum().clamp(min=1)  # token-weighted means over the update
                    total["loss"] += float(loss / units)
                    total["clip_frac"] += float(objective.masked_mean(clipped, mb.mask) * share)
                    total["entropy"] += float(objective.masked_mean(entropy, mb.mask) * share)
                    if kl is not None:
                        total["kl_per_token"] += float(objective.masked_mean(kl, mb.mask) * share)
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in total.items():
                if k != "kl_per_token" or ref_logp is not None:  # the k3 estimate, measured only with beta > 0
                    sums[k] = sums.get(k, 0.0) + v
            updates += 1
    groups = batch.scores.view(-1, G)
    stats = {k: v / updates for k, v in sums.items()}
    stats.update(reward=float(batch.scores.mean()), reward_std=float(groups.std(1).mean()),
                 # groups whose answers all scored alike teach nothing (zero advantages)
                 flat_groups=float((groups.max(1).values == groups.min(1).values).float().mean()),
                 answer_tokens=float(r.mask.sum(1).mean()), answers=n)
    return stats


@dataclass
class GRPOState:
    """What `--resume` needs beyond weights, optimizer and RNG (saved in each checkpoint)."""

    step: int = 0
    seconds: float = 0.0
    answers: int = 0
    window: dict = field(default_factory=dict)
    """Summed statistics since the last metrics line, and their count under `n`."""


def fit(*, model: Policy, reference, source, rows: int, obj, cfg, run_dir: Path, resume: bool = False, say=print,
        accelerator=None) -> dict:
    """Train in place for train.max_steps GRPO steps (or train.epochs passes over the `rows` training prompts, each
    step answering train.batch_size of them G times); returns a summary of the training. With objective.beta 0 the
    steps are given no reference at all (the evaluation before and after still measures the KL with it)."""
    reference = reference if obj.beta > 0 else None

    def step(idx, seed, state, optimizer, scheduler):
        return grpo_step(model, reference, source, idx, obj, seed, optimizer, scheduler, cfg.max_grad_norm)

    state, total = rl.fit(model=model, step=step, rows=rows, cfg=cfg, run_dir=run_dir, resume=resume, say=say,
                          accelerator=accelerator, state=GRPOState(), logged=LOGGED,
                          updates_per_step=updates_per_step(cfg.batch_size * obj.group_size, obj), desc="grpo",
                          shown={"reward": ".3f", "kl_per_token": ".4f"})
    return rl.summary(state, total, rows, cfg.batch_size)
