"""A run's state survives what happens to real jobs: SIGTERM from a scheduler, a damaged checkpoint, a
`--resume` with a config that no longer matches, and an unexpected error (a bug) reported in one line."""

from __future__ import annotations

import json
import os
import signal

from tiny import classify_config
from tunesmith.cli import main
from tunesmith.train import checkpoint

TRAIN = "train: {epochs: 3, batch_size: 16, lr: 3.0e-3, save_every: 2, log_every: 2, eval_every: 4, seed: 0}\n"


def config(root, model, data, tuning="{kind: full}"):
    cfg = classify_config(root / "c.yaml", model, data, tuning)
    text = cfg.read_text()
    cfg.write_text(text.replace(text.split("\n")[5] + "\n", TRAIN))
    return cfg


def stop_at(monkeypatch, step: int, how):
    """Make the loop stop (`how()`) right after writing the checkpoint of `step`."""
    real = checkpoint.save

    def save(folder, model, optimizer, scheduler, state):
        real(folder, model, optimizer, scheduler, state)
        if state["step"] >= step:
            how()

    monkeypatch.setattr(checkpoint, "save", save)


def test_sigterm_leaves_a_failed_resumable_run(in_tmp, tiny_bert, sentiment_dir, monkeypatch, capsys):
    cfg = config(in_tmp, tiny_bert, sentiment_dir)
    stop_at(monkeypatch, 4, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["train", str(cfg)]) == 143
    run = in_tmp / "runs" / "tiny"
    assert json.loads((run / "status.json").read_text())["state"] == "failed"
    assert not (run / "summary.json").exists()
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    assert main(["train", str(cfg), "--resume"]) == 0
    assert "resuming from step 4" in capsys.readouterr().out
    assert (run / "summary.json").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(in_tmp, tiny_bert, sentiment_dir, monkeypatch,
                                                                     capsys):
    cfg = config(in_tmp, tiny_bert, sentiment_dir)

    def interrupt():
        raise KeyboardInterrupt

    stop_at(monkeypatch, 6, interrupt)
    assert main(["train", str(cfg)]) == 130
    ckpt = in_tmp / "runs" / "tiny" / "checkpoints"
    assert json.loads((ckpt / "previous" / "state.json").read_text())["step"] == 4
    weights = ckpt / "last" / "trainable.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10:] = b"\xff" * 10  # a bit rot the header cannot see
    weights.write_bytes(bytes(data))
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint" in out and "damaged (trainable.safetensors does not match its checksum)" in out
    assert "resuming from step 4" in out


def test_no_whole_checkpoint_is_a_located_error(in_tmp, tiny_bert, sentiment_dir, monkeypatch, capsys):
    cfg = config(in_tmp, tiny_bert, sentiment_dir)

    def interrupt():
        raise KeyboardInterrupt

    stop_at(monkeypatch, 2, interrupt)
    assert main(["train", str(cfg)]) == 130
    (in_tmp / "runs" / "tiny" / "checkpoints" / "last" / "state.json").write_text("{")
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no whole checkpoint" in err and "checkpoints" in err and "Traceback" not in err


def test_resume_refuses_a_config_that_changes_the_model_or_data(in_tmp, tiny_bert, sentiment_dir, monkeypatch,
                                                                  capsys):
    cfg = config(in_tmp, tiny_bert, sentiment_dir, "{kind: lora, r: 4, targets: [query, value]}")

    def interrupt():
        raise KeyboardInterrupt

    stop_at(monkeypatch, 2, interrupt)
    assert main(["train", str(cfg)]) == 130
    monkeypatch.undo()
    monkeypatch.chdir(in_tmp)
    capsys.readouterr()
    for override, key in [("tuning.r=8", "tuning.r"), ("tuning.targets=[query]", "tuning.targets"),
                          ("train.max_steps=5", "train.max_steps"), ("data.max_length=16", "data.max_length"),
                          ("train.seed=1", "train.seed")]:
        assert main(["train", str(cfg), "--resume", override]) == 2, override
        err = capsys.readouterr().err
        assert f"--resume with a changed config: {key}" in err and "Traceback" not in err
    # changing how often it logs is fine, and so is another spelling of the same model folder (a stage's
    # teacher is saved absolute and given relative on the next command)
    (in_tmp / "same-model").symlink_to(tiny_bert, target_is_directory=True)
    assert main(["train", str(cfg), "--resume", "train.log_every=3", "model.name=same-model"]) == 0
    assert "resuming from step 2" in capsys.readouterr().out


def test_a_bug_is_one_line_naming_the_log(in_tmp, tiny_bert, sentiment_dir, monkeypatch, capsys):
    cfg = config(in_tmp, tiny_bert, sentiment_dir)

    def broken():
        raise ZeroDivisionError("an internal mistake")

    stop_at(monkeypatch, 2, broken)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "bug in tunesmith" in err
    log = in_tmp / "runs" / "tiny" / "error.log"
    assert str(log) in err and "ZeroDivisionError" in log.read_text() and "Traceback" in log.read_text()


def test_a_bug_outside_a_run_logs_to_the_cache_and_debug_shows_it(in_tmp, monkeypatch, capsys):
    import tunesmith.cli as cli

    monkeypatch.setenv("TUNESMITH_HOME", str(in_tmp / "home"))

    def broken(args):
        raise KeyError("oops")

    monkeypatch.setitem(cli.COMMANDS, "schema", broken)
    assert main(["schema"]) == 1
    err = capsys.readouterr().err
    logs = list((in_tmp / "home" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "Traceback" not in err
    assert main(["--debug", "schema"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_a_full_disk_is_bad_input_not_a_bug(in_tmp, monkeypatch, capsys):
    import errno

    import tunesmith.cli as cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(in_tmp / "runs" / "x" / "model.safetensors"))

    monkeypatch.setitem(cli.COMMANDS, "schema", full)
    assert main(["schema"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.safetensors: no space left" in err and "hint:" in err
