"""What the RL objectives share: where answers are rewarded (a reward on data prompts, or an environment), the
sampling settings, the prompts, and the loop settings they refuse.

`RLConfig` holds the fields every RL objective's `objective:` section has; an objective's `Config` adds its own.
Exactly one of `reward` (a reward for answers to the prompts in `data`) and `env` (an environment from
tunesmith/envs that plays its own episodes; no data is read) says where rewards come from.

Data: prompts only (`{"prompt": ...}` rows; plain `text` rows, every sft format (the last assistant turn
dropped) and preference rows (their prompt) also work). Prompts render through the chat template exactly as sft
renders them. With an environment, each row is an episode seed and its prompt the episode's first observation.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field, model_validator

from .. import envs
from ..data.formats import FormatError, _prompt_messages, row_error, split_format, to_conversation, to_preference
from ..data.sources import Split
from ..data.templates import ChatFormat, TemplateError
from ..data.tokenize import length_stats
from ..errors import ConfigError, DataError
from ..schema import Section
from .common import Prepared
from .rewards import RewardConfig

PROMPT_FORMATS = ("prompt", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference",
                  "sharegpt_preference")
ENV_DATA = "env:"
"""`data.train` of a run that plays an environment (set for you when `objective.env` is given)."""


class RLConfig(Section):
    """The fields every RL objective takes; its own `Config` adds the rest."""

    reward: Optional[RewardConfig] = None
    """The reward for answers to the data's prompts: a reward-model run, a classifier run and label, or a Python
    function. Give this or `env`."""
    env: Optional[envs.EnvConfig] = None
    """An environment that plays its own episodes (`kind`: arithmetic, nim; see tunesmith/envs): its rewards are
    the reward, and no data is read. Give this or `reward`."""
    template: Literal["auto", "tokenizer", "plain", "alpaca", "raw"] = "auto"
    """Chat template the prompts render with (as in sft); `raw` continues the prompt text with no markup."""
    system: Optional[str] = None
    """System message put first in every prompt that has none."""
    prompt_words: Optional[int] = Field(None, ge=1)
    """Keep only the first N words of each prompt (e.g. the start of a review for the policy to continue)."""
    max_new_tokens: int = Field(24, ge=1)
    """Most tokens per answer (per turn in an episode), in rollouts and in the evaluation before and after training."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts (1.0: the whole distribution, as the policy ratios assume)."""
    kl_bound: float = Field(10.0, gt=0)
    """Warn when the tuned model's KL to the reference on held-out prompts (nats per answer) ends above this."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.reward is None) == (self.env is None):
            raise ValueError("give exactly one of objective.reward (a reward for answers to the data's prompts) or "
                             "objective.env (an environment that plays its own episodes)")
        if self.env is not None and self.prompt_words is not None:
            raise ValueError("prompt_words: an environment's observations are not cut; remove it")
        return self


# ---------------------------------------------------------------------------------------------
# Data: prompts, or an environment's episode seeds


def make_splits(cfg, data) -> dict[str, Split] | None:
    """An environment's episodes as rows `{"seed", "observation"}` (train: seeds 0 .., test: the held-out seeds),
    or None when the objective reads its prompts from `data`."""
    if cfg.env is None:
        if data.train.startswith(ENV_DATA):
            raise ConfigError(f"data.train {data.train!r} names an environment; set objective.env instead",
                              where="data.train")
        return None
    if not data.train.startswith(ENV_DATA) or data.validation or data.test:
        raise ConfigError("objective.env plays its own episodes, so the run reads no data; remove data.train, "
                          "data.validation and data.test", where="data.train")
    env = cfg.env
    held = [{"seed": s, "observation": envs.make(env).reset(s)}
            for s in range(envs.HELD_OUT, envs.HELD_OUT + env.test_seeds)]
    asked = {r["observation"] for r in held} if envs.single_turn(env) else set()
    train = [{"seed": s, "observation": o} for s in range(env.train_seeds)
             if (o := envs.make(env).reset(s)) not in asked]
    if not train:
        raise ConfigError("every training episode asks a question of a held-out one", where="objective.env",
                          hint="raise objective.env.train_seeds or make the problems harder to repeat")
    name = f"{ENV_DATA}{env.kind}"
    return {"train": Split(train, f"{name} train seeds"), "test": Split(held, f"{name} held-out seeds")}


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


def prepare(splits, tokenizer, cfg, data) -> Prepared:
    chat = ChatFormat.build(tokenizer, cfg.template, cfg.system)
    longest = data.max_length - cfg.max_new_tokens
    if longest < 1:
        raise DataError(f"data.max_length {data.max_length} leaves no room for prompts beside "
                        f"objective.max_new_tokens {cfg.max_new_tokens}", where="data.max_length")
    examples, card, prompts = {}, {}, {}
    for name, part in splits.items():
        fmt = "episode" if cfg.env is not None else split_format(part, data.format, PROMPT_FORMATS)
        encoded, convs, cut = [], [], 0
        for i, row in enumerate(part.rows):
            try:
                conv = [{"role": "user", "content": row["observation"]}] if cfg.env is not None else \
                    shorten(_prompt_of(row, fmt), cfg.prompt_words)
                ids = chat.encode_prompt(conv)
            except (FormatError, TemplateError) as e:
                raise row_error(part, i, fmt, str(e), PROMPT_FORMATS) from None
            if len(ids) > longest:  # keep the end: the generation prompt sits there
                if cfg.env is not None:
                    raise DataError(f"episode {row['seed']}'s first observation is {len(ids)} tokens, more than "
                                    f"data.max_length - objective.max_new_tokens = {longest}",
                                    where="data.max_length", hint="raise data.max_length")
                ids, cut = ids[-longest:], cut + 1
            encoded.append({"input_ids": ids, **({"seed": row["seed"]} if "seed" in row else {})})
            convs.append(conv)
        examples[name] = encoded
        prompts[name] = [{"messages": c, "reference": ""} for c in convs]
        card[name] = {"rows": len(encoded), "format": fmt, "truncated": cut,
                      "tokens": length_stats([len(e["input_ids"]) for e in encoded])}
    if cfg.env is not None and "train" in card:
        # seeds whose question a held-out episode asks (single-turn environments) are not trained on
        card["train"]["held_out_questions_skipped"] = cfg.env.train_seeds - card["train"]["rows"]
    card["template"], card["end_of_turn"] = chat.name, chat.end_of_turn
    return Prepared(examples, {}, card, chat=chat, prompts=prompts)


# ---------------------------------------------------------------------------------------------
# Loop settings an RL objective's own loop does not take


UNUSED_TRAIN_SETTINGS = {
    "eval_every": "it measures reward and KL on held-out prompts once, before and after training",
    "early_stopping": "it trains for train.max_steps (or train.epochs) rollout steps",
    "precision": "its rollouts and updates run in the weights' own dtype (see model.dtype)",
}


def check(run_cfg, methods) -> None:
    """Settings of the shared loop that an RL objective's own loop does not take."""
    kind = run_cfg.objective.kind
    if run_cfg.train.grad_accum != 1:
        raise ValueError(f"train.grad_accum: {kind} takes train.batch_size prompts per step and updates on their "
                         "answers in objective.minibatch pieces; it does not accumulate")
    default = type(run_cfg.train)()
    for key, why in UNUSED_TRAIN_SETTINGS.items():
        # a value, not whether it was written: a saved run config spells out every default
        if getattr(run_cfg.train, key) != getattr(default, key):
            raise ValueError(f"train.{key}: {kind} does not use it ({why}); remove it")
    if methods.regime.ALTERS_TRAINING:
        raise ValueError(f"regime.kind: {kind} trains in its own loop, which takes no replay rows or penalty "
                         f"(regime {run_cfg.regime.kind!r}); its KL to the reference already holds it near the start")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
