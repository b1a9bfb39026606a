"""PPO's own loop: each step is a rollout (generate, score, penalise, advantages) and then several epochs
of minibatch updates on it. The supervised loop (loop.py) steps on fixed batches; this one writes its
batches as it goes, so it is a loop of its own built from the same pieces: AdamW parameter groups, the
learning-rate schedule, the progress line, checkpoints for `--resume`, metrics.jsonl and the NaN stop.

Determinism: rollouts are sampled with the seed `train.seed` and the step number, minibatch order with a
generator seeded the same way, so a resumed run repeats an uninterrupted one exactly on CPU.

The model in training is `PolicyAndValue`: the policy (full, or a peft model whose adapter trains) and a
linear value head on its last hidden state, training beside it. The reference is the frozen start: the
same weights with the adapter switched off (`disable_adapter()`, no second copy), or a frozen copy for
full tuning.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import GenerateConfig
from ..errors import TunesmithError
from ..evaluate.generation import Generation, generate
from ..objectives import ppo
from . import checkpoint
from .loop import MetricsLog, TrainingDiverged, param_groups, resume_state
from ..progress import Progress
from .schedule import make_scheduler

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


@dataclass
class Rollout:
    ids: torch.Tensor        # (B, T) prompt + answer, right-padded
    attention: torch.Tensor  # (B, T)
    starts: torch.Tensor     # (B,) where each answer begins
    mask: torch.Tensor       # (B, L) 1 on answer tokens (answers left-aligned)
    logp: torch.Tensor = None
    values: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None

    def rows(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: None if v is None else v[idx] for k, v in self.__dict__.items()})


def assemble(prompts: list[list[int]], answers: list[list[int]], pad_id: int, device) -> Rollout:
    seqs = [p + a for p, a in zip(prompts, answers)]
    width, longest = max(map(len, seqs)), max(map(len, answers))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1.0] * len(a) + [0.0] * (longest - len(a)) for a in answers], device=device)
    return Rollout(ids, attention, torch.tensor([len(p) for p in prompts], device=device), mask)


def forward(pv: PolicyAndValue, r: Rollout, values: bool = True):
    """Log-probabilities of the answer tokens, their entropies and the values of the states before them,
    each (B, L). The token at input position p is predicted from position p - 1."""
    out = pv.policy(input_ids=r.ids, attention_mask=r.attention, output_hidden_states=values)
    L = r.mask.shape[1]
    pos = (r.starts[:, None] - 1 + torch.arange(L, device=r.ids.device)[None]).clamp(max=r.ids.shape[1] - 2)
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, r.ids.gather(1, pos + 1)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if not values:
        return logp, entropy, None
    hidden = out.hidden_states[-1].gather(1, pos[..., None].expand(-1, -1, out.hidden_states[-1].shape[-1]))
    return logp, entropy, pv.value_head(hidden.float()).squeeze(-1)


def make_reference(pv: PolicyAndValue):
    """log-probabilities under the frozen starting model: the adapter disabled, or a frozen copy."""
    if hasattr(pv.policy, "disable_adapter"):
        def reference(r: Rollout) -> torch.Tensor:
            with pv.policy.disable_adapter():
                return forward(pv, r, values=False)[0]
        return reference
    frozen = copy.deepcopy(pv.policy).eval().requires_grad_(False)
    holder = PolicyAndValue.__new__(PolicyAndValue)
    nn.Module.__init__(holder)
    holder.policy = frozen
    return lambda r: forward(holder, r, values=False)[0]


@torch.no_grad()
def answer_and_measure(pv, reference, scorer, chat, prompt_ids: list[list[int]], convs: list[list[dict]], settings,
                       seed: int) -> tuple[list[Generation], torch.Tensor, Rollout, torch.Tensor]:
    """Generate, score, and measure: (generations, scores, rollout with logp and values, reference logp)."""
    device = next(pv.parameters()).device
    gens = generate(pv.policy, chat.tokenizer, prompt_ids, settings, chat.stop_ids(), seed)
    scores = torch.tensor(scorer(convs, [g.text for g in gens]), dtype=torch.float32, device=device)
    pad = chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.stop_ids()[0]
    r = assemble(prompt_ids, [g.ids for g in gens], pad, device)
    r.logp, _, r.values = forward(pv, r)
    return gens, scores, r, reference(r)


def ppo_step(pv, reference, scorer, chat, prompt_ids, convs, obj, kl_coef: float, seed: int, optimizer,
             scheduler, max_grad_norm) -> dict[str, float]:
    """One rollout batch and the updates on it; returns the step's statistics."""
    settings = GenerateConfig(max_new_tokens=obj.max_new_tokens, do_sample=True, temperature=obj.temperature,
                              top_p=obj.top_p, batch_size=len(prompt_ids))
    gens, scores, r, ref_logp = answer_and_measure(pv, reference, scorer, chat, prompt_ids, convs, settings, seed)
    with torch.no_grad():
        rewards, kl = ppo.token_rewards(scores, r.logp, ref_logp, r.mask, kl_coef)
        advantages, r.returns = ppo.gae(rewards, r.values, r.mask, obj.gamma, obj.lam)
        r.advantages = ppo.whiten(advantages, r.mask)
    trainable = [p for p in pv.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(obj.ppo_epochs):
        order = torch.randperm(len(gens), generator=generator).to(r.ids.device)
        for s in range(0, len(gens), obj.minibatch):
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
                 reward=float(rewards.sum(1).mean()), answer_tokens=float(r.mask.sum(1).mean()))
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


