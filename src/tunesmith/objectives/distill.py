"""Knowledge distillation (Hinton et al., 2015): a student learns from a teacher's softened outputs and the labels.

    loss per unit = alpha * task loss + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
                    + hidden_weight * (1 - cos(student hidden, teacher hidden))          (DistilBERT's cosine term)

The cosine term compares the last hidden states (DistilBERT), or with `hidden_layers: matched` (classify, a
student built with keep_layers) every student block's output with the teacher's output after the blocks it
stands in for: student block j replaces teacher blocks keep[j] .. keep[j+1] - 1, so its output is matched with
the teacher's after block keep[j+1] - 1, the last one with the teacher's last (Sun et al. 2019, patient
knowledge distillation); the terms are averaged over the blocks.

T^2 keeps the soft term's gradients on the scale of the task term's as T grows (Hinton et al., sec. 2).
One code path serves every objective whose Config has a `distill:` field; the unit is what the objective
averages over: an example for classify (the class logits), a target token for clm and sft (the next-token
logits over the vocabulary; for sft only answer tokens are targets, so only they are distilled).

For causal LMs neither model's vocabulary-wide logits are formed for the whole batch: both models' last
hidden states are taken at the target tokens only, and their output layers run over chunks of them
(`chunk_tokens`, and the task's `loss_chunk`: the smaller); the task loss and the KL of each chunk are
checkpointed together, so the backward pass recomputes a chunk's logits and softmaxes instead of storing them
for every token (objectives/lm.py). With `loss_chunk: 0` the student's logits exist once, in full.

Augmented transfer set (classify, `augment.copies` > 0; Tang et al. 2019, TinyBERT's data augmentation): each
train example gets `copies` perturbed versions of its tokenized input, made deterministically from (train.seed,
row, copy): every token other than the tokenizer's special ones ([CLS], [SEP], ...) is, with probability
`mask_prob`, replaced by the mask token (dropped when the tokenizer has none); padding is added only later, by
collation. They have no label, so an augmented row's loss is the soft term alone, (1 - alpha) * T^2 * KL (no task
loss, no cosine term). They ride along in the batch of their original: a batch of B train examples is trained as
B originals + B * copies augmented rows, and the loss is the mean over all B * (1 + copies) rows. So the optimizer
takes exactly the steps it takes without augmentation (same batches, same seed), as the hard-label twin does.

This module never loads a model: the run layer builds the teacher (eval mode, no gradients, never saved with
the student) and hands it to `Distilled`, which wraps the task objective and exposes the same functions.
"""

from __future__ import annotations

import hashlib
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from ..data.collate import IGNORE_INDEX, collate
from ..errors import ConfigError
from ..schema import Section
from .common import Loss
from .lm import LOSS_CHUNK, causal_inputs, causal_lm_logits, chunked_losses, head_run, shifted_targets


METRICS = {"teacher_agreement": "max"}
"""What a distilled run reports besides its task's metrics: the share of units where the student's top-1
prediction is the teacher's."""


class AugmentConfig(Section):
    copies: int = Field(0, ge=0, le=32)
    """Perturbed copies of each train example, labelled by the teacher's soft outputs only, trained in the same batch
    as their original (0: no augmentation). Classify only."""
    mask_prob: float = Field(0.1, gt=0, le=1)
    """Chance that each non-special token of a copy is replaced by the tokenizer's mask token (dropped when it has
    none); [CLS], [SEP] and the other special tokens are kept, padding is never touched."""


