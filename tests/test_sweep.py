"""`tunesmith sweep`: a search that finds the learning range of lr, prunes, continues from its storage, and
refuses bad space files at their line."""

from __future__ import annotations

import json

import pytest
import yaml

from tunesmith.cli import main
from tiny import write_config

pytest.importorskip("optuna")

CONFIG = """\
name: tiny
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {{kind: full}}
objective: {{kind: classify}}
train: {{max_steps: 72, batch_size: 16, lr: 3.0e-3, eval_every: 12, log_every: 12, seed: 0}}
eval: {{compare_base: false, forgetting: {{enabled: false}}}}
"""
# Only a band of lr (about 2e-3 to 2e-2) learns the tiny task in 72 steps: below it nothing moves in time, above
# it training flails. Validation accuracy sits near chance for every lr until step 24, so no pruning before 30.
SPACE = "train.lr: {low: 1.0e-5, high: 0.3, log: true}\n"


def sweep(tmp, model, data, *args, space: str = SPACE) -> int:
    cfg = write_config(tmp / "run.yaml", CONFIG.format(model=model, data=data))
    write_config(tmp / "space.yaml", space)
    return main(["sweep", str(cfg), "--space", str(tmp / "space.yaml"), "--startup-trials", "3", "--prune-after",
                 "1", "--prune-warmup", "30", *args])


def study(tmp) -> dict:
    return json.loads((tmp / "runs" / "tiny-sweep.json").read_text())


def test_sweep_finds_the_learning_range_prunes_and_continues(in_tmp, tiny_bert, sentiment_dir, capsys):
    assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "3") == 0
    first = study(in_tmp)["trials"]
    assert len(first) == 3

    # run again with a larger count: the study continues, the first trials are kept as they were
    assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "6") == 0
    found = study(in_tmp)
    trials = found["trials"]
    assert [t["number"] for t in trials] == list(range(6)) and found["trials_finished"] == 6
    assert [(t["params"], t["value"], t["state"]) for t in trials[:3]] == \
        [(t["params"], t["value"], t["state"]) for t in first]
    assert len({t["params"]["train.lr"] for t in trials}) == 6  # a continued study proposes new values

    # the best trial learned, with an lr inside the band that learns
    best = found["best"]
    assert best["value"] >= 0.9
    assert 1e-3 <= best["params"]["train.lr"] <= 3e-2
    # the pruner stopped at least one trial early; it is a normal run folder that says so
    pruned = [t for t in trials if t["state"] == "pruned"]
    assert pruned, [(t["state"], t["value"], t["params"]) for t in trials]
    summary = json.loads((in_tmp / "runs" / pruned[0]["run"] / "summary.json").read_text())
    assert summary["sweep"]["state"] == "pruned" and summary["train"]["halted"]
    assert summary["train"]["steps"] < 72
    assert json.loads((in_tmp / "runs" / pruned[0]["run"] / "status.json").read_text())["state"] == "completed"

    # the best config is a config `tunesmith train` reads, with the best value in it
    from tunesmith.config import load_config

    best_cfg = load_config(best["config"])
    assert best_cfg.name == "tiny-best" and best_cfg.train.lr == pytest.approx(best["params"]["train.lr"])
    assert best_cfg.train.max_steps == 72
    out = capsys.readouterr().out
    assert "trial  run" in out and "best config:" in out and "pruned" in out


def test_an_interrupted_trial_continues_from_its_checkpoint(in_tmp, tiny_bert, sentiment_dir, monkeypatch, capsys):
    import tunesmith.run as run

    real = run.train
    calls = []

    def killed_after_two_evaluations(cfg, *, resume=False, force=False, on_eval=None):
        calls.append(cfg.name)

        def hook(step, scores):
            if len(calls) == 2 and step == 24:
                raise KeyboardInterrupt  # as Ctrl-C (or a kill) would, mid-run
            return on_eval(step, scores)

        return real(cfg, resume=resume, force=force, on_eval=hook)

    monkeypatch.setattr(run, "train", killed_after_two_evaluations)
    with pytest.raises(KeyboardInterrupt):  # called directly: the CLI would turn it into exit status 130
        cfg = write_config(in_tmp / "run.yaml", CONFIG.format(model=tiny_bert, data=sentiment_dir))
        write_config(in_tmp / "space.yaml", "train.lr: {choices: [3.0e-2, 1.0e-2]}\n")
        from tunesmith.sweep import sweep as run_sweep

        run_sweep(cfg, in_tmp / "space.yaml", 2, startup_trials=2, prune=False, overrides=["train.max_steps=36"])
    monkeypatch.setattr(run, "train", real)

    # the same command again: trial 1 goes on in its own folder from its checkpoint, the study ends with 2 trials
    capsys.readouterr()
    assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "2", "--no-prune", "train.max_steps=36",
                 space="train.lr: {choices: [3.0e-2, 1.0e-2]}\n") == 0
    out = capsys.readouterr().out
    assert "trial 1 was interrupted" in out and "resuming from step" in out
    trials = study(in_tmp)["trials"]
    assert [t["state"] for t in trials] == ["complete", "interrupted", "complete"]
    assert trials[2]["run"] == trials[1]["run"] == "tiny-trial-1" and trials[2]["resumes"] == 1
    assert trials[2]["params"] == trials[1]["params"]
    assert study(in_tmp)["trials_finished"] == 2
    summary = json.loads((in_tmp / "runs" / "tiny-trial-1" / "summary.json").read_text())
    assert summary["sweep"]["trial"] == 2 and summary["train"]["steps"] == 36


