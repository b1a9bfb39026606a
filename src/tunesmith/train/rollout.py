"""Rollouts for the RL loops (train/ppo.py, train/grpo.py): the policy's answers and their rewards, laid out for
the updates; the reference (the starting model); the evaluation on held-out prompts before and after training.

Answers come from a source with one method, `sample(policy, split, rows, settings, seed, copies) -> Batch`:
  Prompts    each prompt answered (`copies` times), the answers scored by the reward's scorer
  Episodes   an environment (tunesmith/envs) played turn by turn: each observation a user turn, each reply an
             assistant turn generated from the episode's tokens so far; the reward is the episode's summed rewards

A `Rollout` row is one whole sequence (a prompt and its answer, or a whole episode: the model's turns exactly as
generated, the environment's turns rendered through the chat template between them) and `positions` the input
positions of the tokens the model generated, left-aligned under `mask`. Only those tokens are trained on.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .. import envs
from ..evaluate.generation import Generation, generate


@dataclass
class Rollout:
    ids: torch.Tensor        # (B, T) whole sequences, right-padded
    attention: torch.Tensor  # (B, T)
    positions: torch.Tensor  # (B, L) input positions of the generated tokens, left-aligned (1 under padding)
    mask: torch.Tensor       # (B, L) 1 on generated tokens
    logp: torch.Tensor = None
    values: torch.Tensor = None
    advantages: torch.Tensor = None
    returns: torch.Tensor = None

    def rows(self, idx: torch.Tensor) -> "Rollout":
        return Rollout(**{k: None if v is None else v[idx] for k, v in self.__dict__.items()})

    def __len__(self) -> int:
        return self.ids.shape[0]


def assemble(seqs: list[list[int]], positions: list[list[int]], pad_id: int, device) -> Rollout:
    width, longest = max(map(len, seqs)), max(1, max(map(len, positions)))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    pos = torch.tensor([p + [1] * (longest - len(p)) for p in positions], device=device)
    mask = torch.tensor([[1.0] * len(p) + [0.0] * (longest - len(p)) for p in positions], device=device)
    return Rollout(ids, attention, pos, mask)


def single_turn(prompts: list[list[int]], answers: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Sequences prompt + answer, and the positions of the answers in them."""
    return [p + a for p, a in zip(prompts, answers)], [list(range(len(p), len(p) + len(a)))
                                                       for p, a in zip(prompts, answers)]


