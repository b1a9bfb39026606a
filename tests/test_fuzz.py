"""Generated bad input, from a seeded generator: configs (values, YAML, overrides), data files, model folders,
run folders, command lines and output folders. Each case must end in a clean refusal:

- exit status 2 (an argparse usage error, also status 2, counts), no traceback on stderr or stdout;
- a located message: `error: WHERE: WHAT`, naming the file, key, override or row at fault;
- no folder that looks finished (no summary.json anywhere), no run folder left behind by a refused `train`;
- no file outside the run folder created, changed or removed.

The CLI runs in-process (`tunesmith.cli.main`); nearly every case is refused while validating, before any
weights are read, so the ~330 cases take well under a minute on one core.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tiny import sentiment_rows, write_jsonl
from tunesmith.cli import main

SEED = 14
LOCATED = re.compile(r"^(error: \S.*?: \S|usage: )", re.S)


@dataclass
class Case:
    id: str
    build: Callable
    """build(env) -> (argv, stdin bytes or None, what the message must name)"""


class Env:
    """What a case builds on: a scratch folder (the working directory), the tiny model and a good data folder."""

    def __init__(self, root: Path, model: Path, data: Path, run: Path):
        self.root, self.model, self.data, self.run = root, model, data, run

    def config(self, body: dict | None = None, name: str = "c.yaml", raw: str | None = None) -> Path:
        path = self.root / name
        if raw is not None:
            path.write_text(raw, encoding="utf-8")
            return path
        path.write_text(yaml.safe_dump(body if body is not None else base_config(self.model, self.data),
                                       sort_keys=False), encoding="utf-8")
        return path

    def model_copy(self) -> Path:
        return Path(shutil.copytree(self.model, self.root / "model"))

    def run_copy(self) -> Path:
        return Path(shutil.copytree(self.run, self.root / "finished"))


def base_config(model, data, **train) -> dict:
    return {"name": "tiny", "model": str(model), "data": {"train": str(data), "max_length": 32},
            "tuning": {"kind": "lora", "r": 4, "targets": ["query", "value"]}, "objective": {"kind": "classify"},
            "train": {"epochs": 1, "batch_size": 16, "lr": 3e-3, "seed": 0, **train},
            "eval": {"forgetting": {"enabled": False}}}


def set_key(body: dict, dotted: str, value) -> dict:
    node = body
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return body


# ---------------------------------------------------------------------------------------------------------
# A. config values: every numeric key x values that are wrong for it, in the file or as an override

NUMERIC = ["train.lr", "train.epochs", "train.batch_size", "train.grad_accum", "train.seed", "train.eval_every",
           "train.save_every", "train.log_every", "train.warmup", "train.max_grad_norm", "train.max_steps",
           "train.weight_decay", "train.eval_batch_size", "train.early_stopping.patience", "data.max_length",
           "data.split.validation", "data.split.test", "data.split.seed", "tuning.r", "tuning.alpha",
           "tuning.dropout", "eval.generate.temperature", "eval.generate.top_p", "eval.generate.max_new_tokens",
           "data.checks.truncation", "data.checks.leakage.threshold"]
BAD_NUMBERS = ["true", "false", ".inf", "-.inf", ".nan", "-5", "abc", "[1, 2]", "{a: 1}", str(2**70), str(-2**70),
               "''", "1e400"]


def value_cases(rng: random.Random) -> list[Case]:
    pairs = [(k, v) for k in NUMERIC for v in BAD_NUMBERS]
    rng.shuffle(pairs)
    out = []
    for i, (key, value) in enumerate(pairs[:150]):
        in_file = i % 2 == 0

        def build(env, key=key, value=value, in_file=in_file):
            if in_file:
                text = yaml.safe_dump(set_key(base_config(env.model, env.data), key, "__BAD__"), sort_keys=False)
                return ["train", str(env.config(raw=text.replace("__BAD__", value)))], None, key
            return ["train", str(env.config()), f"{key}={value}"], None, key
        out.append(Case(f"value-{key}-{value[:12]}-{'file' if in_file else 'override'}", build))
    return out


# ---------------------------------------------------------------------------------------------------------
# B. the config file itself: encodings, binary, folders, YAML features a config must not use

def yaml_cases(rng: random.Random) -> list[Case]:
    def good(env) -> str:
        return yaml.safe_dump(base_config(env.model, env.data), sort_keys=False)

    def raw_bytes(env, data: bytes):
        path = env.root / "c.yaml"
        path.write_bytes(data)
        return ["train", str(path)], None, "c.yaml"

    makers: list[tuple[str, Callable]] = []
    for i in range(8):
        def bad_utf8(env, i=i):
            text = good(env).encode()
            at = random.Random(i).randrange(len(text))
            return raw_bytes(env, text[:at] + bytes([0xC3, 0x28, 0xFF]) + text[at:])
        makers.append((f"bad-utf8-{i}", bad_utf8))
    for i in range(5):
        makers.append((f"binary-{i}", lambda env, i=i: raw_bytes(env, random.Random(i).randbytes(300) + b"\x00")))
    makers += [
        ("utf16-no-bom", lambda env: raw_bytes(env, good(env).encode("utf-16-le"))),
        ("cp1252", lambda env: raw_bytes(env, (good(env) + "# caf\u00e9\n").encode("cp1252"))),
        ("folder", lambda env: (["train", str(Path(os.makedirs(env.root / "d.yaml") or env.root / "d.yaml"))],
                                None, "d.yaml")),
        ("missing", lambda env: (["train", str(env.root / "nope.yaml")], None, "nope.yaml")),
        ("empty", lambda env: raw_bytes(env, b"")),
        ("list-top", lambda env: raw_bytes(env, b"- a\n- b\n")),
        ("scalar-top", lambda env: raw_bytes(env, b"just text\n")),
        ("custom-tag", lambda env: raw_bytes(env, good(env).replace("lr: 0.003", "lr: !fancy 3").encode())),
        ("python-tag", lambda env: raw_bytes(env, (good(env) + "x: !!python/object/apply:os.system [echo hi]\n")
                                             .encode())),
        ("map-tag", lambda env: raw_bytes(env, (good(env) + "y: !thing {a: 1}\n").encode())),
        ("recursive-alias", lambda env: raw_bytes(env, (good(env) + "z: &r [*r]\n").encode())),
        ("recursive-map", lambda env: raw_bytes(env, (good(env) + "z: &r {a: *r}\n").encode())),
        ("complex-key", lambda env: raw_bytes(env, (good(env) + "? [a, b]\n: 1\n").encode())),
        ("map-key", lambda env: raw_bytes(env, (good(env) + "? {a: 1}\n: 1\n").encode())),
        ("duplicate-key", lambda env: raw_bytes(env, (good(env) + "name: again\n").encode())),
        ("tab-indent", lambda env: raw_bytes(env, good(env).replace("  lr", "\tlr").encode())),
        ("unclosed", lambda env: raw_bytes(env, (good(env) + "w: [1, 2\n").encode())),
        ("laughs", lambda env: raw_bytes(env, ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
            f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n"
            for p, c in zip("abcdefg", "bcdefgh"))).encode())),
        ("unknown-kind", lambda env: raw_bytes(env, good(env).replace("kind: lora", "kind: lorra").encode())),
        ("typos", lambda env: raw_bytes(env, good(env).replace("epochs", "epochz").replace("batch_size", "batchsize")
                                         .encode())),
        ("no-model", lambda env: raw_bytes(env, b"name: x\ndata: {train: d.jsonl}\n")),
        ("bad-regex", lambda env: raw_bytes(env, good(env).replace(
            "tuning:\n  kind: lora\n  r: 4\n  targets:\n  - query\n  - value\n",
            "tuning: {kind: freeze, also_train: ['(unclosed']}\n").encode())),
        ("bad-encoding-name", lambda env: raw_bytes(env, good(env).replace("max_length: 32", "max_length: 32\n  "
                                                                           "encoding: klingon").encode())),
    ]
    for depth in (70, 500, 10_000, 50_000):
        makers.append((f"nested-{depth}", lambda env, d=depth: raw_bytes(env, b"a: " + b"[" * d + b"]" * d + b"\n")))
    for i in range(4):
        def truncated(env, i=i):
            text = good(env)
            cut = text.index("data:") + random.Random(i).randrange(5, 20)
            return raw_bytes(env, text[:cut].encode())[:2] + (None,)  # may still be valid YAML: any place
        makers.append((f"truncated-{i}", truncated))
    return [Case(f"yaml-{name}", lambda env, m=m: m(env)) for name, m in makers]


# ---------------------------------------------------------------------------------------------------------
# C. overrides

def override_cases(rng: random.Random) -> list[Case]:
    fixed = ["train.lr=[1, 2", "train.lr=!!python/object/apply:os.system [echo hi]", "train.lr={a: 1",
             "=3", "train..lr=1", ".train=1", "train.lr.x=1", "tuning.kind=nonsense", "model=", "train=5",
             "train.lr=1e-3e", "objective.kind=clm2", "regime=sequential", "data.columns=[a]", "name=[x]",
             "train.seed=-1", "train.seed=18446744073709551616", "train.epochs=.inf", "train.eval_every=0",
             "train.eval_every=-5", "train.lr=true", "tuning.kind=full", "data.max_length=100000",
             "eval.metrics=[accuracy, bleu]", "train.early_stopping.metric=bleu", "tuning.r=0", "x.y.z=1"]
    alphabet = "abc.=[]{}:!,'\"&*#| -0123456789"
    randoms = []
    for _ in range(8):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 14)))
        randoms.append(f"train.{junk.replace('=', '')}={junk}")
    out = []
    for text in fixed + randoms:
        def build(env, text=text):
            argv = ["train", str(env.config()), text]
            if text == "tuning.kind=full":  # a switched kind starts afresh; an r left on it would be refused
                argv.append("tuning.r=4")
            return argv, None, None
        out.append(Case(f"override-{text[:30]}", build))
    return out


# ---------------------------------------------------------------------------------------------------------
# D. data files

def data_cases(rng: random.Random) -> list[Case]:
    rows = sentiment_rows(48, 1)

    def with_file(name: str, data: bytes | Callable, key: str | None = None):
        def build(env):
            folder = env.root / "data"
            folder.mkdir(exist_ok=True)
            path = folder / name
            if callable(data):
                data(path)
            else:
                path.write_bytes(data)
            body = base_config(env.model, folder if name.startswith("train.") else path)
            return ["train", str(env.config(body))], None, key or str(path)
        return build

    def jsonl(rs) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in rs).encode()

    def csv_text(rs, sep=",") -> str:
        return f"text{sep}label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rs)

    out = []
    for i in range(6):
        at = rng.randrange(len(rows))
        bad = jsonl(rows[:at]) + b'{"text": "caf\xe9 \xff", "label": "pos"}\n' + jsonl(rows[at:])
        out.append(Case(f"data-bad-utf8-jsonl-{i}", with_file("train.jsonl", bad)))
        out.append(Case(f"data-cp1252-csv-{i}", with_file(
            "train.csv", csv_text(rows[:at]).encode() + "na\u00efve caf\u00e9,pos\n".encode("cp1252") +
            csv_text(rows[at:]).split("\n", 1)[1].encode())))
        out.append(Case(f"data-broken-json-{i}", with_file(
            "train.jsonl", jsonl(rows[:at]) + b'{"text": "x", "label": \n' + jsonl(rows[at:]))))
    labels = [float("nan"), 1.5, True, False, [1], {"a": 1}, None, -0.0, [], ""]
    for i, label in enumerate(labels):
        rs = [dict(r) for r in rows]
        rs[rng.randrange(len(rs))]["label"] = label
        out.append(Case(f"data-label-{i}-{type(label).__name__}", with_file("train.jsonl", jsonl(rs))))
    huge = jsonl(rows[:5]) + b'{"text": "x", "label": ' + b"9" * 5000 + b"}\n" + jsonl(rows[5:])
    out.append(Case("data-label-5000-digits", with_file("train.jsonl", huge)))
    for i, line in enumerate([b"[1, 2]", b"3", b'"text"', b"null", b"[" * 50_000 + b"]" * 50_000,
                              b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b', "label": "pos"}']):
        out.append(Case(f"data-not-object-{i}", with_file("train.jsonl", jsonl(rows[:3]) + line + b"\n" + jsonl(rows))))
    out += [
        Case("data-nul", with_file("train.jsonl", jsonl(rows[:4]) + b"\x00\x00" + jsonl(rows[4:]))),
        Case("data-utf16-no-bom", with_file("train.csv", csv_text(rows).encode("utf-16-le"))),
        Case("data-short-row", with_file("train.csv", (csv_text(rows[:7]) + "lonely\n" + csv_text(rows[7:])
                                                       .split("\n", 1)[1]).encode())),
        Case("data-long-row", with_file("train.csv", (csv_text(rows[:7]) + "a,pos,extra\n").encode())),
        Case("data-tsv-with-commas", with_file("train.tsv", csv_text(rows).encode())),
        Case("data-csv-huge-field", with_file("train.csv", (csv_text(rows[:3]) + "x" * 140_000 + ",pos\n").encode())),
        Case("data-csv-unclosed-quote", with_file("train.csv", (csv_text(rows[:3]) + '"never closed,pos\n' +
                                                               csv_text(rows).split("\n", 1)[1]).encode())),
        Case("data-csv-dup-header", with_file("train.csv", ("text,text\n" + "a,b\n" * 30).encode())),
        Case("data-unmapped-label", with_file("train.csv", csv_text(rows).replace("text,label", "text,sentiment", 1)
                                              .encode(), key="train.csv")),
        Case("data-no-text", with_file("train.jsonl", jsonl([{"review": r["text"], "label": r["label"]}
                                                              for r in rows]), key="train.jsonl")),
        Case("data-parquet-text", with_file("train.parquet", b"this is not parquet\n" * 10)),
        Case("data-parquet-empty", with_file("train.parquet", b"")),
        Case("data-parquet-truncated", with_file("train.parquet", b"PAR1" + os.urandom(64) + b"PAR1")),
        Case("data-empty-file", with_file("train.jsonl", b"", key="train")),
        Case("data-blank-lines", with_file("train.jsonl", b"\n\n  \n", key="train")),
        Case("data-json-not-list", with_file("t.json", b'{"a": 1, "b": 2}')),
        Case("data-json-deep", with_file("t.json", b"[" * 100_000 + b"]" * 100_000)),
        Case("data-unknown-suffix", with_file("t.xlsx", b"PK\x03\x04")),
        Case("data-empty-datasets-folder", with_file("dataset", lambda p: (p.mkdir(), (p / "dataset_dict.json")
                                                                          .write_text("{}")))),
        Case("data-garbage-datasets-folder", with_file("dataset", lambda p: (p.mkdir(), (p / "dataset_dict.json")
                                                                            .write_text('{"splits": ["train"]}')))),
        Case("data-folder-no-splits", with_file("dataset", lambda p: (p.mkdir(), (p / "notes.md").write_text("x")))),
        Case("data-missing", lambda env: (["train", str(env.config(base_config(env.model, env.root / "none.jsonl")))],
                                          None, "none.jsonl")),
    ]
    return out


# ---------------------------------------------------------------------------------------------------------
# E. model folders

def model_cases(rng: random.Random) -> list[Case]:
    def with_model(change: Callable, overrides=(), objective=None):
        def build(env):
            model = env.model_copy()
            change(model)
            body = base_config(model, env.data)
            if objective:
                body["objective"] = {"kind": objective}
            return ["train", str(env.config(body)), *overrides], None, None
        return build

    def write(name, data):
        return lambda m: (m / name).write_bytes(data)

    def weights_cut(n):
        return lambda m: (m / "model.safetensors").write_bytes((m / "model.safetensors").read_bytes()[:n])

    def config_edit(**kw):
        def change(m):
            c = json.loads((m / "config.json").read_text())
            c.update(kw)
            (m / "config.json").write_text(json.dumps(c))
        return change

    def remove_tokenizer(m):
        for f in m.iterdir():
            if "token" in f.name or "vocab" in f.name:
                f.unlink()

    def pickled(m):
        import pickle

        class Payload:
            def __reduce__(self):
                return (os.system, ("echo pwned > pwned.txt",))

        (m / "model.safetensors").unlink()
        (m / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))

    out = [Case(f"model-weights-cut-{n}", with_model(weights_cut(n))) for n in (0, 4, 9, 200, 5000)]
    out += [Case(f"model-weights-garbage-{i}", with_model(write("model.safetensors", random.Random(i).randbytes(4000))))
            for i in range(3)]
    out += [
        Case("model-config-list", with_model(write("config.json", b"[1, 2]"))),
        Case("model-config-string", with_model(write("config.json", b'"bert"'))),
        Case("model-config-garbage", with_model(write("config.json", b"{not json"))),
        Case("model-config-binary", with_model(write("config.json", b"\xff\xfe\x00garbage"))),
        Case("model-config-heads", with_model(config_edit(num_attention_heads=5))),
        Case("model-config-negative", with_model(config_edit(hidden_size=-3))),
        Case("model-config-type", with_model(config_edit(model_type="no-such-architecture"))),
        Case("model-no-config", with_model(lambda m: (m / "config.json").unlink())),
        Case("model-tokenizer-garbage", with_model(write("tokenizer.json", b"{garbage"))),
        Case("model-tokenizer-list", with_model(write("tokenizer.json", b"[]"))),
        Case("model-no-tokenizer", with_model(remove_tokenizer)),
        Case("model-pickle", with_model(pickled)),
        Case("model-max-length", with_model(lambda m: None, ["data.max_length=4096"])),
        Case("model-clm-on-encoder", with_model(lambda m: None, objective="clm")),
        Case("model-is-a-file", lambda env: (["train", str(env.config(base_config(env.data / "train.jsonl",
                                                                                  env.data)))], None, None)),
    ]
    return out


# ---------------------------------------------------------------------------------------------------------
# F. commands on run and model folders

def command_cases(rng: random.Random) -> list[Case]:
    out = []
    for flag in ("0", "-1", "abc", "1.5"):
        out.append(Case(f"cli-eval-batch-size-{flag}", lambda env, f=flag: (
            ["eval", str(env.run), "--data", str(env.data), "--batch-size", f], None, None)))
    out.append(Case("cli-unknown-flag", lambda env: (["train", str(env.config()), "--frobnicate"], None, None)))
    out.append(Case("cli-generate-max-new-tokens-0", lambda env: (["generate", str(env.run), "hi",
                                                                   "--max-new-tokens", "0"], None, None)))
    for name, stdin in [("empty", b""), ("blank", b"\n \n"), ("binary", b"\x00\x01\xff\xfe" * 10),
                        ("latin1", "caf\u00e9\n".encode("latin-1"))]:
        out.append(Case(f"cli-predict-stdin-{name}", lambda env, s=stdin: (["predict", str(env.model)], s, "stdin")))

    def damaged(change: Callable, argv: Callable):
        def build(env):
            run = env.run_copy()
            change(run)
            return argv(env, run), None, str(run)
        return build

    predict = lambda env, run: ["predict", str(run), "good film"]  # noqa: E731
    evaluate = lambda env, run: ["eval", str(run), "--data", str(env.data)]  # noqa: E731
    changes = {
        "config-garbage": lambda r: (r / "config.yaml").write_text("{[: not yaml"),
        "config-list": lambda r: (r / "config.yaml").write_text("- a\n"),
        "config-bad-value": lambda r: (r / "config.yaml").write_text(
            (r / "config.yaml").read_text().replace("lr: 0.003", "lr: true")),
        "config-binary": lambda r: (r / "config.yaml").write_bytes(b"\xff\x00\x01"),
        "summary-garbage": lambda r: (r / "summary.json").write_text("{"),
        "summary-list": lambda r: (r / "summary.json").write_text("[]"),
        "summary-escape": lambda r: (r / "summary.json").write_text('{"weights": "../../elsewhere"}'),
        "manifest-garbage": lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe"),
        "manifest-missing": lambda r: (r / "manifest.json").unlink(),
        "adapter-cut": lambda r: (r / "adapter" / "adapter_model.safetensors").write_bytes(b"\x10\x00"),
        "adapter-config": lambda r: (r / "adapter" / "adapter_config.json").write_text("{oops"),
        "adapter-tokenizer": lambda r: (r / "adapter" / "tokenizer.json").write_text("{oops"),
    }
    for name, change in changes.items():
        out.append(Case(f"run-{name}-predict", damaged(change, predict)))
        out.append(Case(f"run-{name}-eval", damaged(change, evaluate)))
    # the digests of the rows a run trained on, read when eval checks --data against them
    rows = {"garbage": lambda r: (r / "train_rows.json").write_text("{"),
            "digests": lambda r: (r / "train_rows.json").write_text('{"views": {"text": "not base64!"}}')}
    for name, change in rows.items():
        out.append(Case(f"run-train-rows-{name}-eval", damaged(change, lambda env, run: [
            "eval", str(run), "--data", str(env.data), "--split", "train"])))
    return out


# ---------------------------------------------------------------------------------------------------------
# G. where the run would be written

def output_cases(rng: random.Random) -> list[Case]:
    def file_as_dir(env):
        (env.root / "afile").write_text("x")
        return ["train", str(env.config()), f"output.dir={env.root / 'afile'}"], None, "output.dir"

    def below_file(env):
        (env.root / "afile").write_text("x")
        return ["train", str(env.config()), f"output.dir={env.root / 'afile' / 'runs'}"], None, "output.dir"

    return [Case("output-is-a-file", file_as_dir), Case("output-below-a-file", below_file),
            Case("output-in-proc", lambda env: (["train", str(env.config()), "output.dir=/proc/tunesmith-runs"],
                                                None, "output.dir"))]


RNG = random.Random(SEED)
CASES = [*value_cases(RNG), *yaml_cases(RNG), *override_cases(RNG), *data_cases(RNG), *model_cases(RNG),
         *command_cases(RNG), *output_cases(RNG)]


def test_there_are_at_least_300_cases():
    assert len(CASES) >= 300
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------------------------
# the harness

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert):
    """A finished LoRA run of the tiny model (trained for 2 steps), copied by the cases that damage it."""
    from tunesmith.config import load_config
    from tunesmith.run import train

    root = tmp_path_factory.mktemp("fuzz-run")
    write_jsonl(root / "data" / "train.jsonl", sentiment_rows(48, 1))
    body = base_config(tiny_bert, root / "data" / "train.jsonl", max_steps=2)
    body["output"] = {"dir": str(root / "runs")}
    body["eval"]["compare_base"] = False
    (root / "c.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    train(load_config(root / "c.yaml"))
    return root / "runs" / "tiny"


@pytest.fixture(scope="module")
def good_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-data")
    write_jsonl(root / "train.jsonl", sentiment_rows(48, 1))
    return root


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_refused_cleanly(case, tmp_path, monkeypatch, capsys, tiny_bert, good_data, finished_run):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    env = Env(work, tiny_bert, good_data, finished_run)
    argv, stdin, must_name = case.build(env)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    watched = {root: snapshot(root) for root in (work, tiny_bert, good_data, finished_run.parent)}
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a usage error, status 2
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{err}"
    assert "Traceback" not in err and "Traceback" not in out, err
    assert LOCATED.match(err), f"not located: {err!r}"
    if must_name:
        assert must_name in err, f"{must_name!r} not named in: {err!r}"
    if argv[0] == "train":  # a refused run leaves nothing but, at most, its lock and marker (blocking nothing)
        left = [p for p in (work / "runs").rglob("*") if p.is_file() and p.name not in (".lock", ".tunesmith-run")] \
            if (work / "runs").exists() else []
        assert not left, f"a run folder was left: {left}"
    assert not (work / "pwned.txt").exists()
    for root, before in watched.items():
        after = snapshot(root)
        if root == work:  # the case's inputs are there before; nothing may appear outside runs/
            assert [k for k in after if k not in before and not k.startswith("runs/")] == [], "a file appeared"
            assert not [k for k in after if k not in before and k.endswith("summary.json")], "a finished run"
            assert {k: after.get(k) for k in before} == before, "a file was changed or removed"
        else:
            assert after == before, f"files under {root} changed"