@pytest.mark.parametrize("space, where, message", [
    ("train.lrr: {low: 1.0e-5, high: 1.0e-3}\n", "space.yaml:1 (train.lrr)", "unknown key 'lrr'"),
    ("train.lr: {low: 1.0e-3, high: 1.0e-5}\n", "space.yaml:1 (train.lr)", "must be below"),
    ("train.lr: {low: 0, high: 1.0e-3, log: true}\n", "space.yaml:1 (train.lr.low)", "log range needs"),
    ("train.lr: {low: 1.0e-5, high: 1.0e-3, scale: log}\n", "space.yaml:1 (train.lr.scale)", "unknown field"),
    ("train.lr: {low: 1.0e-5}\n", "space.yaml:1 (train.lr)", "needs `high`"),
    ("train.lr: {low: x, high: 1.0e-3}\n", "space.yaml:1 (train.lr.low)", "must be a number"),
    ("# lr\n\ntrain.batch_size: {low: 0, high: 8}\n", "space.yaml:3 (train.batch_size)", "does not fit the config"),
    ("tuning.r: {choices: [4, 8]}\n", "space.yaml:1 (tuning.r)", "unknown key 'r'"),
    ("train.batch_size: {low: 8.0, high: 32.0}\n", "space.yaml:1 (train.batch_size)", "does not fit the config"),
    ("tuning.r: {choices: []}\n", "space.yaml:1 (tuning.r.choices)", "non-empty list"),
    ("train.lr: 1.0e-3\n", "space.yaml:1 (train.lr)", "expected a mapping"),
    ("output.dir: {choices: [a, b]}\n", "space.yaml:1 (output.dir)", "cannot be searched"),
    ("train.lr: [1, 2\n", "space.yaml:2", "not valid YAML"),
    ("", "space.yaml", "names no keys"),
])
def test_bad_space_files_are_refused_at_their_line(in_tmp, tiny_bert, sentiment_dir, capsys, space, where, message):
    assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "2", space=space) == 2
    err = capsys.readouterr().err
    assert where in err and message in err, err
    assert not (in_tmp / "runs" / "tiny-trial-0").exists()


def test_a_metric_the_objective_lacks_is_refused(in_tmp, tiny_bert, sentiment_dir, capsys):
    assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "2", "--metric", "rouge1") == 2
    err = capsys.readouterr().err
    assert "--metric" in err and "accuracy" in err


def test_a_second_sweep_of_a_running_study_is_refused(in_tmp, tiny_bert, sentiment_dir, capsys):
    """Two sweeps of one study would take each other's running trials for interrupted ones."""
    import fcntl

    (in_tmp / "runs").mkdir()
    with open(in_tmp / "runs" / "tiny-sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert sweep(in_tmp, tiny_bert, sentiment_dir, "--trials", "1") == 2
    assert "another `tunesmith sweep` of this study is running" in capsys.readouterr().err
    assert not (in_tmp / "runs" / "tiny-trial-0").exists()


def test_space_ranges_and_choices_are_read_as_meant(tmp_path):
    from tunesmith.sweep import read_space

    path = write_config(tmp_path / "space.yaml", "train.lr: {choices: [1e-5, 3.0e-4]}\n"
                                                 "train.epochs: {low: 1, high: 3}\n"
                                                 "train.warmup: {low: 0, high: 0.2, step: 0.05}\n")
    lr, epochs, warmup = read_space(path)
    assert lr.choices == [1e-5, 3e-4]  # `1e-5` (no dot) is a number here, not YAML 1.1's string
    assert epochs.is_int and not warmup.is_int and warmup.step == 0.05


def test_as_override_reads_back_as_the_value():
    from tunesmith.sweep import as_override

    for value in (1e-05, 3, 0.5, "cosine", True, None, "yes"):
        key, _, text = as_override("k", value).partition("=")
        assert yaml.safe_load(text) == value
