"""The forgetting probe: general-domain held-out text, scored by the model before and after training.

What is measured depends on the head, not on the objective, so every objective gets a probe:
  causal-lm                perplexity of the text (next-token loss over every token)
  masked-lm                perplexity of a fixed, seeded 15% of the tokens, masked
  sequence-classification  drift of the body's representation of the text: per layer, 1 - linear CKA
                           (Kornblith et al., 2019) between the mean-pooled hidden states of the starting
                           and the tuned model (0: the same geometry; grows as features change), and its
                           mean over layers (fine-tuning reshapes the top layers most, the lower ones little)
  encoder                  the same drift (an embedding model's body)

A language model's probe reports the relative perplexity increase and warns above
`eval.forgetting.max_increase`; a classifier's reports the drift and warns when its mean over layers
exceeds `max_drift`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.collate import collate
from ..data.batches import eval_batches


@dataclass
class Probe:
    """Tokenized probe text for one head."""

    examples: list[dict]
    head: str
    sources: list[str]
    tokens: int


def load_probe(cfg, tokenizer, head: str) -> Probe | None:
    """Read and tokenize the probe text of `cfg` (eval.forgetting); None when the probe is off."""
    if not cfg.enabled:
        return None
    from ..data.general import lm_examples, read_rows, texts_of

    part = read_rows(cfg.data, cfg.split, where="eval.forgetting.data", max_rows=cfg.max_rows)
    examples = lm_examples(tokenizer, texts_of(part, "eval.forgetting.data"), cfg.max_length, head)
    return Probe(examples, head, list(cfg.data), sum(len(e["input_ids"]) for e in examples))


REPRESENTATION_HEADS = ("sequence-classification", "encoder")
"""Heads probed by the drift of their body's representation (they have no language-model loss)."""


@torch.no_grad()
def measure(model, probe: Probe, pad_id: int, batch_size: int, device) -> dict:
    """Loss and perplexity on the probe (LM heads), or the pooled representations (classifiers)."""
    from ..objectives.lm import lm_losses

    was_training = model.training
    model.eval()
    # eval.forgetting.max_length may exceed what the model can read (models with 128 or 256 positions)
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or None
    examples = [{k: v[:limit] if isinstance(v, list) else v for k, v in e.items()} for e in probe.examples]
    order = [i for b in eval_batches([len(e["input_ids"]) for e in examples], batch_size) for i in b]
    loss_sum, count, features = 0.0, 0, [None] * len(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        if probe.head in REPRESENTATION_HEADS:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in out.hidden_states], 1)
            for i, row in zip(idx, pooled.cpu()):  # (layers, hidden) per text
                features[i] = row
        else:
            sums, counts = lm_losses(model, batch, probe.head)
            loss_sum += float(sums.sum())
            count += int(counts.sum())
    model.train(was_training)
    if probe.head in REPRESENTATION_HEADS:
        return {"features": torch.stack(features)}  # (texts, layers, hidden)
    from .metrics import perplexity

    mean = loss_sum / max(count, 1)
    return {"loss": mean, "perplexity": perplexity(mean)}


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centred kernel alignment of two representations of the same n examples (n x d each)."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp(min=1e-12))


def compare(before: dict, after: dict, cfg, probe: Probe, run_cfg=None) -> dict:
    """The probe's delta between the starting and the tuned model, with a warning past the threshold and the
    changes to try, made from the run's config `run_cfg` (`advice.forgetting`)."""
    where = f"{', '.join(probe.sources)} ({cfg.split}, {len(probe.examples)} texts, {probe.tokens:,d} tokens)"
    if probe.head in REPRESENTATION_HEADS:
        a, b = before["features"], after["features"]
        layers = [1 - linear_cka(a[:, k], b[:, k]) for k in range(a.shape[1])]
        drift = sum(layers) / len(layers)
        cosine = float(torch.nn.functional.cosine_similarity(a[:, -1], b[:, -1], dim=-1).mean())
        out = {"measure": "representation drift (1 - linear CKA), mean over layers", "probe": where,
               "drift": round(drift, 4), "drift_last_layer": round(layers[-1], 4),
               "per_layer": [round(d, 4) for d in layers], "mean_cosine_last_layer": round(cosine, 4),
               "threshold": cfg.max_drift, "warning": drift > cfg.max_drift}
        text = (f"representation drift on general text {drift:.3f} (mean over {len(layers)} layers; last layer "
                f"{layers[-1]:.3f})")
        limit = f"above eval.forgetting.max_drift={cfg.max_drift}"
    else:
        rel = after["perplexity"] / before["perplexity"] - 1
        out = {"measure": "perplexity", "probe": where, "before": round(before["perplexity"], 4),
               "after": round(after["perplexity"], 4), "delta": round(after["perplexity"] - before["perplexity"], 4),
               "relative": round(rel, 4), "loss_before": round(before["loss"], 5), "loss_after": round(after["loss"], 5),
               "threshold": cfg.max_increase, "warning": rel > cfg.max_increase}
        text = (f"general-text perplexity {before['perplexity']:.2f} -> {after['perplexity']:.2f} "
                f"({rel:+.1%})")
        limit = f"above eval.forgetting.max_increase={cfg.max_increase:.0%}"
    if out["warning"]:
        text += f", {limit}: the model is forgetting general knowledge"
        if run_cfg is not None:
            from . import advice

            changes = advice.forgetting(run_cfg)
            out["advice"] = advice.as_dicts(changes)
            text += f"; consider: {advice.render(changes)}" if changes else ""
    out["message"] = text
    return out
