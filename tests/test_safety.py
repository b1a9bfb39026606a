"""A run never touches files outside its own folder, --force deletes only what tunesmith made, a shared run
folder never runs a model's code, and two runs of one name never share a folder."""

from __future__ import annotations

import json

import pytest

from tunesmith import artifacts
from tunesmith.cli import main
from tiny import classify_config


def tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("name", ["../victim", "..", ".", "", "/tmp/abs", "a/b", "a\\b", ".hidden", "x" * 129,
                                  "trailing.", "nul\x00"])
def test_unsafe_run_names_are_refused_before_anything_is_written(in_tmp, tiny_bert, sentiment_dir, capsys, name):
    victim = in_tmp / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    before = tree(in_tmp)
    assert main(["train", str(cfg), f"name={json.dumps(name)}", "--force"]) == 2
    err = capsys.readouterr().err
    assert "not a usable run name" in err and "Traceback" not in err
    assert tree(in_tmp) == before  # nothing created, nothing deleted


def test_force_never_deletes_a_folder_tunesmith_did_not_make(in_tmp, tiny_bert, sentiment_dir, capsys):
    mine = in_tmp / "runs" / "tiny"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("the user's own folder")
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "--force", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "not a run folder made by tunesmith" in err and "--force" in err
    assert (mine / "notes.txt").read_text() == "the user's own folder"
    with pytest.raises(Exception, match="refusing to delete"):
        artifacts.clear_run_dir(mine)


def test_force_on_a_new_name_just_trains(in_tmp, tiny_bert, sentiment_dir):
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "--force", "train.max_steps=2", "eval.compare_base=false"]) == 0
    assert (in_tmp / "runs" / "tiny" / "summary.json").exists()


def test_force_replaces_only_its_own_run_folder(in_tmp, tiny_bert, sentiment_dir):
    sibling = in_tmp / "runs" / "other"
    sibling.mkdir(parents=True)
    (sibling / "keep.txt").write_text("x")
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    assert main(["train", str(cfg), "train.max_steps=2", "eval.compare_base=false"]) == 0
    run = in_tmp / "runs" / "tiny"
    assert (run / artifacts.MARKER).exists()
    (run / "stale.txt").write_text("from the first run")
    assert main(["train", str(cfg), "--force", "train.max_steps=2", "eval.compare_base=false"]) == 0
    assert not (run / "stale.txt").exists() and (run / "summary.json").exists()
    assert (sibling / "keep.txt").exists() and (in_tmp / "runs").is_dir()


EVIL_CODE = '''
import pathlib
pathlib.Path(SENTINEL).write_text("the model's own code ran")
from transformers import BertConfig, BertForSequenceClassification


class EvilConfig(BertConfig):
    pass


class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
'''


def evil_model(tiny_bert, root):
    """A copy of the tiny model whose config.json points transformers at Python code in the folder."""
    import shutil

    folder = root / "evil-model"
    shutil.copytree(tiny_bert, folder)
    # transformers imports the code from a copy in its modules cache: the sentinel's path is absolute
    (folder / "modeling_evil.py").write_text(EVIL_CODE.replace("SENTINEL", repr(str(folder / "CODE_RAN"))))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_run_folder_cannot_turn_on_remote_code(in_tmp, tiny_bert, sentiment_dir, capsys):
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir, "{kind: lora, r: 2, targets: [query]}")
    assert main(["train", str(cfg), "train.max_steps=2", "eval.compare_base=false"]) == 0
    run = in_tmp / "runs" / "tiny"
    # someone shares this run folder after pointing its config at a model that ships code
    evil = evil_model(tiny_bert, in_tmp)
    text = (run / "config.yaml").read_text().replace(f"name: {tiny_bert}", f"name: {evil}")
    (run / "config.yaml").write_text(text.replace("trust_remote_code: false", "trust_remote_code: true"))
    assert "trust_remote_code: true" in (run / "config.yaml").read_text()
    capsys.readouterr()
    assert main(["predict", str(run), "a fine film"]) == 0
    out = capsys.readouterr()
    assert not (evil / "CODE_RAN").exists()
    assert "--trust-remote-code" in out.err and json.loads(out.out.splitlines()[0])["text"] == "a fine film"


def test_remote_code_runs_when_the_command_line_allows_it(in_tmp, tiny_bert, sentiment_dir, capsys):
    evil = evil_model(tiny_bert, in_tmp)
    cfg = classify_config(in_tmp / "run.yaml", evil, sentiment_dir)
    assert main(["plan", str(cfg)]) == 0  # not allowed: the model's own classes are not loaded
    assert not (evil / "CODE_RAN").exists()
    assert main(["plan", str(cfg), "--trust-remote-code"]) == 0  # the meta-device build asks nothing on stdin
    assert (evil / "CODE_RAN").exists()
    assert "model.trust_remote_code is on" in capsys.readouterr().err


def test_a_run_folder_being_written_is_not_shared(in_tmp, tiny_bert, sentiment_dir, capsys):
    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    run = in_tmp / "runs" / "tiny"
    lock = artifacts.claim_run_dir(run, resume=False, force=False)  # another process training this name
    try:
        for extra in ([], ["--force"], ["--resume"]):
            assert main(["train", str(cfg), "train.max_steps=2", *extra]) == 2
            assert "being written by another tunesmith process" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [artifacts.LOCK, artifacts.MARKER]
    finally:
        artifacts.release(lock)
    assert main(["train", str(cfg), "train.max_steps=2", "eval.compare_base=false"]) == 0


def test_two_runs_of_one_name_started_together_exactly_one_trains(in_tmp, tiny_bert, sentiment_dir):
    import subprocess
    import sys

    cfg = classify_config(in_tmp / "run.yaml", tiny_bert, sentiment_dir)
    cmd = [sys.executable, "-m", "tunesmith", "train", str(cfg), "train.max_steps=24", "train.log_every=1"]
    procs = [subprocess.Popen(cmd, cwd=in_tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another tunesmith process" in loser or "already holds a finished run" in loser
    lines = [json.loads(line) for line in (in_tmp / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if "split" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # one writer: each step logged once, in order
