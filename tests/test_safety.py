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
