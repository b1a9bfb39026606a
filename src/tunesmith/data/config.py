"""The `data:` section of a run config (and of each task of a multi-task or continual regime).

It lives apart from `config.py` so that regimes, which `config.py` imports, can build task sections on it.
"""

from __future__ import annotations

import codecs
from typing import Literal, Optional

from pydantic import Field, field_validator

from ..schema import Section

SEED_MAX = 2**32 - 1  # numpy's seed range, which transformers.set_seed feeds


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1)
    """Fraction of train carved off as validation when no validation split is given (0: none)."""
    test: float = Field(0.1, ge=0, lt=1)
    """Fraction of train carved off as test when no test split is given (0: none)."""
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    """Seed of the carving shuffle; defaults to train.seed."""


Policy = Literal["error", "warn", "drop", "off"]


class LeakageConfig(Section):
    """Rows of one split that reappear in another (train~validation, train~test, validation~test).

    A drop removes the copies from train (from validation for validation~test), so the test split
    never changes."""

    exact: Policy = "error"
    """Copies that are identical after folding case, punctuation and spacing: error refuses to train,
    warn reports, drop removes the copies, off skips the check."""
    near: Policy = "warn"
    """Near copies: word-shingle Jaccard similarity at or above `threshold` (MinHash LSH candidates, each
    verified exactly)."""
    threshold: float = Field(0.65, gt=0, le=1)
    """Jaccard similarity of two rows' word-shingle sets at which they count as near copies (the default
    and `shingle` come from the study in bench/leakage.py)."""
    shingle: int = Field(1, ge=1)
    """Words per shingle: 1 compares sets of words, 2 of word pairs (stricter about order)."""
    min_words: int = Field(10, ge=1)
    """Texts shorter than this many words are compared exactly only: short texts that share a stock
    phrase ("one of the year's best films") look alike without being copies."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations: more find near copies more reliably and cost more time."""
    examples: int = Field(3, ge=0)
    """Example pairs shown per finding."""


class ChecksConfig(Section):
    """Checks on the data before training; `tunesmith check CONFIG` runs only these."""

    leakage: LeakageConfig = LeakageConfig()
    """Exact and near copies between splits, on the whole example and on the prompt alone."""
    duplicates: Policy = "warn"
    """Exact and near copies inside one split; drop removes the later copies from train (copies inside
    validation or test are reported only)."""
    empty: Policy = "drop"
    """Rows whose text is blank; drop removes them from whichever split holds them."""
    truncation: float = Field(0.1, ge=0, le=1)
    """Warn when more than this fraction of a split's examples is cut at data.max_length."""
    label_imbalance: float = Field(10, ge=1)
    """Warn when the most common train label outnumbers the rarest by more than this factor."""


class DataConfig(Section):
    train: str
    """Training data: `sample:<name>`, a file (.jsonl .json .csv .tsv .parquet .txt), a folder of split
    files (train.jsonl, validation.jsonl, test.jsonl), or a Hugging Face datasets folder. Unset with
    `objective.env` (an environment plays its own episodes: `env:<kind>`)."""
    validation: Optional[str] = None
    """Validation data; null: the folder's own validation split, else carved from train."""
    test: Optional[str] = None
    """Test data; null: the folder's own test split, else carved from train."""
    columns: dict[str, str] = {}
    """Map expected column names to the names in your data, e.g. `{text: review, label: stars}`."""
    split: SplitConfig = SplitConfig()
    """How missing validation/test splits are carved from train."""
    max_length: int = Field(256, ge=8)
    """Tokens per example; longer examples are truncated (the data card counts them)."""
    max_rows: dict[Literal["train", "validation", "test"], int] = {}
    """Use at most this many rows of a split, e.g. `{train: 2000}` for a quick run."""
    encoding: Optional[str] = None
    """Text encoding of the data files (e.g. `cp1252`, `latin-1`); null: UTF-8, with or without a byte-order
    mark, or UTF-16/32 with one."""
    format: Literal["auto", "text", "prompt_completion", "alpaca", "sharegpt", "messages", "preference",
                    "sharegpt_preference", "scored", "unpaired", "prompt"] = "auto"
    """Row format for generative objectives (see docs/formats.md); auto detects it from the first row."""
    checks: ChecksConfig = ChecksConfig()
    """Leakage, duplicate, empty-row, truncation and label-balance checks, run before training."""

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, v):
        if v is not None:
            try:
                codecs.lookup(v)
            except LookupError:
                raise ValueError(f"unknown encoding {v!r} (name a Python codec, e.g. utf-8, cp1252, latin-1)") from None
        return v
