"""Shared fixtures: offline hub, an isolated run folder, tiny models built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# No model hub is reachable in CI: make hub lookups fail at once instead of retrying for ~47 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Pulled samples are shared between test sessions (the integration tests download them once).
os.environ.setdefault("TUNESMITH_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "tunesmith"))

from tiny import embed_rows, make_model_dir, patterned_rows, sentiment_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-bert", "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def sentiment_dir(tmp_path_factory) -> Path:
    """A folder of train/validation/test jsonl files with the tiny sentiment task."""
    root = tmp_path_factory.mktemp("data") / "sentiment"
    write_jsonl(root / "train.jsonl", sentiment_rows(192, seed=1))
    write_jsonl(root / "validation.jsonl", sentiment_rows(48, seed=2))
    write_jsonl(root / "test.jsonl", sentiment_rows(48, seed=3))
    return root


@pytest.fixture(scope="session")
def embed_dir(tmp_path_factory) -> Path:
    """A folder of train/validation/test jsonl files of (anchor, positive) rows (tiny.embed_rows)."""
    root = tmp_path_factory.mktemp("data") / "embed"
    write_jsonl(root / "train.jsonl", embed_rows(128, seed=1))
    write_jsonl(root / "validation.jsonl", embed_rows(32, seed=2))
    write_jsonl(root / "test.jsonl", embed_rows(32, seed=3))
    return root


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder, so runs/ lands there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def instruction_dir(tmp_path_factory) -> Path:
    """A folder of train/validation/test jsonl files with the tiny instruction task (alpaca format)."""
    from tiny import instruction_rows

    root = tmp_path_factory.mktemp("data") / "instructions"
    write_jsonl(root / "train.jsonl", instruction_rows(128, seed=1))
    write_jsonl(root / "validation.jsonl", instruction_rows(16, seed=2))
    write_jsonl(root / "test.jsonl", instruction_rows(16, seed=3))
    return root


@pytest.fixture(scope="session")
def bpe_llama(tmp_path_factory) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer, as GGUF export needs."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama-bpe", "llama-bpe")


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory) -> Path:
    """A folder of train/validation/test jsonl files of patterned text (clm)."""
    d = tmp_path_factory.mktemp("data") / "text"
    write_jsonl(d / "train.jsonl", patterned_rows(32, 1))
    write_jsonl(d / "validation.jsonl", patterned_rows(4, 2))
    write_jsonl(d / "test.jsonl", patterned_rows(4, 3))
    return d


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (tunesmith.report.browser.chromium): skipped without it, failed under CI (`CI=true`), so
    CI can never pass without having run the browser tests."""
    from tunesmith.report import browser as report_browser

    missing = report_browser.missing()
    if missing:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"browser tests cannot run under CI: {missing}")
        pytest.skip(missing)
    with report_browser.chromium() as chromium:
        yield chromium
