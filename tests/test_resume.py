"""A run killed with SIGKILL after a checkpoint and continued with --resume ends exactly where an
uninterrupted run ends: same weights, same metrics, same log."""

from __future__ import annotations

import json
import signal
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tiny import classify_config, cli, embed_config

KILLER = textwrap.dedent("""
    import os, signal, sys
    from tunesmith.train import checkpoint
    real_save = checkpoint.save
    def save_then_die(folder, model, optimizer, scheduler, state):
        real_save(folder, model, optimizer, scheduler, state)
        if state["step"] >= int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
    from tunesmith.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("objective", ["classify", "embed"])
def test_sigkill_then_resume_matches_uninterrupted_run(objective, in_tmp, tiny_bert, request):
    extra = "train: {epochs: 4, batch_size: 8, grad_accum: 2, lr: 3.0e-3, eval_every: 6, log_every: 2}\n"
    if objective == "classify":
        cfg = classify_config(in_tmp / "c.yaml", tiny_bert, request.getfixturevalue("sentiment_dir"), "{kind: full}")
    else:
        cfg = embed_config(in_tmp / "c.yaml", tiny_bert, request.getfixturevalue("embed_dir"), "{kind: full}")
    cfg.write_text(cfg.read_text().replace(cfg.read_text().split("\n")[5] + "\n", extra))

    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr

    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_AT_STEP": "18"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = in_tmp / "runs" / "killed"
    assert not (run / "summary.json").exists()
    assert json.loads((run / "checkpoints" / "last" / "state.json").read_text())["step"] == 18

    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from step 18" in resumed.stdout

    a, b = in_tmp / "runs" / "whole", in_tmp / "runs" / "killed"
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "final weights differ"
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["test"] == sb["test"] and sa["validation"] == sb["validation"] and sa["base"] == sb["base"]
    assert sa["train"]["steps"] == sb["train"]["steps"] and sa["train"]["best_step"] == sb["train"]["best_step"]

    def log(run):
        lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in l.items() if k != "examples_per_s"} for l in lines]

    assert log(a) == log(b)


def test_grpo_sigkill_then_resume_matches_uninterrupted_run(in_tmp, tiny_llama, sentiment_dir):
    """The same for GRPO's own loop (rollouts, group advantages, a LoRA policy): a checkpoint every 2 steps,
    killed after step 4 of 8."""
    from tiny import grpo_config

    cfg = grpo_config(in_tmp / "g.yaml", tiny_llama, sentiment_dir, "{kind: lora, r: 8, alpha: 64, dropout: 0.0}")
    cfg.write_text(cfg.read_text().replace("max_steps: 30", "max_steps: 8").replace("log_every: 5", "log_every: 2, "
                                                                                    "save_every: 2"))
    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_AT_STEP": "4"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (in_tmp / "runs" / "killed" / "summary.json").exists()
    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0 and "resuming from step 4" in resumed.stdout, resumed.stderr[-3000:]

    a, b = in_tmp / "runs" / "whole", in_tmp / "runs" / "killed"
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    files = sorted((a / sa["weights"]).glob("*.safetensors"))
    assert files
    for f in files:
        wa, wb = load_file(f), load_file(b / sb["weights"] / f.name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{f.name} differs"
    assert sa["test"] == sb["test"] and sa["base"] == sb["base"] and sa["train"]["steps"] == sb["train"]["steps"] == 8

    def log(run):
        return [{k: v for k, v in json.loads(l).items() if k != "answers_per_s"}
                for l in (run / "metrics.jsonl").read_text().splitlines()]

    assert log(a) == log(b)
