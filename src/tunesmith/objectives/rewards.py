"""The reward an RL objective maximises: where it comes from (`RewardConfig`) and the helpers a scorer needs.

One float per (prompt, answer), from one of three sources:
  reward-model run   a finished run whose objective scores answers itself (`score(trained, prompts, answers)`)
  classifier run     a finished classifier run: the probability (or logit) of one label, e.g. `positive`
  function           `module:function`, called with (prompts, answers), two lists of strings

The scorer itself is built by the run layer (tunesmith/scorers.py: it loads finished runs) and passed in.
"""

from __future__ import annotations

import importlib
from typing import Callable, Literal, Optional

from pydantic import Field, model_validator

from ..errors import ConfigError
from ..schema import Section

Scorer = Callable[[list[list[dict]], list[str]], list[float]]


def last_message(prompts: list[list[dict]]) -> list[str]:
    return [p[-1]["content"] for p in prompts]


def import_function(ref: str, where: str = "objective.reward.function") -> Scorer:
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure while importing the user's module is a config problem here
        raise ConfigError(f"cannot import module {module_name!r} for the reward: {type(e).__name__}: {e}",
                          where=where, hint="put the module on PYTHONPATH (or in the folder you run from)") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"module {module_name!r} has no function {name!r}", where=where)
    return fn


class RewardConfig(Section):
    """Where the reward comes from: one of `run` (a classifier or reward-model run) or `function`."""

    run: Optional[str] = None
    """A finished run folder: a reward model (objective `reward`: its score is the reward) or a classifier
    (objective `classify`: the probability or logit of `label`). In a staged config, `stage:<name>` names an
    earlier stage's run."""
    label: Optional[str] = None
    """Classifier runs: the label whose probability (or logit) is the reward, e.g. `positive`."""
    use: Literal["probability", "logit"] = "probability"
    """Classifier runs: reward with the label's probability (0..1) or its raw logit."""
    function: Optional[str] = None
    """A Python function `module:function` taking (prompts, answers), two lists of strings, and returning one
    float per answer; the module must be importable (on PYTHONPATH or in the working folder)."""
    text: Literal["prompt_and_answer", "answer"] = "prompt_and_answer"
    """What a classifier reads: the prompt followed by the answer (a continuation as a whole), or the answer alone."""
    batch_size: int = Field(32, ge=1)
    """Answers scored together by a reward or classifier model."""

    @model_validator(mode="after")
    def _one_source(self):
        if (self.run is None) == (self.function is None):
            raise ValueError("objective.reward: give exactly one of run (a classifier or reward-model run folder) "
                             "or function (module:function)")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"objective.reward.function: {self.function!r} is not of the form module:function")
        return self
