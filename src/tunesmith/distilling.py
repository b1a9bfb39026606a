"""The run layer's side of knowledge distillation (`objective.distill`): find, check and load the teacher, build
the student from its layers, cache its outputs, and put teacher and student side by side after training.

The loss itself is objectives/distill.py; it receives the teacher built here. In the flow of run.py:

  student_config  keep_layers: model.name becomes the student's folder (built later), the tokenizer the teacher's
  check           before any weights load: same tokenizer (vocabularies named when not), same head, same labels,
                  equal hidden sizes for the cosine term
  build_student   keep_layers: the teacher's embeddings, chosen blocks and head, saved once under the cache
  load_teacher    the teacher in eval mode, frozen, on the run's device (its adapter merged if it has one)
  augmentation    `augment.copies`: masked copies of the train examples, made once (objectives/distill.py)
  cache_outputs   `cache: true`: the teacher's logits on train (and its augmented copies), computed once, stored
                  keyed by data + teacher
  side_by_side    test metric, parameters, size on disk and inference examples/s of both, measured in this run
  hard_label_run  `compare_hard_labels`: the same student trained on the labels alone, into <run>/hard-labels

The teacher is never saved with the student: only the student's weights go into the run folder.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch

from . import artifacts
from .cache import home, sha256
from .errors import ConfigError, TunesmithError

HARD = "hard-labels"


def settings(cfg):
    """The run's distillation settings, or None."""
    return getattr(cfg.objective, "distill", None)


# ---------------------------------------------------------------------------------------------
# Where the teacher is, before anything is loaded


def _is_run(path: Path) -> bool:
    return (path / artifacts.CONFIG).exists()


def teacher_files(ref: str) -> Path:
    """The folder holding the teacher's tokenizer and config or adapter (reads no weights)."""
    from .models.load import resolve

    path = Path(ref).expanduser()
    if _is_run(path):
        if not artifacts.is_finished(path):
            raise ConfigError(f"{path} is not a finished run (no {artifacts.SUMMARY})", where="objective.distill.teacher",
                              hint="train the teacher first (see the example's header)")
        return path / artifacts.read_json(path / artifacts.SUMMARY)["weights"]
    try:
        return Path(resolve(ref))
    except TunesmithError as e:
        raise ConfigError(e.message, where="objective.distill.teacher", hint=e.hint) from None


def teacher_config(ref: str):
    """The teacher's transformers config, with its head's label mapping (reads no weights)."""
    from transformers import AutoConfig

    path = Path(ref).expanduser()
    if _is_run(path):
        import yaml

        run_cfg = yaml.safe_load((path / artifacts.CONFIG).read_text())
        kwargs = artifacts.read_json(path / artifacts.MANIFEST)["model_kwargs"]
        files = teacher_files(ref)
        source = files if (files / "config.json").exists() else _base_of(run_cfg)
        return AutoConfig.from_pretrained(source, **({} if (files / "config.json").exists() else kwargs))
    return AutoConfig.from_pretrained(teacher_files(ref))


def _base_of(run_cfg: dict) -> str:
    from .models.load import resolve

    return resolve(run_cfg["model"]["name"])


def teacher_head(ref: str) -> str:
    from .objectives import OBJECTIVES
    from .trained import _head_of

    path = Path(ref).expanduser()
    if _is_run(path):
        import yaml

        return OBJECTIVES[yaml.safe_load((path / artifacts.CONFIG).read_text())["objective"]["kind"]].HEAD
    return _head_of(teacher_files(ref))


def fingerprint(ref: str) -> str:
    """sha256 over the teacher's weight files and config (of the run folder's weights, for a run)."""
    folder = teacher_files(ref)
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"):
            h.update(f.name.encode())
            h.update(sha256(f).encode())
    if _is_run(Path(ref).expanduser()):
        h.update((Path(ref).expanduser() / artifacts.CONFIG).read_bytes())
    return h.hexdigest()


def student_config(cfg):
    """With keep_layers: the student is the folder `build_student` fills (model.name), tokenized as the teacher."""
    d = settings(cfg)
    if d is None or d.keep_layers is None:
        return cfg
    layers = "every_other" if d.keep_layers == "every_other" else "-".join(map(str, d.keep_layers))
    folder = home() / "students" / f"{fingerprint(d.teacher)[:16]}-{layers}"
    model = cfg.model.model_copy(update={"name": str(folder), "tokenizer": str(teacher_files(d.teacher))})
    return cfg.model_copy(update={"model": model})


