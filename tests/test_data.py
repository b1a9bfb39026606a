"""Reading data: formats, splits, and errors that say where the problem is."""

from __future__ import annotations

import json

import pytest

from tunesmith.config import DataConfig
from tunesmith.data.load import load_splits
from tunesmith.data.sources import read
from tunesmith.errors import DataError
from tiny import sentiment_rows, write_jsonl


def cfg(**kw) -> DataConfig:
    return DataConfig(**kw)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n')
    with pytest.raises(DataError) as e:
        read(str(path))
    assert f"{path}:3" in e.value.render() and "not valid JSON" in e.value.render()


def test_every_file_type_reads_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"text": "good film", "label": "pos"}, {"text": "bad, dull", "label": "neg"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.csv").write_text('text,label\ngood film,pos\n"bad, dull",neg\n')
    (tmp_path / "a.tsv").write_text("text\tlabel\ngood film\tpos\nbad, dull\tneg\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.tsv", "a.parquet"):
        assert read(str(tmp_path / name)).rows == rows, name
    assert read(str(tmp_path / "hf"))["train"].rows == rows


def test_csv_line_numbers_follow_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"two\nlines",pos\nok,neg\n')
    part = read(str(path))
    assert part.where(1) == f"{path}:4"


def test_missing_column_lists_columns_found(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"review": "x", "stars": 1}])
    with pytest.raises(DataError) as e:
        load_splits(cfg(train=str(tmp_path / "train.jsonl"), columns={"text": "body"}), seed=0)
    assert "column 'body' (data.columns.text) not found" in e.value.render()
    assert "review, stars" in e.value.render()


def test_columns_are_renamed(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"review": f"r{i}", "stars": i % 2} for i in range(20)])
    splits = load_splits(cfg(train=str(tmp_path / "train.jsonl"), columns={"text": "review", "label": "stars"}), 0)
    assert set(splits["train"].rows[0]) == {"text", "label"}


def test_carving_is_deterministic_and_disjoint(tmp_path):
    rows = [{"text": f"row {i}", "label": i % 2} for i in range(100)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    a = load_splits(cfg(train=str(tmp_path / "train.jsonl")), seed=3)
    b = load_splits(cfg(train=str(tmp_path / "train.jsonl")), seed=3)
    c = load_splits(cfg(train=str(tmp_path / "train.jsonl")), seed=4)
    assert {k: v.rows for k, v in a.items()} == {k: v.rows for k, v in b.items()}
    assert a["test"].rows != c["test"].rows
    assert [len(a[s].rows) for s in ("train", "validation", "test")] == [80, 10, 10]
    seen = [r["text"] for s in a.values() for r in s.rows]
    assert len(seen) == len(set(seen)) == 100
    # carved rows keep their original line numbers for error messages
    assert a["test"].where(0).startswith(str(tmp_path / "train.jsonl") + ":")


def test_folder_splits_are_used(sentiment_dir):
    splits = load_splits(cfg(train=str(sentiment_dir)), seed=0)
    assert [len(splits[s].rows) for s in ("train", "validation", "test")] == [192, 48, 48]


def test_empty_split_is_an_error(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(20))
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the test split is empty"):
        load_splits(cfg(train=str(tmp_path / "train.jsonl"), test=str(tmp_path / "test.jsonl")), seed=0)


def test_too_few_rows_to_carve(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(2))
    with pytest.raises(DataError, match="too few to carve"):
        load_splits(cfg(train=str(tmp_path / "train.jsonl")), seed=0)


def test_max_rows_caps_a_split(sentiment_dir):
    splits = load_splits(cfg(train=str(sentiment_dir), max_rows={"train": 30}), seed=0)
    assert len(splits["train"].rows) == 30 and len(splits["test"].rows) == 48


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read(str(tmp_path / "nope.jsonl"))
