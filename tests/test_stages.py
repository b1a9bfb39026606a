"""Staged runs: every stage validated up front; sft -> reward -> ppo from one YAML; a run killed in its second
stage resumes there (the first stage kept, not retrained) and ends as an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = str(Path(__file__).parent)

KILLER = textwrap.dedent("""
    import os, signal, sys
    from tunesmith.train import checkpoint
    real_save = checkpoint.save
    def save_then_die(folder, model, optimizer, scheduler, state):
        real_save(folder, model, optimizer, scheduler, state)
        if os.environ["KILL_IN"] in str(folder) and state["step"] >= int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save = save_then_die
    from tunesmith.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _with_sft_first(path: Path, name: str, model: Path, instructions: Path, later_stages: str) -> Path:
    """A staged config on the tiny model whose first stage is full sft on `instructions`."""
    text = f"""\
name: {name}
model: {model}
data: {{train: {instructions}, max_length: 32}}
tuning: {{kind: full}}
train: {{epochs: 1, batch_size: 8, lr: 3.0e-3, seed: 0, save_every: 4, log_every: 4}}
eval: {{forgetting: {{enabled: false}}, generate: {{max_new_tokens: 8, prompts: 8}}}}
stages:
  - name: sft
    objective: {{kind: sft}}
""" + later_stages
    path.write_text(text, encoding="utf-8")
    return path


def staged_config(path: Path, model: Path, instructions: Path, preferences: Path, third: str = "ppo") -> Path:
    """sft (full) -> a reward model (LoRA, from the sft weights) -> ppo (LoRA) against that reward model."""
    return _with_sft_first(path, "hybrid", model, instructions, f"""\
  - name: rm
    data: {{train: {preferences}}}
    tuning: {{kind: lora, r: 4, alpha: 8, dropout: 0.1}}
    objective: {{kind: reward}}
    train: {{lr: 1.0e-2}}
  - name: rl
    objective: {{kind: {third}, reward: {{run: "stage:rm"}}, max_new_tokens: 6, ppo_epochs: 1}}
    tuning: {{kind: lora, r: 4, alpha: 8, dropout: 0.0}}
    data: {{train: {preferences}, max_rows: {{test: 8}}}}
    train: {{max_steps: 4, batch_size: 16, log_every: 2}}
""")


@pytest.fixture(scope="module")
def preference_dir(tmp_path_factory) -> Path:
    from tiny import preference_rows, write_jsonl

    d = tmp_path_factory.mktemp("preference")
    write_jsonl(d / "train.jsonl", preference_rows(96, 1))
    write_jsonl(d / "validation.jsonl", preference_rows(24, 2))
    write_jsonl(d / "test.jsonl", preference_rows(24, 3))
    return d


def cli(args, cwd, env=None, script=None):
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "tunesmith"]
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)  # the reward function's module
    return subprocess.run(cmd + args, cwd=cwd, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                          capture_output=True, text=True)


def test_a_typo_in_stage_three_fails_before_anything_trains(in_tmp, tiny_llama, instruction_dir, preference_dir):
    from tunesmith import stages
    from tunesmith.errors import ConfigError

    cfg = staged_config(in_tmp / "h.yaml", tiny_llama, instruction_dir, preference_dir, third="ppoo")
    line = next(i for i, text in enumerate(cfg.read_text().splitlines(), 1) if "ppoo" in text)
    with pytest.raises(ConfigError) as e:
        stages.load(cfg)
    text = e.value.render()
    assert "stages[2].objective.kind" in text and f"h.yaml:{line}" in text and "did you mean 'ppo'" in text
    assert not (in_tmp / "runs").exists()


def test_stage_references_must_name_an_earlier_stage(in_tmp, tiny_llama, instruction_dir, preference_dir):
    from tunesmith import stages
    from tunesmith.errors import ConfigError

    cfg = staged_config(in_tmp / "h.yaml", tiny_llama, instruction_dir, preference_dir)
    cfg.write_text(cfg.read_text().replace('reward: {run: "stage:rm"}', 'reward: {run: "stage:rw"}'))
    with pytest.raises(ConfigError, match=r"'stage:rw' names no earlier stage \(earlier: sft, rm\)") as e:
        stages.load(cfg)
    assert "stages[2].objective.reward.run" in e.value.render()


