"""Meta-learning (regimes/meta.py, flows/meta.py) on tiny models: the steps are their formulas, episodes
repeat for a seed, meta-train and meta-test classes never mix, adapted weights never leak into the start."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tiny import FILLER, NEGATIVE, POSITIVE, write_config, write_jsonl
from tunesmith.errors import ConfigError, DataError
from tunesmith.regimes import meta

KEYS = POSITIVE + NEGATIVE
CLASSES = [f"topic{i}" for i in range(10)]


def topic_rows(n: int, seed: int) -> list[dict]:
    """Ten classes, each marked by two of the tiny vocabulary's words among filler."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        c = rng.randrange(10)
        words = rng.sample(FILLER, rng.randint(3, 8)) + [KEYS[2 * c], KEYS[2 * c + 1]]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": CLASSES[c]})
    return rows


@pytest.fixture(scope="module")
def topics_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "topics"
    write_jsonl(root / "train.jsonl", topic_rows(400, 1))
    write_jsonl(root / "validation.jsonl", topic_rows(60, 2))
    write_jsonl(root / "test.jsonl", topic_rows(300, 3))
    return root


def cfg(**kw) -> meta.Config:
    return meta.Config(**{"ways": 3, "shots": 2, "queries": 3, "test_classes": 4, **kw})


# --------------------------------------------------------------------------------------- the steps


def test_reptile_step_is_its_formula():
    g = torch.Generator().manual_seed(0)
    theta = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(4, generator=g)}
    phis = [{k: torch.randn_like(v) for k, v in theta.items()} for _ in range(3)]
    out = meta.reptile_step(theta, phis, 0.25)
    for k in theta:
        mean = (phis[0][k] + phis[1][k] + phis[2][k]) / 3
        assert torch.allclose(out[k], theta[k] + 0.25 * (mean - theta[k]), atol=1e-6)
    # eps = 1 with one episode lands on its adapted weights; the inputs are not changed
    assert torch.allclose(meta.reptile_step(theta, phis[:1], 1.0)["w"], phis[0]["w"])
    assert not torch.equal(out["w"], theta["w"])