def fit(*, pv: PolicyAndValue, reference, scorer, chat, prompts: list[dict], prompt_ids: list[list[int]], obj,
        cfg, run_dir: Path, resume: bool = False, say=print, accelerator=None) -> dict:
    """Train `pv` in place for train.max_steps PPO steps (or train.epochs passes over the prompts, each step
    taking train.batch_size of them); returns a summary of the training. `accelerator`: the run's, whose trackers
    (train.report_to) receive each metrics line."""
    per_epoch = len(prompt_ids) // cfg.batch_size
    if per_epoch == 0:
        raise TunesmithError(f"train has {len(prompt_ids)} prompts, fewer than one rollout batch",
                             where="train.batch_size")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    optimizer = torch.optim.AdamW(param_groups(pv, cfg.weight_decay), lr=cfg.lr)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.warmup, total * updates_per_step(cfg.batch_size, obj))
    controller = ppo.KLController(obj.kl)
    ckpt_dir, log = run_dir / "checkpoints", MetricsLog(run_dir / "metrics.jsonl", accelerator)
    state = resume_state(PPOState, ckpt_dir, log, pv, optimizer, scheduler, resume, say) or \
        PPOState(kl_coef=controller.value)
    controller.value = state.kl_coef
    convs = [p["messages"] for p in prompts]
    save_every = cfg.save_every or cfg.log_every
    progress = Progress(total, state.step, desc="ppo")
    pv.eval()  # no dropout: the ratios compare the same function before and after each update
    while state.step < total:
        epoch, k = divmod(state.step, per_epoch)
        order = list(range(len(prompt_ids)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        idx = order[k * cfg.batch_size:(k + 1) * cfg.batch_size]
        tick = time.perf_counter()
        stats = ppo_step(pv, reference, scorer, chat, [prompt_ids[i] for i in idx], [convs[i] for i in idx], obj,
                         controller.value, cfg.seed * 1_000_003 + state.step, optimizer, scheduler,
                         cfg.max_grad_norm)
        controller.update(stats["kl"], len(idx))
        state.step, state.kl_coef = state.step + 1, controller.value
        state.seconds += time.perf_counter() - tick
        state.answers += len(idx)
        for key, value in stats.items():
            state.window[key] = state.window.get(key, 0.0) + value
        state.window["n"] = state.window.get("n", 0) + 1
        progress.update(1, score=f"{stats['score']:.3f}", kl=f"{stats['kl']:.2f}")
        if state.step % cfg.log_every == 0 or state.step == total:
            n = state.window.pop("n")
            record = {"step": state.step, **{k: state.window[k] / n for k in LOGGED},
                      "lr": scheduler.get_last_lr()[0], "answers_per_s": state.answers / max(state.seconds, 1e-9)}
            state.window = {}
            log.write(**record)
            progress.line(score=f"{record['score']:.3f}", kl=f"{record['kl']:.2f}",
                          kl_coef=f"{record['kl_coef']:.3f}", rate=f"{record['answers_per_s']:.1f}ans/s")
        if state.step % save_every == 0 or state.step == total:
            checkpoint.save(ckpt_dir, pv, optimizer, scheduler, state.__dict__)
    progress.close()
    return {"steps": state.step, "total_steps": total, "epochs": round(state.step / per_epoch, 3),
            "kl_coef": state.kl_coef, "train_seconds": round(state.seconds, 2),
            "answers_per_s": round(state.answers / max(state.seconds, 1e-9), 2)}


def evaluate(pv, reference, scorer, chat, prompts: list[dict], prompt_ids: list[list[int]], settings, seed: int
             ) -> tuple[dict[str, float], list[Generation]]:
    """Mean reward and KL to the reference (nats per answer, summed over its tokens) on held-out prompts,
    decoded as eval.generate says (greedy, or sampled with a fixed seed)."""
    gens, scores, r, ref_logp = answer_and_measure(pv, reference, scorer, chat, prompt_ids,
                                                   [p["messages"] for p in prompts], settings, seed)
    kl = (r.logp - ref_logp) * r.mask
    return {"reward": float(scores.mean()), "kl": float(kl.sum(1).mean()),
            "stop_rate": sum(g.stopped for g in gens) / len(gens),
            "new_tokens": sum(g.tokens for g in gens) / len(gens)}, gens
