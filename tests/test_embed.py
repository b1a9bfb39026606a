"""Embedding fine-tuning (objective embed): the in-batch-negative loss against its formula, the retrieval
metrics on a hand-made ranking, a tiny run that improves retrieval over its base, its artifact read back as a
plain transformers encoder, `tunesmith eval` and `plan` on it, and bad rows."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tunesmith.cli import main
from tiny import embed_config, write_jsonl


def _softmax_nll(scores: list[float], gold: int) -> float:
    return -scores[gold] + math.log(sum(math.exp(s) for s in scores))


def _cos(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


@pytest.mark.parametrize("negatives", [False, True])
def test_ranking_loss_is_the_in_batch_softmax_over_scaled_cosines(negatives):
    """Multiple-negatives ranking loss (Henderson et al. 2017, sentence-transformers' MNRL): for anchor i,
    -log softmax over j of scale cos(a_i, c_j) at c_i, the candidates being every positive then every negative."""
    from tunesmith.objectives.embed import ranking_losses

    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(3, 5, generator=g) for _ in range(3))
    scale = 20.0
    cands = [*p.tolist(), *(n.tolist() if negatives else [])]
    want = [_softmax_nll([scale * _cos(ai, c) for c in cands], i) for i, ai in enumerate(a.tolist())]
    got = ranking_losses(a, p, n if negatives else None, scale)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-5)


def test_retrieval_metrics_on_a_hand_made_ranking():
    from tunesmith.objectives.embed import ranking_metrics, ranks

    # anchor 0 finds its positive first; anchor 1 ranks positive 0 above its own; anchor 2 is last of 3
    anchors = torch.tensor([[1.0, 0.0], [0.95, 0.3], [0.0, 1.0]])
    corpus = torch.tensor([[1.0, 0.05], [0.6, 0.8], [-1.0, 0.0]])
    assert ranks(anchors, corpus) == [1, 2, 3]
    out = ranking_metrics([1, 2, 3, 12])
    assert out["recall@1"] == 0.25 and out["recall@10"] == 0.75
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 12) / 4)
    assert out["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4)
    # a model that cannot tell texts apart is not credited: ties go to the earlier text
    same = torch.ones(4, 2)
    assert ranks(same, same) == [1, 2, 3, 4]


def test_embed_run_improves_retrieval_and_reloads_as_a_plain_encoder(tiny_bert, embed_dir, in_tmp, capsys):
    from transformers import AutoModel, AutoTokenizer

    from tunesmith.objectives.embed import embed

    cfg = embed_config(in_tmp / "c.yaml", tiny_bert, embed_dir)
    assert main(["train", str(cfg)]) == 0
    run = in_tmp / "runs" / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    for key in ("recall@1", "recall@10", "mrr", "ndcg@10", "loss"):
        assert key in summary["test"] and key in summary["base"]["test"]
    assert summary["test"]["mrr"] > summary["base"]["test"]["mrr"] + 0.05

    # the artifact is a plain encoder: AutoModel reads it, and pooled as trained it gives the run's embeddings
    from tunesmith.trained import load_trained

    trained = load_trained(run)
    plain = AutoModel.from_pretrained(run / "model").eval()
    tok = AutoTokenizer.from_pretrained(run / "model")
    batch = tok(["the movie was good fun", "a dull plot"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = embed(trained.model.eval(), batch["input_ids"], batch["attention_mask"])
        theirs = embed(plain, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)

    # `tunesmith eval` repeats the run's test scores through the usual path
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(embed_dir / "test.jsonl")]) == 0
    scores = json.loads(capsys.readouterr().out)
    for key in ("recall@1", "mrr", "ndcg@10"):
        assert scores[key] == pytest.approx(summary["test"][key], abs=1e-6), key


def test_lora_embed_run_merges_into_a_plain_encoder(tiny_bert, embed_dir, in_tmp):
    from transformers import AutoModel

    cfg = embed_config(in_tmp / "c.yaml", tiny_bert, embed_dir, "{kind: lora, r: 4, targets: all-linear}",
                       extra="train: {epochs: 1, batch_size: 16, lr: 1.0e-2, eval_every: epoch, seed: 0}\n")
    cfg.write_text(cfg.read_text().replace(cfg.read_text().split("\n")[5] + "\n", ""))
    assert main(["train", str(cfg)]) == 0
    run = in_tmp / "runs" / "tiny"
    assert (run / "adapter").is_dir()
    assert main(["export", str(run), "--format", "merged"]) == 0
    report = json.loads((run / "export" / "export-merged.json").read_text())
    assert report["written"]["max_abs_logit_diff"] < 1e-4  # the merged folder's hidden states are the run's
    merged = AutoModel.from_pretrained(run / "export" / "merged")
    assert type(merged).__name__ == "BertModel"


def test_plan_counts_an_embed_run(tiny_bert, embed_dir, in_tmp):
    from tunesmith.config import load_config
    from tunesmith.plan import plan

    cfg = embed_config(in_tmp / "c.yaml", tiny_bert, embed_dir, "{kind: lora, r: 4, targets: all-linear}")
    # LoRA on the 6 linears of each of 2 blocks (4 of 32 -> 32, 32 -> 64 and 64 -> 32); no pooler, no head
    assert plan(load_config(cfg))["trainable"] == 2 * (4 * 4 * (32 + 32) + 4 * (32 + 64) * 2)


def test_bad_embed_row_names_file_and_line(tiny_bert, in_tmp, capsys):
    rows = [{"anchor": "good fun", "positive": "fun and good"}] * 5 + [{"anchor": "dull", "positive": 3}]
    data = write_jsonl(in_tmp / "pairs.jsonl", rows * 4)
    cfg = embed_config(in_tmp / "c.yaml", tiny_bert, data)
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "pairs.jsonl:6" in err and "positive is not a non-empty string" in err and "Traceback" not in err
