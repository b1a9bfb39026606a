"""Bad input ends in one clear error (exit status 2, no traceback), and never in a folder that looks
like a finished run."""

from __future__ import annotations

from tunesmith.cli import main
from tiny import classify_config, sentiment_rows, write_jsonl


def run_cli(args, capsys) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ")
    return err


def assert_no_finished_run(root):
    runs = root / "runs"
    found = [p for p in runs.rglob("*")] if runs.exists() else []
    assert not [p for p in found if p.name in ("summary.json", "model.safetensors", "adapter_model.safetensors")]


def data_dir(root, train=None, validation=None, test=None):
    d = root / "data"
    write_jsonl(d / "train.jsonl", train if train is not None else sentiment_rows(64, 1))
    write_jsonl(d / "validation.jsonl", validation if validation is not None else sentiment_rows(16, 2))
    write_jsonl(d / "test.jsonl", test if test is not None else sentiment_rows(16, 3))
    return d


def test_malformed_jsonl_line(in_tmp, tiny_bert, capsys):
    d = data_dir(in_tmp)
    with open(d / "train.jsonl", "a") as f:
        f.write('{"text": "broken", "label": \n')
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", tiny_bert, d))], capsys)
    assert f"{d / 'train.jsonl'}:65" in err and "not valid JSON" in err
    assert_no_finished_run(in_tmp)


def test_missing_column(in_tmp, tiny_bert, capsys):
    rows = [{"review": r["text"], "label": r["label"]} for r in sentiment_rows(64, 1)]
    d = data_dir(in_tmp, train=rows)
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", tiny_bert, d))], capsys)
    assert "no 'text' column; columns found: review, label" in err and "data.columns.text" in err
    assert f"{d / 'train.jsonl'}:1" in err
    assert_no_finished_run(in_tmp)


def test_empty_split(in_tmp, tiny_bert, capsys):
    d = data_dir(in_tmp, validation=[])
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", tiny_bert, d))], capsys)
    assert "the validation split is empty" in err
    assert_no_finished_run(in_tmp)


def test_config_typo(in_tmp, tiny_bert, capsys):
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, data_dir(in_tmp), extra="eval: {compare_bse: true}\n")
    err = run_cli(["train", str(cfg)], capsys)
    assert "unknown key 'compare_bse'" in err and "did you mean 'eval.compare_base'?" in err
    assert_no_finished_run(in_tmp)


def test_label_in_test_not_in_train(in_tmp, tiny_bert, capsys):
    test = sentiment_rows(16, 3)
    test[5]["label"] = "neutral"
    d = data_dir(in_tmp, test=test)
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", tiny_bert, d))], capsys)
    assert "label 'neutral' in test was not seen in train (labels: neg, pos)" in err
    assert f"{d / 'test.jsonl'}:6" in err
    assert_no_finished_run(in_tmp)


def test_missing_model_folder(in_tmp, capsys):
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", in_tmp / "no-model", data_dir(in_tmp)))], capsys)
    assert "not found" in err
    assert_no_finished_run(in_tmp)


def test_hub_id_offline_fails_fast_naming_samples(in_tmp, capsys, monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    err = run_cli(["train", str(classify_config(in_tmp / "c.yaml", "someorg/some-model", data_dir(in_tmp)))], capsys)
    assert time.perf_counter() - start < 10
    assert "'someorg/some-model' is not a local folder" in err and "sample:minilm-l6" in err
    assert_no_finished_run(in_tmp)


def test_gradient_checkpointing_on_a_model_without_it_fails_before_the_run_folder(in_tmp, tiny_bert, capsys,
                                                                                   monkeypatch):
    from transformers.models.bert import modeling_bert

    monkeypatch.setattr(modeling_bert.BertPreTrainedModel, "supports_gradient_checkpointing", False)
    cfg = classify_config(in_tmp / "c.yaml", tiny_bert, data_dir(in_tmp))
    err = run_cli(["train", str(cfg), "train.gradient_checkpointing=true"], capsys)
    assert "train.gradient_checkpointing" in err and "does not support gradient checkpointing" in err
    assert not (in_tmp / "runs").exists()
