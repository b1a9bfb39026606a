"""SmolLM2-135M tuned with QLoRA on a little Shakespeare, exported merged and as GGUF: both reproduce the
tuned model's greedy continuations of five held-out prompts (lines of plays the run never saw)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shakespeare-qlora.yaml"


def held_out_prompts(n: int = 5) -> list[str]:
    """The first line of dialogue of n passages from the test plays (held out from train and validation)."""
    from tunesmith.data.sources import read

    prompts = []
    for row in read("sample:shakespeare")["test"].rows:
        lines = [line.strip() for line in row["text"].splitlines() if len(line.split()) >= 6]
        if lines and not lines[0].isupper():
            prompts.append(" ".join(lines[0].split()[:10]))
        if len(prompts) == n:
            return prompts
    raise AssertionError("not enough held-out passages")


def test_qlora_smollm2_exports_reproduce_greedy_output(in_tmp, capsys):
    overrides = ["data.max_length=64", "data.max_rows={train: 32, validation: 8, test: 8}", "train.max_steps=6",
                 "train.eval_every=6", "eval.compare_base=false", f"output.dir={in_tmp / 'runs'}"]
    assert main(["train", str(EXAMPLE), *overrides]) == 0
    run = in_tmp / "runs" / "shakespeare-qlora"
    prompts = [a for p in held_out_prompts() for a in ("--prompt", p)]
    reports = {}
    for fmt in ("merged", "gguf"):
        capsys.readouterr()
        assert main(["export", str(run), "--format", fmt, *prompts]) == 0
        print(capsys.readouterr().out)
        name = "export-merged.json" if fmt == "merged" else "export-gguf-f32.json"
        reports[fmt] = json.loads((run / "export" / name).read_text())
    for fmt, report in reports.items():
        assert report["reference"] == "4-bit base + adapter"
        written = report["written"]
        assert written["prompts"] == 5 and written["same_tokenization"] == 5, fmt
        assert written["greedy_match"] == 5, (fmt, written)
        assert written["max_abs_logit_diff"] < 1e-3, (fmt, written)
