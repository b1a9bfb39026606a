"""Config loading: typed values, overrides, and errors that name the file line, key and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import dump, load_config
from tunesmith.errors import ConfigError

BASE = """\
name: demo
model: sample:minilm-l6
data:
  train: data/train.jsonl
tuning: {kind: lora, r: 8}
train:
  lr: 1.0e-4
  batch_size: 8
"""


def write(tmp_path, text=BASE):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_and_shorthands(tmp_path):
    cfg = load_config(write(tmp_path))
    assert cfg.model.name == "sample:minilm-l6"
    assert cfg.tuning.kind == "lora" and cfg.tuning.r == 8 and cfg.tuning.alpha == 16
    assert cfg.objective.kind == "classify"
    assert cfg.train.lr == 1e-4 and cfg.train.seed == 0


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(write(tmp_path), ["train.lr=3e-4", "tuning.targets=[query, value]", "data.max_rows.train=50",
                                        "objective=classify"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.tuning.targets == ["query", "value"]
    assert cfg.data.max_rows == {"train": 50}


def test_override_switches_tuning_kind(tmp_path):
    cfg = load_config(write(tmp_path), ["tuning={kind: freeze, train_last: 1}"])
    assert cfg.tuning.kind == "freeze" and cfg.tuning.train_last == 1


def test_name_defaults_to_file_stem(tmp_path):
    cfg = load_config(write(tmp_path, BASE.replace("name: demo\n", "")))
    assert cfg.name == "run"


def test_unknown_key_names_line_and_suggests(tmp_path):
    path = write(tmp_path, BASE.replace("  batch_size: 8", "  batch_sze: 8"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = e.value.render()
    assert f"{path}:8" in text and "train.batch_sze" in text
    assert "did you mean 'train.batch_size'?" in text


def test_unknown_key_inside_a_tuning_section(tmp_path):
    path = write(tmp_path, BASE.replace("{kind: lora, r: 8}", "{kind: lora, rank: 8}"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "tuning.rank" in e.value.render() and f"{path}:5" in e.value.render()


def test_unknown_kind_lists_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE.replace("kind: lora", "kind: lorra")))
    text = e.value.render()
    assert "'lorra' is not a known tuning kind" in text and "did you mean 'lora'?" in text
    assert "full" in text and "freeze" in text


def test_wrong_type_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, BASE.replace("batch_size: 8", "batch_size: eight"))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = e.value.render()
    assert f"{path}:8 (train.batch_size)" in text
    assert "valid integer" in text and "'eight'" in text


def test_wrong_type_in_override_names_override(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path), ["train.epochs=many"])
    assert "override 'train.epochs=many' (train.epochs)" in e.value.render()


def test_typo_in_override_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path), ["train.learning_rate=1e-3"])
    assert "unknown key 'learning_rate'" in e.value.render() and "override" in e.value.render()


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE.replace("data:\n  train: data/train.jsonl\n", "data: {}\n")))
    assert "'data.train' is missing" in e.value.render()


def test_duplicate_key_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="appears twice"):
        load_config(write(tmp_path, BASE + "train: {}\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_metric_must_belong_to_objective(tmp_path):
    with pytest.raises(ConfigError, match="'rouge1' is not a metric of objective 'classify'"):
        load_config(write(tmp_path), ["train.early_stopping.metric=rouge1"])


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(write(tmp_path), ["train.lr=-1"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path))
    path = tmp_path / "resolved.yaml"
    path.write_text(dump(cfg))
    assert load_config(path) == cfg


def test_config_reference_in_docs_is_current():
    """docs/config.md is generated from the field docstrings; regenerate with `tunesmith schema`."""
    from pathlib import Path

    from tunesmith.docs import config_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "config.md"
    assert doc.read_text() == config_reference(), "run: tunesmith schema > docs/config.md"


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_example_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first in (f"# tunesmith train examples/{path.name}", f"# tunesmith plan examples/{path.name}"), first
    from tunesmith import stages

    stages.load(path) if stages.is_staged(path) else load_config(path)
