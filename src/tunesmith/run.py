"""One fine-tuning run, top to bottom:

config -> data (read, split, tokenize, data card) -> run folder -> model (load, tune)
       -> base score -> train -> evaluate -> artifacts (weights, summary)

Everything that can be wrong with the input is checked before the run folder is touched, so a
bad config or bad data never leaves a folder that looks like a run.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import set_seed

from . import artifacts
from .config import RunConfig, dump
from .data.load import load_splits
from .evaluate.score import evaluate
from .models.load import load_tokenizer
from .models.params import count_parameters, format_parameters
from .objectives import OBJECTIVES
from .train.loop import fit
from .tuning import TUNINGS
from .tuning.common import check_before_loading, load_base


def precision_and_dtype(cfg: RunConfig) -> tuple[str, torch.dtype]:
    """accelerate's mixed-precision mode and the dtype of the base weights.

    CPUs here have no bf16 units (bf16 runs 20-30x slower), so auto means fp32 on CPU and bf16
    autocast on a GPU that supports it; a frozen base can then also be stored in bf16.
    """
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mode = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}.get(cfg.train.precision, "bf16" if gpu_bf16 else "no")
    if cfg.model.dtype != "auto":
        dtype = getattr(torch, cfg.model.dtype)
    elif gpu_bf16 and cfg.tuning.kind not in ("full", "freeze"):
        dtype = torch.bfloat16
    else:
        dtype = torch.float32
    return mode, dtype


def prepare_data(cfg: RunConfig, tokenizer):
    objective = OBJECTIVES[cfg.objective.kind]
    splits = load_splits(cfg.data, cfg.train.seed)
    return objective.prepare(splits, tokenizer, cfg.objective, cfg.data)


def print_card(card: dict) -> None:
    print("data card")
    for split in ("train", "validation", "test"):
        info = card.get(split)
        if not info:
            continue
        tok = info["tokens"]
        line = (f"  {split:<10} {info['rows']:>7,d} rows   tokens p50 {tok['p50']} p95 {tok['p95']} max {tok['max']}"
                f"   truncated {info['truncated']}")
        if "label_balance" in info:
            total = sum(info["label_balance"].values())
            line += "   labels " + " ".join(f"{k} {v / total:.0%}" for k, v in info["label_balance"].items())
        print(line)


def print_comparison(base: dict | None, tuned: dict) -> None:
    print(f"\n{'test':<12}{'base':>10}{'tuned':>10}")
    for key, value in tuned.items():
        b = f"{base[key]:.4f}" if base and key in base else "-"
        print(f"{key:<12}{b:>10}{value:>10.4f}")


def train(cfg: RunConfig, *, resume: bool = False, force: bool = False) -> dict:
    started = time.perf_counter()
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    run_dir = Path(cfg.output.dir) / cfg.name

    # 1. Everything checkable before the run folder exists: config, data, tokenizer, labels, and the
    #    tuning on this architecture (from the model's config and a meta-device build: no weights read).
    artifacts.open_run_dir(run_dir, resume=resume, force=force)
    tokenizer = load_tokenizer(cfg.model)
    prepared = prepare_data(cfg, tokenizer)
    check_before_loading(cfg, prepared.model_kwargs)
    print_card(prepared.card)

    # 2. The run folder, marked as running until summary.json is written.
    run_dir.mkdir(parents=True, exist_ok=True)
    artifacts.set_status(run_dir, "running")
    try:
        summary = _train_in(run_dir, cfg, objective, tuning, tokenizer, prepared, resume, started)
    except BaseException as e:
        artifacts.set_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    return summary


def _train_in(run_dir: Path, cfg: RunConfig, objective, tuning, tokenizer, prepared, resume: bool,
              started: float) -> dict:
    (run_dir / artifacts.CONFIG).write_text(dump(cfg), encoding="utf-8")
    artifacts.write_json(run_dir / artifacts.MANIFEST, artifacts.manifest(cfg, prepared.model_kwargs))
    artifacts.write_json(run_dir / "data_card.json", prepared.card)

    mode, dtype = precision_and_dtype(cfg)
    accelerator = Accelerator(mixed_precision=mode)
    set_seed(cfg.train.seed)
    model = load_base(cfg, objective.HEAD, prepared.model_kwargs, dtype, tokenizer.pad_token_id)
    model = tuning.apply(model, cfg.tuning, objective.HEAD, tokenizer)
    trainable, total = count_parameters(model)
    print(format_parameters(trainable, total))
    model.to(accelerator.device)

    pad_id = tokenizer.pad_token_id
    eval_bs = cfg.train.eval_batch_size or 2 * cfg.train.batch_size
    test = prepared.examples.get("test")
    base = None
    if cfg.eval.compare_base and test:
        base_file = run_dir / "base_scores.json"
        if resume and base_file.exists():
            base = artifacts.read_json(base_file)
        else:
            base = evaluate(model, objective, cfg.objective, test, eval_bs, pad_id, accelerator, "base test")
            artifacts.write_json(base_file, base)
        print("base test " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))

    trained = fit(model=model, objective=objective, obj_cfg=cfg.objective,
                  train_examples=prepared.examples["train"], val_examples=prepared.examples.get("validation"),
                  cfg=cfg.train, pad_id=pad_id, run_dir=run_dir, accelerator=accelerator, resume=resume)
    model = accelerator.unwrap_model(model)

    results = {}
    for split in ("validation", "test"):
        if prepared.examples.get(split):
            results[split] = evaluate(model, objective, cfg.objective, prepared.examples[split], eval_bs, pad_id,
                                      accelerator, split)
    if cfg.eval.metrics:
        results = {s: {k: v for k, v in m.items() if k in cfg.eval.metrics} for s, m in results.items()}
        base = {k: v for k, v in base.items() if k in cfg.eval.metrics} if base else base

    summary = {
        "name": cfg.name,
        **results,
        "base": {"test": base} if base else None,
        "train": {k: v for k, v in trained.items() if k != "validation_history"},
        "params": {"trainable": trainable, "total": total, "trainable_pct": round(100 * trainable / total, 4)},
        "peak_memory_mb": artifacts.peak_memory_mb(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    if accelerator.is_main_process:
        save = getattr(tuning, "save", None) or artifacts.save_weights
        summary["weights"] = save(run_dir, model, tokenizer)
        artifacts.set_status(run_dir, "completed")
        artifacts.write_json(run_dir / artifacts.SUMMARY, summary)
        if "test" in results:
            print_comparison(base, results["test"])
        print(f"\nrun saved to {run_dir}")
    return summary