def test_fomaml_step_is_its_formula():
    theta = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    grads = [{"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([2.0])},
             {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor([0.0])}]
    out = meta.fomaml_step(theta, grads, 0.1)
    assert torch.allclose(out["w"], torch.tensor([1.0 - 0.1 * 2.0, 2.0 - 0.1 * -1.0]))
    assert torch.allclose(out["b"], torch.tensor([0.5 - 0.1 * 1.0]))


def test_confidence_interval_by_hand():
    ci = meta.interval([0.5, 0.7, 0.6, 0.8])
    # mean 0.65, sample sd sqrt(0.05/3), half width 1.96 * sd / 2
    half = 1.96 * (0.05 / 3) ** 0.5 / 2
    assert ci["accuracy"] == pytest.approx(0.65) and ci["ci95"] == pytest.approx(half)
    assert ci["low"] == pytest.approx(0.65 - half) and ci["high"] == pytest.approx(0.65 + half)


# --------------------------------------------------------------------------------------- classes and episodes


def test_class_split_is_seeded_disjoint_and_named_classes_are_honoured():
    train, test = meta.split_classes(CLASSES, cfg(), seed=0)
    assert len(test) == 4 and not set(train) & set(test) and sorted(train + test) == sorted(CLASSES)
    assert meta.split_classes(list(reversed(CLASSES)), cfg(), seed=0) == (train, test)  # order of labels is moot
    assert meta.split_classes(CLASSES, cfg(), seed=1)[1] != test
    named = cfg(test_classes=["topic1", "topic3", "topic5"])
    assert meta.split_classes(CLASSES, named, seed=0)[1] == ["topic1", "topic3", "topic5"]
    with pytest.raises(ConfigError, match="not labels of the data"):
        meta.split_classes(CLASSES, cfg(test_classes=["topic1", "topic2", "nope"]), seed=0)
    with pytest.raises(ConfigError, match="meta-train classes are left"):
        meta.split_classes(CLASSES, cfg(test_classes=8), seed=0)
    with pytest.raises(ValueError, match="fewer than regime.ways"):
        cfg(test_classes=2)


def test_episodes_repeat_for_a_seed_and_draw_only_their_classes():
    rows = topic_rows(300, 5)
    labels = [r["label"] for r in rows]
    train, test = meta.split_classes(CLASSES, cfg(), seed=0)
    a, b = (meta.EpisodeSampler(labels, train, cfg(), seed=7) for _ in range(2))
    other = meta.EpisodeSampler(labels, train, cfg(), seed=8)
    assert [a.episode(i) for i in range(20)] == [b.episode(i) for i in range(20)]
    assert a.episode(3) == b.episode(3)  # an episode depends on its number only, not on what came before
    assert [a.episode(i) for i in range(20)] != [other.episode(i) for i in range(20)]
    for i in range(50):
        ep = a.episode(i)
        assert len(ep.classes) == 3 and set(ep.classes) <= set(train) and not set(ep.classes) & set(test)
        assert len(ep.support) == 3 * 2 and len(ep.query) == 3 * 3
        assert not {r for r, _ in ep.support} & {r for r, _ in ep.query}
        for r, label in ep.support + ep.query:
            assert labels[r] == ep.classes[label]  # episode labels 0..N-1 map back to the row's class
    with pytest.raises(DataError, match="classes have the"):
        meta.EpisodeSampler(labels[:20], train, cfg(), seed=0)


# --------------------------------------------------------------------------------------- on a tiny model


@pytest.fixture
def episodes(tiny_bert, topics_dir):
    from tunesmith.flows.meta import Episodes
    from tunesmith.models.load import load_tokenizer
    from tunesmith.config import ModelConfig
    from tunesmith.tuning import TUNINGS
    from tunesmith.tuning.full import Config as Full
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(ModelConfig(name=str(tiny_bert)))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    # float64: the tiny model's episode gradients are ~1e-9, below float32 rounding of its weights, and the
    # formula tests compare steps that small
    model = TUNINGS["full"].apply(model, Full(), "sequence-classification", tok).double().eval()
    rows = topic_rows(200, 4)
    ids = tok([r["text"] for r in rows])["input_ids"]
    examples = {"train": [{"input_ids": x, "labels": 0} for x in ids]}
    examples["test"] = examples["train"]
    labels = [r["label"] for r in rows]
    sampler = meta.EpisodeSampler(labels, CLASSES, cfg(), seed=0)
    return Episodes(model, examples, tok.pad_token_id, torch.device("cpu")), sampler


def test_prototype_head_scores_by_distance_to_class_means(episodes):
    ep, sampler = episodes
    episode = sampler.episode(0)
    support = ep.batch("train", episode.support)
    meta.init_head(ep.model, support, 3, "prototype")
    feats = []
    from tunesmith.models.anatomy import logits_layer

    layer = logits_layer(ep.model, 3)
    hook = layer.register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    logits = ep.model(input_ids=support["input_ids"], attention_mask=support["attention_mask"]).logits
    hook.remove()
    x = feats[0]
    protos = torch.stack([x[support["labels"] == c].mean(0) for c in range(3)])
    assert torch.allclose(logits, 2 * x @ protos.T - protos.pow(2).sum(-1), atol=1e-4)
    # logits differ from minus the squared distance only by a per-row constant: same ranking
    dist = torch.cdist(x, protos).pow(2)
    assert torch.equal(logits.argmax(-1), (-dist).argmax(-1))
    meta.init_head(ep.model, support, 3, "zero")
    assert float(layer.weight.detach().abs().sum()) == 0.0


def _expected(ep, episode, theta, reg):
    """One episode by hand: start, fresh head, inner SGD, then the adapted weights and the query gradient."""
    ep.load(theta)
    support, query = ep.batch("train", episode.support), ep.batch("train", episode.query)
    meta.init_head(ep.model, support, 3, reg.head_init)
    for _ in range(reg.inner_steps):
        ep.model.zero_grad()
        meta.mean_loss(ep.model, support).backward()
        with torch.no_grad():
            for p in ep.trainable:
                p -= reg.inner_lr * p.grad
    phi = {n: p.detach().clone() for n, p in ep.body.items()}
    names = list(ep.body)
    grads = torch.autograd.grad(meta.mean_loss(ep.model, query), [ep.body[n] for n in names], allow_unused=True)
    g = {n: (gr if gr is not None else torch.zeros_like(ep.body[n])) for n, gr in zip(names, grads)}
    return phi, g


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_one_meta_update_equals_its_formula_and_leaves_the_start_alone(episodes, tmp_path, algorithm):
    from tunesmith.flows.meta import meta_train
    from tunesmith.train.loop import MetricsLog

    ep, sampler = episodes
    reg = cfg(algorithm=algorithm, episodes=2, meta_batch=2, inner_steps=3, inner_lr=0.5, meta_lr=0.3)
    theta = ep.weights()
    kept = {n: t.clone() for n, t in theta.items()}
    out = meta_train(ep, reg, sampler, tmp_path, MetricsLog(tmp_path / "m.jsonl"), False, theta)
    assert all(torch.equal(theta[n], kept[n]) for n in theta), "the start was changed in place"
    (phi0, g0), (phi1, g1) = (_expected(ep, sampler.episode(i), kept, reg) for i in range(2))
    name = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(phi0[name], kept[name])  # the episode did adapt
    for n in theta:
        if algorithm == "reptile":
            want = kept[n] + 0.3 * ((phi0[n] + phi1[n]) / 2 - kept[n])
        else:
            want = kept[n] - 0.3 * (g0[n] + g1[n]) / 2
        assert torch.allclose(out[n], want, atol=1e-6), n
    # and on a weight that moves well above float rounding, the step taken divided by its size is the formula's
    # direction to 0.1%
    if algorithm == "reptile":
        taken, direction = (out[name] - kept[name]) / 0.3, (phi0[name] + phi1[name]) / 2 - kept[name]
    else:
        taken, direction = (kept[name] - out[name]) / 0.3, (g0[name] + g1[name]) / 2
    assert torch.allclose(taken, direction, rtol=1e-3, atol=1e-13)
    if algorithm == "fomaml":  # the gradient is the query gradient at the adapted weights, not at the start
        at_start = []
        for i in range(2):
            episode = sampler.episode(i)
            ep.load(kept)
            meta.init_head(ep.model, ep.batch("train", episode.support), 3, reg.head_init)
            at_start.append(meta.gradient(ep.model, ep.body, ep.batch("train", episode.query)))
        wrong = (at_start[0][name] + at_start[1][name]) / 2
        assert not torch.allclose(taken, wrong, rtol=1e-3, atol=1e-13)


def test_evaluation_never_writes_adapted_weights_into_the_start(episodes):
    from tunesmith.flows.meta import evaluate_start

    ep, sampler = episodes
    start = ep.weights()
    kept = {n: t.clone() for n, t in start.items()}
    reg = cfg(eval_episodes=3, inner_steps=2, inner_lr=0.1)
    first = evaluate_start(ep, start, sampler, reg, 2, "x")
    assert all(torch.equal(start[n], kept[n]) for n in start)
    assert evaluate_start(ep, start, sampler, reg, 2, "x") == first  # same episodes, same start: same scores


# --------------------------------------------------------------------------------------- the whole run


def meta_config(path, model, data, tuning="{kind: full}", extra=""):
    return write_config(path, f"""\
name: meta
model: {model}
data: {{train: {data}, max_length: 24}}
tuning: {tuning}
objective: {{kind: classify}}
regime: {{kind: meta, algorithm: reptile, ways: 3, shots: 2, queries: 4, inner_steps: 2, inner_lr: 0.1,
         meta_lr: 0.5, meta_batch: 2, episodes: 8, test_classes: 4, eval_episodes: 4, transfer_steps: 4,
         save_every: 2{extra}}}
train: {{batch_size: 16, lr: 3.0e-3, seed: 0}}
eval: {{forgetting: {{enabled: false}}}}
""")


@pytest.mark.parametrize("tuning", ["{kind: full}", "{kind: lora, r: 4, targets: [query, value]}"])
def test_meta_run_end_to_end(in_tmp, tiny_bert, topics_dir, tuning):
    from tunesmith.config import load_config
    from tunesmith.run import train

    summary = train(load_config(meta_config(in_tmp / "m.yaml", tiny_bert, topics_dir, tuning)))
    table = summary["meta"]
    classes = table["classes"]
    assert len(classes["meta_test"]) == 4 and not set(classes["meta_train"]) & set(classes["meta_test"])
    for start in ("meta", "base", "transfer"):
        res = table["eval"][start]["after"]
        assert res["episodes"] == 4 and res["low"] <= res["accuracy"] <= res["high"]
    assert summary["test"]["accuracy"] == table["eval"]["meta"]["after"]["accuracy"]
    assert summary["base"]["test"]["accuracy"] == table["eval"]["base"]["after"]["accuracy"]
    run = in_tmp / "runs" / "meta"
    assert json.loads((run / "status.json").read_text())["state"] == "completed"
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3, 4]
    # the transfer baseline trained on meta-train classes only: its head has one output per meta-train class
    transfer_cfg = json.loads((run / "manifest.json").read_text())
    assert transfer_cfg["model_kwargs"]["num_labels"] == 3


def test_meta_refuses_objectives_other_than_classify(in_tmp, tiny_bert, topics_dir):
    from tunesmith.config import load_config

    path = meta_config(in_tmp / "m.yaml", tiny_bert, topics_dir)
    with pytest.raises(ConfigError, match="meta learns N-way classification"):
        load_config(path, ["objective.kind=clm"])