def test_stage_sections_override_the_top_level_key_by_key():
    from tunesmith.stages import merge

    top = {"tuning": {"kind": "lora", "r": 8}, "train": {"lr": 1.0, "seed": 3}, "objective": "sft"}
    out = merge(top, {"tuning": {"r": 4}, "train": {"lr": 2.0}, "objective": {"kind": "ppo", "clip": 0.1}})
    assert out == {"tuning": {"kind": "lora", "r": 4}, "train": {"lr": 2.0, "seed": 3},
                   "objective": {"kind": "ppo", "clip": 0.1}}
    assert merge(top, {"tuning": "full"})["tuning"] == {"kind": "full"}


def test_killed_in_stage_two_resumes_there_and_ends_like_an_uninterrupted_run(in_tmp, tiny_llama, instruction_dir,
                                                                              preference_dir):
    cfg = staged_config(in_tmp / "h.yaml", tiny_llama, instruction_dir, preference_dir)
    whole = cli(["train", str(cfg), "name=whole"], in_tmp)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = cli(["train", str(cfg), "name=killed"], in_tmp, {"KILL_IN": "2-rm", "KILL_AT_STEP": "8"}, KILLER)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    root = in_tmp / "runs" / "killed"
    first = root / "stages" / "1-sft" / "summary.json"
    assert first.exists() and not (root / "stages" / "2-rm" / "summary.json").exists()
    assert not (root / "stages" / "3-rl").exists() and not (root / "summary.json").exists()
    stamp = first.stat().st_mtime_ns

    refused = cli(["train", str(cfg), "name=killed"], in_tmp)
    assert refused.returncode == 2 and "--resume" in refused.stderr

    resumed = cli(["train", str(cfg), "name=killed", "--resume"], in_tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "finished earlier; kept" in resumed.stdout and "resuming from step 8" in resumed.stdout
    assert first.stat().st_mtime_ns == stamp  # the first stage was not trained again

    a, b = in_tmp / "runs" / "whole", root
    for stage in ("1-sft", "2-rm", "3-rl"):
        sa, sb = (json.loads((r / "stages" / stage / "summary.json").read_text()) for r in (a, b))
        for key in ("test", "validation", "base"):
            assert sa.get(key) == sb.get(key), (stage, key)
        assert sa["train"]["steps"] == sb["train"]["steps"]
    # the reward model and the final policy (LoRA, merged into its base) are identical
    for weights in ("2-rm/adapter/adapter_model.safetensors", "3-rl/adapter/adapter_model.safetensors",
                    "3-rl/merged/model.safetensors"):
        wa, wb = (load_file(r / "stages" / weights) for r in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), weights
    # the reward model started from the sft stage's weights, the policy from the sft policy
    rm_cfg = (a / "stages" / "2-rm" / "config.yaml").read_text()
    assert "name: runs/whole/stages/1-sft/model\n" in rm_cfg
    rl_cfg = (a / "stages" / "3-rl" / "config.yaml").read_text()
    assert "name: runs/whole/stages/1-sft/model\n" in rl_cfg and "run: runs/whole/stages/2-rm\n" in rl_cfg

    top_a, top_b = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert [s["stage"] for s in top_a["stages"]] == ["sft", "rm", "rl"]
    strip = lambda s: [{k: v for k, v in st.items() if k != "wall_seconds"} for st in s["stages"]]  # noqa: E731
    assert strip(top_a) == strip(top_b)
    assert top_a["stages"][2]["tuned"]["reward"] is not None and top_a["policy"] == "stages/3-rl/merged"

    # a finished staged run is not resumed, unless a stage is missing: then only that stage runs again
    refused = cli(["train", str(cfg), "name=whole", "--resume"], in_tmp)
    assert refused.returncode == 2 and "already holds a finished run" in refused.stderr
    shutil.rmtree(a / "stages" / "3-rl")
    again = cli(["train", str(cfg), "name=whole", "--resume"], in_tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier; kept") == 2 and (a / "stages" / "3-rl" / "summary.json").exists()
    assert strip(json.loads((a / "summary.json").read_text())) == strip(top_a)


def test_plan_plans_every_stage(in_tmp, tiny_llama, instruction_dir, preference_dir, capsys):
    from tunesmith.cli import main

    cfg = staged_config(in_tmp / "h.yaml", tiny_llama, instruction_dir, preference_dir)
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("=== stage")] == [
        "=== stage 1/3: sft (sft) ===", "=== stage 2/3: rm (reward) ===", "=== stage 3/3: rl (ppo) ==="]
    assert out.count("trainable params") == 3
    assert not (in_tmp / "runs").exists()


def test_sft_then_dpo_in_one_run_uses_the_sft_model_as_the_dpo_reference(in_tmp, tiny_llama, instruction_dir,
                                                                          preference_dir):
    """The sft -> dpo hybrid: the dpo stage starts from (and is judged against) the sft stage's weights, not
    the original model, and learns the preference."""
    from tunesmith.cli import main
    from tunesmith.objectives import dpo
    from tunesmith.data.sources import read
    from tunesmith.evaluate.score import evaluate
    from tunesmith.trained import load_trained

    cfg = _with_sft_first(in_tmp / "sd.yaml", "sd", tiny_llama, instruction_dir, f"""\
  - name: dpo
    data: {{train: {preference_dir}}}
    tuning: {{kind: lora, r: 4, alpha: 8, dropout: 0.0}}
    objective: {{kind: dpo, beta: 0.5}}
    train: {{epochs: 3, lr: 1.0e-2, eval_every: 8}}
""")
    assert main(["train", str(cfg)]) == 0
    root = in_tmp / "runs" / "sd"
    assert "name: runs/sd/stages/1-sft/model\n" in (root / "stages" / "2-dpo" / "config.yaml").read_text()
    second = json.loads((root / "stages" / "2-dpo" / "summary.json").read_text())
    assert second["validation"]["reward_accuracy"] > 0.7 > second["base"]["validation"]["reward_accuracy"] == 0.5

    # the dpo stage's starting log-probs are the sft model's, not the original model's
    def chosen_logps(model_ref) -> float:
        m = load_trained(model_ref, head="causal-lm")
        part = read(str(preference_dir))["test"]
        examples = dpo.prepare({"test": part}, m.tokenizer, dpo.Config(beta=0.5), m.data_cfg).examples
        dpo.attach_reference(m.model, examples, dpo.Config(precompute_ref=True), 8, m.tokenizer.pad_token_id)
        return evaluate(m.model, dpo, dpo.Config(beta=0.5), examples["test"], 8, m.tokenizer.pad_token_id, None,
                        "test")["chosen_logps"]

    started = second["base"]["test"]["chosen_logps"]
    assert started == pytest.approx(chosen_logps(root / "stages" / "1-sft" / "model"), abs=1e-4)
    assert abs(started - chosen_logps(tiny_llama)) > 0.1
    top = json.loads((root / "summary.json").read_text())
    assert [s["stage"] for s in top["stages"]] == ["sft", "dpo"]


def test_a_ppo_stage_does_not_inherit_loop_settings_it_does_not_take(in_tmp, tiny_llama, instruction_dir,
                                                                     preference_dir):
    from tunesmith import stages
    from tunesmith.errors import ConfigError

    cfg = staged_config(in_tmp / "h.yaml", tiny_llama, instruction_dir, preference_dir)
    # the top level's loop settings, meant for the sft and reward stages
    text = cfg.read_text().replace("save_every: 4, log_every: 4}", "save_every: 4, log_every: 4, eval_every: 4}")
    cfg.write_text(text)
    staged = stages.load(cfg)
    assert staged.stages[2].cfg.train.eval_every == "epoch" and staged.stages[0].cfg.train.eval_every != "epoch"
    # ...while a ppo stage that sets one itself is told it is not used
    cfg.write_text(text.replace("train: {max_steps: 4, batch_size: 16, log_every: 2}",
                                "train: {max_steps: 4, batch_size: 16, log_every: 2, eval_every: 3}"))
    with pytest.raises(ConfigError, match=r"train.eval_every\)?: ppo does not use it"):
        stages.load(cfg)
