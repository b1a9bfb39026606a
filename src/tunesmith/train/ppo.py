"""PPO's loop: rollouts, rewards, GAE, then several epochs of clipped-surrogate updates per batch.

Its steps run in the RL loop (train/rl.py: AdamW parameter groups, the learning-rate schedule, the progress line,
checkpoints for `--resume`, metrics.jsonl, the NaN stop); its answers come from train/rollout.py (prompts scored
by a reward, or an environment's episodes).

Determinism: rollouts are sampled with the seed `train.seed` and the step number, minibatch order with a
generator seeded the same way, so a resumed run repeats an uninterrupted one exactly on CPU.

The model in training is `PolicyAndValue`: the policy (full, or a peft model whose adapter trains) and a
linear value head on its last hidden state, training beside it. The reference is the frozen start: the
same weights with the adapter switched off (`disable_adapter()`, no second copy), or a frozen copy for
full tuning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..config import GenerateConfig
from ..objectives import ppo
from . import rl, rollout
from .loop import TrainingDiverged
from .rollout import Rollout, assemble, single_turn  # noqa: F401  (re-exported)

LOGGED = ("score", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "policy_loss", "approx_kl", "answer_tokens",
          "value_clip_frac", "reward")


class PolicyAndValue(nn.Module):
    """The policy and its value head, one module so checkpoints and the optimizer see both."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no random bias in the first advantages
        nn.init.zeros_(self.value_head.bias)


OBJECTIVE = ppo
"""The objective this loop trains."""


def wrap(model: nn.Module) -> PolicyAndValue:
    """What trains: the policy with its value head."""
    return PolicyAndValue(model)


def save_extra(pv: PolicyAndValue, run_dir: Path) -> None:
    """The value head beside the policy's weights (a later PPO stage or analysis may read it)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in pv.value_head.state_dict().items()},
              run_dir / "value_head.safetensors")


def forward(pv: PolicyAndValue, r: Rollout, values: bool = True):
    """Log-probabilities of the answer tokens, their entropies and the values of the states before them, each (B, L)."""
    logp, entropy, hidden = rollout.token_logps(pv.policy, r, hidden=values)
    return logp, entropy, pv.value_head(hidden.float()).squeeze(-1) if values else None


def make_reference(pv: PolicyAndValue):
    return rollout.make_reference(pv.policy)


def ppo_step(pv, reference, source, idx, obj, kl_coef: float, seed: int, optimizer, scheduler, max_grad_norm
             ) -> dict[str, float]:
    """One rollout batch and the updates on it; returns the step's statistics."""
    settings = GenerateConfig(max_new_tokens=obj.max_new_tokens, do_sample=True, temperature=obj.temperature,
                              top_p=obj.top_p, batch_size=len(idx))
    batch = source.sample(pv.policy, "train", idx, settings, seed)
    r, scores = batch.rollout, batch.scores
    with torch.no_grad():
        r.logp, _, r.values = forward(pv, r)
        rewards, kl = ppo.token_rewards(scores, r.logp, reference(r), r.mask, kl_coef)
        advantages, r.returns = ppo.gae(rewards, r.values, r.mask, obj.gamma, obj.lam)
        r.advantages = ppo.whiten(advantages, r.mask)
    trainable = [p for p in pv.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(obj.ppo_epochs):
        order = torch.randperm(len(r), generator=generator).to(r.ids.device)
        for s in range(0, len(r), obj.minibatch):
            mb = r.rows(order[s:s + obj.minibatch])
            logp, entropy, values = forward(pv, mb)
            pg, clip_frac = ppo.policy_loss(logp, mb.logp, mb.advantages, mb.mask, obj.clip)
            vf, vclip = ppo.value_loss(values, mb.values, mb.returns, mb.mask, obj.value_clip)
            loss = pg + obj.value_coef * vf
            if not math.isfinite(float(loss.detach())):
                raise TrainingDiverged(f"the PPO loss became {float(loss.detach())}",
                                       hint="lower train.lr or objective.clip; the last good checkpoint is kept")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, v in (("policy_loss", pg), ("value_loss", vf), ("clip_frac", clip_frac),
                             ("value_clip_frac", vclip), ("entropy", ppo.masked_mean(entropy, mb.mask)),
                             ("approx_kl", 0.5 * ppo.masked_mean((logp - mb.logp) ** 2, mb.mask))):
                    sums[k] = sums.get(k, 0.0) + float(v)
            updates += 1
    stats = {k: v / updates for k, v in sums.items()}
    stats.update(score=float(scores.mean()), kl=float(kl.sum(1).mean()), kl_coef=kl_coef,
                 reward=float(rewards.sum(1).mean()), answer_tokens=float(r.mask.sum(1).mean()), answers=len(r))
    return stats


@dataclass
class PPOState:
    """What `--resume` needs beyond weights, optimizer and RNG (saved in each checkpoint)."""

    step: int = 0
    kl_coef: float = 0.0
    seconds: float = 0.0
    answers: int = 0
    window: dict = field(default_factory=dict)
    """Summed statistics since the last metrics line, and their count under `n`."""


def updates_per_step(batch: int, obj) -> int:
    return obj.ppo_epochs * math.ceil(batch / obj.minibatch)


def fit(*, model: PolicyAndValue, reference, source, rows: int, obj, cfg, run_dir: Path, resume: bool = False,
        say=print, accelerator=None) -> dict:
    """Train in place for train.max_steps PPO steps (or train.epochs passes over the `rows` training prompts, each
    step answering train.batch_size of them); returns a summary of the training. `accelerator`: the run's, whose
    trackers (train.report_to) receive each metrics line."""
    controller = ppo.KLController(obj.kl)

    def step(idx, seed, state, optimizer, scheduler):
        controller.value = state.kl_coef
        stats = ppo_step(model, reference, source, idx, obj, state.kl_coef, seed, optimizer, scheduler,
                         cfg.max_grad_norm)
        controller.update(stats["kl"], len(idx))
        state.kl_coef = controller.value
        return stats

    state, total = rl.fit(model=model, step=step, rows=rows, cfg=cfg, run_dir=run_dir, resume=resume, say=say,
                          accelerator=accelerator, state=PPOState(kl_coef=controller.value), logged=LOGGED,
                          updates_per_step=updates_per_step(cfg.batch_size, obj), desc="ppo",
                          shown={"score": ".3f", "kl": ".2f", "kl_coef": ".3f"})
    return {**rl.summary(state, total, rows, cfg.batch_size), "kl_coef": state.kl_coef}