class DistillConfig(Section):
    teacher: str
    """The model the student learns from: a finished run folder (runs/<name>), a model folder or sample:<name>.
    It must use the student's tokenizer (refused before any weights load otherwise)."""
    temperature: float = Field(2.0, gt=0)
    """T: both distributions are softened as softmax(logits / T); the KL term is scaled by T^2."""
    alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the task loss on the labels; 1 - alpha weighs the teacher's soft targets (1: no distillation)."""
    hidden_weight: float = Field(0.0, ge=0)
    """Weight of DistilBERT's cosine term between the student's and the teacher's last hidden states (0: off);
    needs equal hidden sizes (a student built with keep_layers has them)."""
    hidden_layers: Literal["last", "matched"] = "last"
    """Which hidden states the cosine term (hidden_weight > 0) compares. last: the last (DistilBERT). matched (classify,
    with keep_layers): each student block's output with the teacher's after the blocks it stands in for (PKD)."""
    keep_layers: Union[Literal["every_other"], list[int], None] = None
    """Build the student from the teacher, as DistilBERT was initialised: its embeddings, these blocks (in order)
    and its head. every_other keeps blocks 0, 2, 4, ...; a list names them (negative counts from the end).
    null: the student is `model:`."""
    cache: bool = False
    """Compute the teacher's outputs on train once, before training, cached on disk keyed by the data and the
    teacher's weights, instead of in every step (classify; saves a teacher forward pass per example per epoch)."""
    compare_hard_labels: bool = False
    """Also train the same student on the labels alone (same train section, same seed), into <run>/hard-labels,
    and put it in the teacher / student table."""
    augment: AugmentConfig = AugmentConfig()
    """Classify: an augmented transfer set of masked copies of the train examples that only the teacher labels (its
    soft targets: the KL term alone), added into each batch so the step count stays that of the hard-label twin."""
    chunk_tokens: int = Field(1024, ge=1)
    """Causal LMs: target tokens per chunk of the token-level KL (bounds the vocabulary-wide softmaxes held; the
    objective's loss_chunk, if smaller, bounds it too)."""


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over rows of KL(softmax(teacher / T) || softmax(student / T)) (not yet scaled by T^2)."""
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    s = (student_logits.float() / temperature).log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="sum")


class Teacher:
    """The teacher as the loss needs it: frozen, in eval mode, its outputs computed without gradients.

    model      the plain transformers model (with its head)
    head       `sequence-classification` or `causal-lm`
    from_hidden  causal LMs: its logits are its output layer applied to its body's last hidden states (checked by
               the run layer on a short input), so they can be computed at chosen tokens only
    cached     classify with `cache`: train examples' logits by their `teacher_row`
    cached_augmented  with `cache` and `augment`: augmented rows' logits, row * copies + copy
    """

    def __init__(self, model, head: str, from_hidden: bool = True, cached: torch.Tensor | None = None):
        self.model, self.head, self.from_hidden, self.cached = model, head, from_hidden, cached
        self.cached_augmented: torch.Tensor | None = None
        model.eval()
        model.requires_grad_(False)

    @torch.no_grad()
    def classify(self, batch, hidden: bool):
        """(logits, every layer's hidden states (embeddings first) or None) for a classification batch."""
        if self.cached is not None and "teacher_row" in batch and not hidden:
            return self.cached.to(batch["input_ids"].device)[batch["teacher_row"]], None
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=hidden)
        return out.logits.float(), (out.hidden_states if hidden else None)

    @torch.no_grad()
    def augmented(self, batch, keys: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of augmented rows (`keys`: row * copies + copy), from the cache when there is one."""
        if self.cached_augmented is not None:
            return self.cached_augmented.to(keys.device)[keys]
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    @torch.no_grad()
    def body(self, batch) -> torch.Tensor:
        """Last hidden states (batch, seq, hidden) of a causal LM batch (with `from_hidden`), else its logits."""
        if not self.from_hidden:
            return causal_lm_logits(self.model, batch)
        body = getattr(self.model, self.model.base_model_prefix)
        kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else \
            {"attention_mask": batch["attention_mask"]}
        return body(input_ids=batch["input_ids"], use_cache=False, **kwargs).last_hidden_state

    @torch.no_grad()
    def logits_at(self, states: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for rows of `body` output (hidden states, or already logits)."""
        if not self.from_hidden:
            return states.float()
        return self.model.get_output_embeddings()(states).float()


def _stream(seed: int, row: int, copy: int) -> int:
    """A generator seed of its own for each (seed, row, copy): the same copies whatever the batch order."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{row}/{copy}".encode()).digest()[:8], "little") & (2**63 - 1)


def augment_ids(ids: list[int], special: set[int], mask_id: int | None, mask_prob: float, seed: int, row: int,
                copy: int) -> list[int]:
    """One augmented copy of a tokenized (unpadded) input: each non-special token, with probability mask_prob, is
    replaced by mask_id, or dropped when mask_id is None."""
    draws = torch.rand(len(ids), generator=torch.Generator().manual_seed(_stream(seed, row, copy))).tolist()
    out = []
    for tok, u in zip(ids, draws):
        if tok in special or u >= mask_prob:
            out.append(tok)
        elif mask_id is not None:
            out.append(mask_id)
    return out


class Augmentation:
    """The augmented copies of the train examples, `ids[row][copy]`, made once, before training; the loss finds an
    example's copies by its `teacher_row`."""

    def __init__(self, cfg: AugmentConfig, examples: list[dict], tokenizer, seed: int):
        special = set(tokenizer.all_special_ids)
        self.copies, self.pad_id = cfg.copies, tokenizer.pad_token_id
        self.ids = [[augment_ids(ex["input_ids"], special, tokenizer.mask_token_id, cfg.mask_prob, seed, row, c)
                     for c in range(cfg.copies)] for row, ex in enumerate(examples)]

    def flat(self) -> list[dict]:
        """Every augmented row as an example, in key order (row * copies + copy)."""
        return [{"input_ids": ids} for copies in self.ids for ids in copies]

    def batch(self, rows: list[int], device) -> tuple[dict, torch.Tensor]:
        """The augmented rows of these train rows, collated, and their keys (row * copies + copy)."""
        keys = [r * self.copies + c for r in rows for c in range(self.copies)]
        batch = collate([{"input_ids": self.ids[r][c]} for r in rows for c in range(self.copies)], self.pad_id)
        return {k: v.to(device) for k, v in batch.items()}, torch.tensor(keys, device=device)


_AS_IS = torch.nn.Identity()
"""The "output layer" of rows that are already logits (the student's full logits, when it has no chunked path)."""


def _chunk_terms(head, rows, targets, teacher_rows, teacher: Teacher, temperature: float) -> torch.Tensor:
    """[summed cross-entropy, summed KL] of one chunk of target tokens; `head(rows)` are the student's logits."""
    logits = head(rows).float()
    return torch.stack([F.cross_entropy(logits, targets, reduction="sum"),
                        kl_sum(teacher.logits_at(teacher_rows), logits, temperature)])


def _cosine_sum(student_h: torch.Tensor, teacher_h: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1)).sum()