# ---------------------------------------------------------------------------------------------
# Checks before any weights load


def _vocabulary(tokenizer) -> str:
    return f"{len(tokenizer):,d} tokens ({type(tokenizer).__name__})"


def check(cfg, tokenizer, prepared, head: str) -> None:
    """Everything about the teacher that can be wrong, from configs and tokenizers alone."""
    from transformers import AutoTokenizer

    d = settings(cfg)
    if d is None:
        return
    where = "objective.distill.teacher"
    files = teacher_files(d.teacher)
    t_head = teacher_head(d.teacher)
    if t_head != head:
        raise ConfigError(f"the teacher {d.teacher} is a {t_head} model and the student trains a {head} head; "
                          "a teacher must produce the outputs the student learns", where=where)
    try:
        t_tok = AutoTokenizer.from_pretrained(files)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the teacher's tokenizer from {files}: {e}", where=where) from None
    if t_tok.get_vocab() != tokenizer.get_vocab():
        student = cfg.model.tokenizer or cfg.model.name
        raise ConfigError(
            f"the teacher and the student do not share a tokenizer: teacher {d.teacher} has a vocabulary of "
            f"{_vocabulary(t_tok)}; student {student} has {_vocabulary(tokenizer)}. Distillation compares their "
            "outputs token by token (and class by class on the same token ids)", where=where,
            hint="pick a student of the teacher's family, or build it from the teacher: objective.distill.keep_layers")
    t_config = teacher_config(d.teacher)
    if head == "sequence-classification":
        theirs = [t_config.id2label[i] for i in range(len(t_config.id2label))]
        ours = [prepared.model_kwargs["id2label"][i] for i in range(len(prepared.model_kwargs["id2label"]))]
        if [str(x) for x in theirs] != [str(x) for x in ours]:
            raise ConfigError(f"the teacher's labels {theirs} are not the student's {ours}", where=where,
                              hint="set objective.labels to the teacher's label order, or train the teacher on this data")
    if d.hidden_weight > 0 and d.keep_layers is None:
        from .models.load import build_config, resolve

        s_config = build_config(cfg.model, {}, resolve(cfg.model.name))
        if s_config.hidden_size != t_config.hidden_size:
            raise ConfigError(f"hidden_weight compares hidden states, and the teacher's are {t_config.hidden_size} wide, "
                              f"the student's {s_config.hidden_size}", where="objective.distill.hidden_weight",
                              hint="set hidden_weight: 0, or build the student with keep_layers")
    if d.hidden_layers == "matched" and (d.keep_layers is None or head != "sequence-classification"):
        raise ConfigError("hidden_layers: matched pairs each student block with the teacher blocks it was built to "
                          "replace, so it needs a classify student built with keep_layers",
                          where="objective.distill.hidden_layers", hint="use hidden_layers: last")
    if d.cache and head != "sequence-classification":
        raise ConfigError("cache stores the teacher's class logits per example; for a language model that would be "
                          "every token's vocabulary-wide logits", where="objective.distill.cache",
                          hint="set cache: false (the teacher then runs with the student, chunk by chunk)")
    if d.cache and d.hidden_weight > 0:
        raise ConfigError("cache stores logits, not the hidden states the cosine term needs",
                          where="objective.distill.cache", hint="set cache: false or hidden_weight: 0")
    if d.augment.copies and head != "sequence-classification":
        raise ConfigError("augment makes masked copies of classification examples for the teacher to label; it is not "
                          "available for a language model's token-level distillation",
                          where="objective.distill.augment", hint="remove augment (or set augment.copies: 0)")
    if d.augment.copies and d.alpha == 1:
        raise ConfigError("augmented rows are learned from the teacher's soft targets alone, and alpha: 1 gives those "
                          "no weight", where="objective.distill.augment", hint="set alpha below 1, or remove augment")


# ---------------------------------------------------------------------------------------------
# Loading


def teacher_folder(ref: str) -> Path:
    """A plain model folder of the teacher: its weights, or for an adapter run its adapter merged (once)."""
    path = Path(ref).expanduser()
    if _is_run(path):
        from .stages import policy_folder

        return policy_folder(path)
    return teacher_files(ref)