def token_logps(policy, r: Rollout, hidden: bool = False):
    """Log-probabilities of the generated tokens and their entropies, each (B, L), and with `hidden` the last
    hidden state of the positions that predict them (B, L, H). The token at position p is predicted from p - 1."""
    out = policy(input_ids=r.ids, attention_mask=r.attention, output_hidden_states=hidden)
    pos = r.positions - 1
    logits = out.logits.gather(1, pos[..., None].expand(-1, -1, out.logits.shape[-1])).float()
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, r.ids.gather(1, r.positions)[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    if not hidden:
        return logp, entropy, None
    states = out.hidden_states[-1]
    return logp, entropy, states.gather(1, pos[..., None].expand(-1, -1, states.shape[-1]))


def make_reference(policy):
    """log-probabilities under the frozen starting model: the adapter disabled (no second copy), or a frozen copy
    for a tuning that trains the base weights."""
    if hasattr(policy, "disable_adapter"):
        def reference(r: Rollout) -> torch.Tensor:
            with torch.no_grad(), policy.disable_adapter():
                return token_logps(policy, r)[0]
        return reference
    frozen = copy.deepcopy(policy).eval().requires_grad_(False)
    return lambda r: token_logps(frozen, r)[0]


@torch.no_grad()
def measure(fn, r: Rollout, chunk: int) -> torch.Tensor:
    """`fn(rollout) -> (rows, L)` over a rollout `chunk` rows at a time (the logits of a whole batch may not fit)."""
    return torch.cat([fn(r.rows(torch.arange(s, min(s + chunk, len(r)), device=r.ids.device)))
                      for s in range(0, len(r), chunk)])


# ---------------------------------------------------------------------------------------------
# Sources of answers


@dataclass
class Batch:
    rollout: Rollout
    scores: torch.Tensor
    """(B,) the reward of each answer (episodes: the sum of their step rewards)."""
    answers: list[Generation]
    """Per row: the answer (episodes: every reply, joined by ` | `), its tokens (all turns), whether it stopped."""
    outcomes: list[dict] = field(default_factory=list)
    """Per row of an episode: the environment's `outcome()`; empty for prompts."""


def _pad_id(chat) -> int:
    return chat.tokenizer.pad_token_id if chat.tokenizer.pad_token_id is not None else chat.stop_ids()[0]


@dataclass
class Prompts:
    """Prompts (token ids and conversations per split), answered once each and scored by `scorer`."""

    chat: object
    scorer: object
    ids: dict
    convs: dict

    @torch.no_grad()
    def sample(self, policy, split: str, rows, settings, seed: int, copies: int = 1) -> Batch:
        rows = [i for i in rows for _ in range(copies)]
        prompt_ids = [self.ids[split][i] for i in rows]
        gens = generate(policy, self.chat.tokenizer, prompt_ids, settings, self.chat.stop_ids(), seed)
        device = next(policy.parameters()).device
        scores = torch.tensor(self.scorer([self.convs[split][i] for i in rows], [g.text for g in gens]),
                              dtype=torch.float32, device=device)
        r = assemble(*single_turn(prompt_ids, [g.ids for g in gens]), _pad_id(self.chat), device)
        return Batch(r, scores, gens)

    def baselines(self, split: str, n: int) -> dict:
        """Scripted players of the first `n` prompts: none for prompts scored by a reward."""
        return {}


@dataclass
class Episodes:
    """Episodes of an environment (its config `env`), by seed per split; `ids` the tokens of each first prompt."""

    chat: object
    env: object
    seeds: dict
    ids: dict

    @torch.no_grad()
    def sample(self, policy, split: str, rows, settings, seed: int, copies: int = 1) -> Batch:
        rows = [i for i in rows for _ in range(copies)]
        games = [envs.make(self.env) for _ in rows]
        convs = [[{"role": "user", "content": g.reset(self.seeds[split][i])}] for g, i in zip(games, rows)]
        seqs = [list(self.ids[split][i]) for i in rows]
        positions: list[list[int]] = [[] for _ in rows]
        returns, replies = [0.0] * len(rows), [[] for _ in rows]
        tokens, stopped = [0] * len(rows), [True] * len(rows)
        live = list(range(len(rows)))
        for turn in range(self.env.max_turns):
            if not live:
                break
            gens = generate(policy, self.chat.tokenizer, [seqs[k] for k in live], settings, self.chat.stop_ids(),
                            seed + 7919 * turn)
            still = []
            for k, g in zip(live, gens):
                positions[k] += range(len(seqs[k]), len(seqs[k]) + len(g.ids))
                seqs[k] += g.ids  # the reply exactly as generated, not re-tokenized from its text
                observation, reward, done = games[k].step(g.text)
                returns[k] += reward
                replies[k].append(g.text)
                tokens[k], stopped[k] = tokens[k] + g.tokens, stopped[k] and g.stopped
                if not done:
                    convs[k] += [{"role": "assistant", "content": g.text}, {"role": "user", "content": observation}]
                    seqs[k] += self.chat.encode_next_prompt(convs[k])
                    still.append(k)
            live = still
        device = next(policy.parameters()).device
        answers = [Generation(" | ".join(replies[k]), tokens[k], stopped[k]) for k in range(len(rows))]
        return Batch(assemble(seqs, positions, _pad_id(self.chat), device),
                     torch.tensor(returns, dtype=torch.float32, device=device), answers, [g.outcome() for g in games])

    def baselines(self, split: str, n: int) -> dict:
        """The environment's scripted players on the first `n` episodes of `split` (envs.baselines)."""
        return envs.baselines(self.env, self.seeds[split][:n])


def source(obj, chat, prepared, scorer=None):
    """The objective's source of answers: its environment's episodes, or the prepared prompts and `scorer`."""
    ids = {s: [e["input_ids"] for e in ex] for s, ex in prepared.examples.items()}
    if obj.env is not None:
        return Episodes(chat, obj.env, {s: [e["seed"] for e in ex] for s, ex in prepared.examples.items()}, ids)
    return Prompts(chat, scorer, ids, {s: [p["messages"] for p in ps] for s, ps in prepared.prompts.items()})


# ---------------------------------------------------------------------------------------------
# Evaluation before and after training


def evaluate(policy, reference, source, split: str, n: int, settings, seed: int) -> tuple[dict[str, float], list]:
    """On the first `n` held-out prompts (or episodes), decoded as `settings` says (greedy, or sampled with a fixed
    seed): the mean reward, the KL to the reference (nats per answer, summed over its tokens), the stop rate, the
    answer length in tokens, and an environment's success rates (accuracy, win rate, legal-move rate)."""
    was_training = policy.training
    policy.eval()
    batch = source.sample(policy, split, range(n), settings, seed)
    r, chunk = batch.rollout, settings.batch_size
    logp = measure(lambda rows: token_logps(policy, rows)[0], r, chunk)
    kl = ((logp - measure(reference, r, chunk)) * r.mask).sum(1)
    policy.train(was_training)
    answers = batch.answers
    return {"reward": float(batch.scores.mean()), "kl": float(kl.mean()),
            "stop_rate": sum(a.stopped for a in answers) / len(answers),
            "new_tokens": sum(a.tokens for a in answers) / len(answers), **envs.rates(batch.outcomes)}, answers