def _example_cosine_sum(student_h: torch.Tensor, teacher_h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over examples of the mean over each one's real tokens of 1 - cos(student, teacher)."""
    per_token = 1 - F.cosine_similarity(student_h.float(), teacher_h.float(), dim=-1)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()


def hidden_pairs(cfg: DistillConfig, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) indices into the models' hidden-state tuples (0: the embeddings) that the cosine term
    compares: the last with the last, or (matched) student block j's output with the teacher's after block
    keep[j + 1] - 1 (its last block for the student's last)."""
    if cfg.hidden_layers == "last" or cfg.keep_layers is None:
        return [(-1, -1)]
    keep = keep_indices(cfg.keep_layers, teacher_layers)
    return [(j + 1, keep[j + 1] if j + 1 < len(keep) else teacher_layers) for j in range(len(keep))]


class Distilled:
    """The task objective with the teacher's soft targets added to its loss; everything else is the task's.

    Exposes what the loop and evaluation use of an objective module (HEAD, METRICS, MAIN_METRIC, loss, eval_step,
    metrics, ...), delegating to the task module; evaluation adds `teacher_agreement`, the share of units where
    the student's top-1 prediction is the teacher's.
    """

    def __init__(self, task, teacher: Teacher, cfg: DistillConfig, augmentation: Augmentation | None = None):
        self.task, self.teacher, self.cfg, self.augmentation = task, teacher, cfg, augmentation
        self.pairs = hidden_pairs(cfg, getattr(teacher.model.config, "num_hidden_layers", 0) or 0)
        self.HEAD = task.HEAD
        self.METRICS = {**task.METRICS, **METRICS}
        self.MAIN_METRIC = task.MAIN_METRIC

    def __getattr__(self, name):  # prepare, predict, GENERATION_METRICS, ... are the task's own
        return getattr(self.task, name)

    def loss(self, model, batch, obj_cfg) -> Loss:
        cfg, hidden = self.cfg, self.cfg.hidden_weight > 0
        if self.HEAD == "sequence-classification":
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=hidden)
            logits = out.logits.float()
            task = F.cross_entropy(logits, batch["labels"], reduction="sum")
            count = batch["labels"].numel()
            if cfg.alpha == 1 and not hidden:
                return Loss(task, count, {"task_loss": float(task.detach()) / count})
            t_logits, t_hidden = self.teacher.classify(batch, hidden)
            soft = kl_sum(t_logits, logits, cfg.temperature)
            cos = None
            if hidden:
                mask = batch["attention_mask"].float()
                cos = sum(_example_cosine_sum(out.hidden_states[s], t_hidden[t], mask) for s, t in self.pairs) \
                    / len(self.pairs)
            labelled = count
            if self.augmentation is not None and "teacher_row" in batch:  # train batches only
                extra, n_extra = self._augmented_kl(model, batch["teacher_row"])
                soft, count = soft + extra, count + n_extra  # the loop divides by count: the mean over all rows
        else:
            task, soft, cos, count = self._token_terms(model, batch, obj_cfg, hidden)
            if soft is None:
                return Loss(task, count, {"task_loss": float(task.detach()) / max(1, int(count))})
            labelled = count
        total = cfg.alpha * task + (1 - cfg.alpha) * cfg.temperature ** 2 * soft
        n, n_labelled = max(1, int(count)), max(1, int(labelled))
        metrics = {"task_loss": float(task.detach()) / n_labelled, "kd_loss": float(soft.detach()) / n}
        if cos is not None:
            total = total + cfg.hidden_weight * cos
            metrics["cosine_loss"] = float(cos.detach()) / n_labelled
        return Loss(total, count, metrics)

    def _augmented_kl(self, model, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed KL, row count) over the augmented copies of these train rows: their only loss term."""
        aug_batch, keys = self.augmentation.batch(rows.tolist(), rows.device)
        logits = model(input_ids=aug_batch["input_ids"], attention_mask=aug_batch["attention_mask"]).logits.float()
        return kl_sum(self.teacher.augmented(aug_batch, keys), logits, self.cfg.temperature), len(keys)

    def _student_rows(self, model, batch, obj_cfg, mask, hidden: bool = False):
        """(model output, output layer, the student's rows at the target tokens `mask`, tokens per chunk): rows
        are last hidden states on the chunked path, else logits (and the layer the identity)."""
        chunk = getattr(obj_cfg, "loss_chunk", LOSS_CHUNK)
        inputs = {**causal_inputs(batch), **({"output_hidden_states": True} if hidden else {})}
        run = head_run(model, inputs) if chunk > 0 else None
        if run is not None:
            return run.out, run.head, run.hidden[mask], min(chunk, self.cfg.chunk_tokens)
        out = model(**inputs)
        return out, _AS_IS, out.logits[mask], self.cfg.chunk_tokens

    def _token_terms(self, model, batch, obj_cfg, hidden: bool):
        """(summed task loss, summed KL or None when alpha is 1, summed cosine term or None, target count) over
        the target tokens, chunk by chunk, each chunk checkpointed."""
        cfg = self.cfg
        targets = shifted_targets(batch["labels"])  # position t predicts label t + 1
        mask = targets != IGNORE_INDEX
        out, head, rows, size = self._student_rows(model, batch, obj_cfg, mask, hidden)
        y = targets[mask]
        if cfg.alpha == 1 and not hidden:
            return chunked_losses(head, rows, y, size).sum(), None, None, mask.sum()
        states = self.teacher.body(batch)[mask]
        terms = rows.new_zeros(2, dtype=torch.float32)
        for s in range(0, len(y), size):
            part = (head, rows[s:s + size], y[s:s + size], states[s:s + size], self.teacher, cfg.temperature)
            terms = terms + (checkpoint(_chunk_terms, *part, use_reentrant=False) if torch.is_grad_enabled()
                             else _chunk_terms(*part))
        cos = _cosine_sum(out.hidden_states[-1][mask], states) if hidden else None
        return terms[0], terms[1], cos, mask.sum()

    @torch.no_grad()
    def eval_step(self, model, batch, obj_cfg) -> dict[str, list]:
        step = self.task.eval_step(model, batch, obj_cfg)
        if self.HEAD == "sequence-classification":
            t_logits, _ = self.teacher.classify({k: v for k, v in batch.items() if k != "teacher_row"}, False)
            step["agree"] = (torch.tensor(step["pred"], device=t_logits.device) == t_logits.argmax(-1)).int().tolist()
            return step
        mask = shifted_targets(batch["labels"]) != IGNORE_INDEX
        _, head, rows, size = self._student_rows(model, batch, obj_cfg, mask)
        b = mask.nonzero(as_tuple=True)[0]
        states = self.teacher.body(batch)[mask]
        student_top = torch.cat([head(rows[s:s + size]).argmax(-1) for s in range(0, len(b), size)]) if len(b) \
            else b
        teacher_top = torch.cat([self.teacher.logits_at(states[s:s + size]).argmax(-1)
                                 for s in range(0, len(b), size)]) if len(b) else b
        same = (student_top == teacher_top).int()
        step["agree"] = [int(same[b == i].sum()) for i in range(batch["input_ids"].size(0))]
        return step

    def metrics(self, outputs: dict[str, list], obj_cfg) -> dict[str, float]:
        agree = outputs.pop("agree", [])
        scores = self.task.metrics(outputs, obj_cfg)
        units = outputs.get("tokens") or [1] * len(agree)  # token objectives count agreements per example
        scores["teacher_agreement"] = sum(agree) / max(1, sum(units))
        return scores


def keep_indices(keep: Union[str, list[int]], n_layers: int) -> list[int]:
    """The teacher's block indices a student keeps (`every_other` or a list, negatives from the end)."""
    if keep == "every_other":
        return list(range(0, n_layers, 2))
    out = []
    for i in keep:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ConfigError(f"block {i} does not exist: the teacher has {n_layers} blocks (0 to {n_layers - 1})",
                              where="objective.distill.keep_layers")
        out.append(j)
    if len(set(out)) != len(out) or not out:
        raise ConfigError(f"keep_layers {keep} must name distinct blocks, at least one",
                          where="objective.distill.keep_layers")
    return out