def build_student(cfg, head: str, model_kwargs: dict) -> None:
    """keep_layers: write the student (teacher's embeddings, chosen blocks, head) to model.name, once."""
    d = settings(cfg)
    if d is None or d.keep_layers is None:
        return
    out = Path(cfg.model.name)
    if (out / "config.json").exists():
        return
    from transformers import AutoTokenizer

    from .models.load import head_class, quiet_transformers
    from .models.student import keep_blocks, layer_count
    from .objectives.distill import keep_indices

    source = teacher_folder(d.teacher)
    with quiet_transformers():
        teacher = head_class(head).from_pretrained(source, dtype=torch.float32)
    keep = keep_indices(d.keep_layers, layer_count(teacher.config))
    student = keep_blocks(teacher, keep)
    tmp = out.with_name(out.name + ".tmp")
    with quiet_transformers():
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher_files(d.teacher)).save_pretrained(tmp)
    (tmp / "student.json").write_text(json.dumps({"teacher": d.teacher, "keep_layers": keep}, indent=1))
    tmp.rename(out)
    print(f"student: blocks {keep} of the teacher's {layer_count(teacher.config)}, saved to {out}")


def load_teacher(cfg, head: str, device, dtype):
    """The teacher, frozen and in eval mode, for `objectives.distill.Distilled`."""
    from .models.load import head_class, quiet_transformers
    from .objectives.distill import Teacher

    with quiet_transformers():
        model = head_class(head).from_pretrained(teacher_folder(settings(cfg).teacher), dtype=dtype).to(device)
    model.eval()
    return Teacher(model, head, from_hidden=head == "causal-lm" and _logits_from_hidden(model))


@torch.no_grad()
def _logits_from_hidden(model) -> bool:
    """Does the output layer over the body's last hidden states give the model's logits (no softcapping, no
    scaling)? Then the teacher's logits can be computed at target tokens only."""
    body, out = getattr(model, model.base_model_prefix, None), model.get_output_embeddings()
    if body is None or out is None:
        return False
    device = next(model.parameters()).device
    ids = torch.arange(1, 7, device=device).unsqueeze(0)
    full = model(input_ids=ids, use_cache=False).logits.float()
    mine = out(body(input_ids=ids, use_cache=False).last_hidden_state).float()
    return bool(torch.allclose(full, mine, atol=1e-3, rtol=1e-3))


def augmentation(cfg, train_examples: list[dict], tokenizer):
    """`augment.copies`: the augmented copies of the train examples, and each example's `teacher_row` (how the loss
    finds its copies); None without augmentation."""
    from .objectives.distill import Augmentation

    d = settings(cfg)
    if d is None or not d.augment.copies:
        return None
    for i, ex in enumerate(train_examples):
        ex["teacher_row"] = i
    return Augmentation(d.augment, train_examples, tokenizer, cfg.train.seed)


def _logits(teacher, examples: list[dict], batch_size: int, pad_id: int, device) -> torch.Tensor:
    """The teacher's logits for these examples, in their order, batched by length."""
    from .data.batches import eval_batches
    from .data.collate import collate

    logits = None
    for idx in eval_batches([len(e["input_ids"]) for e in examples], batch_size):
        batch = {k: v.to(device) for k, v in collate([{"input_ids": examples[i]["input_ids"]} for i in idx],
                                                      pad_id).items()}
        out = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float().cpu()
        if logits is None:
            logits = torch.empty(len(examples), out.size(-1))
        logits[idx] = out
    return logits


def cache_outputs(cfg, teacher, train_examples: list[dict], batch_size: int, pad_id: int, device,
                  augmented=None) -> dict:
    """`cache: true`: the teacher's logits for every train example (and every augmented copy), from disk when this
    data and teacher were seen before; each example gets its row (`teacher_row`). Returns what happened, for the
    summary."""
    from safetensors.torch import load_file, save_file

    d = settings(cfg)
    extra = augmented.flat() if augmented is not None else []
    h = hashlib.sha256(fingerprint(d.teacher).encode())
    for ex in train_examples:
        h.update(json.dumps(ex["input_ids"]).encode())
    if extra:  # the copies themselves are hashed: seed, copies and mask_prob all change them
        h.update(b"augmented")
        for ex in extra:
            h.update(json.dumps(ex["input_ids"]).encode())
    path = home() / "teacher-outputs" / f"{h.hexdigest()[:32]}.safetensors"
    tick = time.perf_counter()
    if path.exists():
        tensors, hit = load_file(path), True
    else:
        tensors = {"logits": _logits(teacher, train_examples, batch_size, pad_id, device)}
        if extra:
            tensors["augmented"] = _logits(teacher, extra, batch_size, pad_id, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        tmp.replace(path)
        hit = False
    for i, ex in enumerate(train_examples):
        ex["teacher_row"] = i
    teacher.cached, teacher.cached_augmented = tensors["logits"], tensors.get("augmented")
    return {"file": str(path), "hit": hit, "seconds": round(time.perf_counter() - tick, 2), "rows": len(train_examples),
            "augmented_rows": len(extra)}


# ---------------------------------------------------------------------------------------------
# After training: teacher and student side by side


def folder_mb(*folders: Path) -> float:
    """Size of the weight files in these folders (tokenizer files are the same for both)."""
    total = sum(f.stat().st_size for folder in folders for f in folder.rglob("*")
                if f.is_file() and f.suffix in (".safetensors", ".bin"))
    return round(total / 2**20, 2)


SPEED_ROUNDS = 3
"""Each model's inference speed is its best of this many passes over the test split, the models taking turns: one
pass of a few seconds on a shared machine is too noisy to compare."""


@torch.no_grad()
def speeds(models: dict, examples: list[dict], batch_size: int, pad_id: int, device) -> dict[str, float]:
    """Examples/s of each model's forward pass over `examples` (batched and padded as evaluation does), the best of
    SPEED_ROUNDS passes, the models in turn in each round."""
    from .data.batches import eval_batches
    from .data.collate import collate

    batches = [{k: v.to(device) for k, v in collate([{"input_ids": examples[i]["input_ids"]} for i in idx],
                                                      pad_id).items()}
               for idx in eval_batches([len(e["input_ids"]) for e in examples], batch_size)]
    best = {name: float("inf") for name in models}
    for _ in range(SPEED_ROUNDS):
        for name, model in models.items():
            tick = time.perf_counter()
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            best[name] = min(best[name], time.perf_counter() - tick)
    return {name: round(len(examples) / max(t, 1e-9), 1) for name, t in best.items()}


def side_by_side(cfg, teacher, task, model, examples: list[dict], batch_size: int, pad_id: int, accelerator,
                 run_dir: Path, hard: dict | None) -> dict:
    """Test metrics of teacher and student on the same split, their sizes, and their inference speed (`speeds`:
    the same batches for each, the models timed in turn, in this process)."""
    from .evaluate.score import evaluate
    from .models.params import count_parameters
    from .objectives.distill import Distilled

    d = settings(cfg)
    with_teacher = Distilled(task, teacher, d)

    def scores(m, name):
        out = evaluate(m, task, cfg.objective, examples, batch_size, pad_id, accelerator, f"{name} test")
        if m is not teacher.model:
            out["teacher_agreement"] = evaluate(m, with_teacher, cfg.objective, examples, batch_size, pad_id,
                                                accelerator, "agreement")["teacher_agreement"]
        return out

    t_scores, s_scores = scores(teacher.model, "teacher"), scores(model, "student")
    timed = {"teacher": teacher.model, "student": model}
    if hard is not None:  # the hard-label student, reloaded from its run, measured the same way
        from .trained import load_trained

        timed["hard"] = load_trained(run_dir / HARD).model.to(next(model.parameters()).device).eval()
        hard = {**hard, "test": scores(timed["hard"], "hard-label student")}
    was_training = model.training
    model.eval()
    speed = speeds(timed, examples, batch_size, pad_id, next(model.parameters()).device)
    model.train(was_training)
    t_speed, s_speed = speed["teacher"], speed["student"]
    if hard is not None:
        hard["examples_per_s"] = speed["hard"]
    timed.clear()
    out = {
        "teacher": {"source": d.teacher, "test": t_scores, "params": count_parameters(teacher.model)[1],
                    "size_mb": folder_mb(teacher_folder(d.teacher)), "examples_per_s": t_speed},
        "student": {"source": cfg.model.name, "test": s_scores, "params": count_parameters(model)[1],
                    "examples_per_s": s_speed},
        "speedup": round(s_speed / max(t_speed, 1e-9), 2),
        "settings": {"temperature": d.temperature, "alpha": d.alpha, "hidden_weight": d.hidden_weight,
                     "hidden_layers": d.hidden_layers, "keep_layers": d.keep_layers,
                     "augment": d.augment.model_dump()},
    }
    main = task.MAIN_METRIC
    if main in t_scores and t_scores[main]:
        out["student_vs_teacher"] = round(s_scores[main] / t_scores[main], 4)
    if hard is not None:
        out["hard_labels"] = hard
    return out


def _weight_folders(cfg, weights: Path) -> list[Path]:
    """What a model needs on disk: its weights folder, and for an adapter the base it goes on."""
    from .models.load import resolve

    return [weights] + ([Path(resolve(cfg.model.name))] if weights.name == "adapter" else [])


def with_sizes(report: dict, cfg, run_dir: Path, weights: str) -> dict:
    """The student's size on disk, once its weights are saved: the weights folder, plus its base for an adapter."""
    report["student"]["size_mb"] = folder_mb(*_weight_folders(cfg, run_dir / weights))
    return report


def print_table(report: dict, main: str) -> None:
    rows = [("teacher", report["teacher"]), ("student (distilled)", report["student"])]
    if "hard_labels" in report:
        rows.append(("student (hard labels)", report["hard_labels"]))
    print(f"\n{'':<24}{'test ' + main:>14}{'agreement':>11}{'params':>14}{'size MB':>10}{'examples/s':>12}")
    for name, r in rows:
        test = r.get("test") or {}
        metric, agree, speed = test.get(main), test.get("teacher_agreement"), r.get("examples_per_s")
        print(f"{name:<24}{(f'{metric:.4f}' if metric is not None else '-'):>14}"
              f"{(f'{agree:.4f}' if agree is not None else '-'):>11}{r.get('params', 0):>14,d}"
              f"{r.get('size_mb', 0):>10.1f}{(f'{speed:.1f}' if speed else '-'):>12}")
    print("(agreement: share of test units where the model's top-1 prediction is the teacher's)")
    print(f"student speed-up over the teacher: x{report['speedup']:.2f}")


def hard_label_run(cfg, run_dir: Path, resume: bool) -> dict:
    """The same student on the labels alone: the same config with no teacher, same train section and seed, as a
    run of its own inside this one (`<run>/hard-labels`). Returns its headline for the table."""
    from .run import train

    sub = run_dir / HARD
    if artifacts.is_finished(sub):
        summary = artifacts.read_json(sub / artifacts.SUMMARY)
    else:
        objective = cfg.objective.model_copy(update={"distill": None})
        hard_cfg = cfg.model_copy(update={"name": HARD, "objective": objective,
                                          "output": cfg.output.model_copy(update={"dir": str(run_dir)})})
        print(f"\n=== the same student on hard labels alone ({sub}) ===")
        summary = train(hard_cfg, resume=resume and sub.exists())
        print("=== back to the distilled student ===\n")
    return {"run": HARD, "test": summary.get("test"), "params": summary["params"]["total"],
            "size_mb": folder_mb(*_weight_folders(cfg, sub / summary["weights"])),
            "steps": summary["train"]["steps"]}


def _teacher_on_meta(cfg, head: str):
    from .models.load import head_class, quiet_transformers

    with torch.device("meta"), quiet_transformers():
        return head_class(head).from_config(teacher_config(settings(cfg).teacher))


def student_on_meta(cfg, head: str):
    """keep_layers: the student's structure, built from the teacher's config on the meta device; else None."""
    from .models.student import keep_blocks, layer_count
    from .objectives.distill import keep_indices

    d = settings(cfg)
    if d is None or d.keep_layers is None:
        return None
    teacher = _teacher_on_meta(cfg, head)
    with torch.device("meta"):
        return keep_blocks(teacher, keep_indices(d.keep_layers, layer_count(teacher.config)))


def plan_lines(cfg, head: str, student) -> list[str]:
    """`plan`: the teacher's and the student's parameter counts, from their configs on the meta device."""
    d = settings(cfg)
    if d is None:
        return []
    n_teacher = sum(p.numel() for p in _teacher_on_meta(cfg, head).parameters())
    n_student = sum(p.numel() for p in student.parameters())
    what = (f"keep_layers {d.keep_layers}: {student.config.num_hidden_layers} blocks" if d.keep_layers is not None
            else cfg.model.name)
    return [f"distillation: teacher {d.teacher}: {n_teacher:,d} params",
            f"  student ({what}): {n_student:,d} params ({n_student / n_teacher:.1%} of the teacher)"]
