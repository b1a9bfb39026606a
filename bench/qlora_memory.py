"""Peak memory of QLoRA vs fp32 LoRA on SmolLM2-135M at the same batch, each in its own process.

    python bench/qlora_memory.py [--batch 4] [--length 128] [--steps 3] [--rank 16]

Each variant loads the model the way `tunesmith train` does (the tuning's load hook, then `apply`), runs
a few optimizer steps of the clm objective on the same Shakespeare batch, and reports the peak resident
set size of its process (VmHWM): the whole process, and the training phase alone (the peak is reset
once the model is loaded, so the transient of reading fp32 weights to quantize them is left out).
Variants, so the saving can be traced to its causes:

  lora           fp32 base, LoRA                          (the baseline)
  lora+gc        fp32 base, LoRA, gradient checkpointing
  qlora-no-gc    NF4 base (double quant), LoRA
  qlora          NF4 base (double quant), LoRA, gradient checkpointing (tunesmith's qlora default)

Peak RSS counts what the C allocator holds, not only live tensors: glibc keeps freed heap pages, and the
many short-lived tensors of a training step (4-bit layers dequantize their weight on every call) leave it
fragmented. `--mmap-threshold 1048576` runs every variant with MALLOC_MMAP_THRESHOLD_ set, so tensors of 1 MiB
and more are mapped and returned on free: lower peaks for all variants, slower steps.

Memory is what this reports; the step times it prints are wall clock on a shared machine, noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "lora": ({"kind": "lora"}, False),
    "lora+gc": ({"kind": "lora"}, True),
    "qlora-no-gc": ({"kind": "qlora", "gradient_checkpointing": False}, False),
    "qlora": ({"kind": "qlora", "gradient_checkpointing": True}, True),
}
MODEL = "sample:smollm2-135m-instruct"


def rss_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def worker(variant: str, batch: int, length: int, steps: int, rank: int) -> dict:
    import gc

    import torch
    from transformers import set_seed

    from tunesmith.config import RunConfig
    from tunesmith.data.sources import read
    from tunesmith.models.load import load_tokenizer
    from tunesmith.objectives import OBJECTIVES
    from tunesmith.tuning import TUNINGS
    from tunesmith.tuning.common import load_base

    imported = rss_mb("VmRSS")
    tuning, checkpointing = VARIANTS[variant]
    cfg = RunConfig.model_validate({"name": "bench", "model": MODEL, "data": {"train": "sample:shakespeare"},
                                    "tuning": {**tuning, "r": rank, "alpha": 2 * rank, "targets": "all-linear"},
                                    "objective": "clm"})
    tokenizer = load_tokenizer(cfg.model)
    text = " ".join(r["text"] for r in read("sample:shakespeare")["train"].rows[:200])
    ids = torch.tensor(tokenizer(text)["input_ids"][:batch * length]).view(batch, length)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    set_seed(0)
    started = time.perf_counter()
    model = load_base(cfg, "causal-lm", {}, torch.float32, tokenizer.pad_token_id)
    model = TUNINGS[cfg.tuning.kind].apply(model, cfg.tuning, "causal-lm", tokenizer)
    if checkpointing and cfg.tuning.kind == "lora":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gc.collect()
    loaded = rss_mb("VmRSS")
    load_peak = rss_mb("VmHWM")
    load_seconds = time.perf_counter() - started
    reset_peak()

    objective = OBJECTIVES["clm"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses, step_seconds = [], []
    for _ in range(steps):
        tick = time.perf_counter()
        out = objective.loss(model, data, cfg.objective)
        (out.total / out.count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(float(out.total / out.count), 4))
        step_seconds.append(round(time.perf_counter() - tick, 1))
    trainable, total = model.get_nb_trainable_parameters()
    return {"variant": variant, "trainable": trainable, "total": total, "after_imports_mb": round(imported),
            "loaded_mb": round(loaded), "load_peak_mb": round(load_peak), "train_peak_mb": round(rss_mb("VmHWM")),
            "process_peak_mb": round(max(load_peak, rss_mb("VmHWM"))), "losses": losses,
            "load_seconds": round(load_seconds, 1), "step_seconds": step_seconds, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--mmap-threshold", type=int, help="set MALLOC_MMAP_THRESHOLD_ (bytes) for every variant")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.length, args.steps, args.rank)))
        return

    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--worker", variant, "--batch", str(args.batch), "--length",
               str(args.length), "--steps", str(args.steps), "--rank", str(args.rank)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if args.mmap_threshold:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{variant} failed:\n{proc.stderr[-3000:]}")
        results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {variant}: done", file=sys.stderr)

    base = results.get("lora")
    allocator = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "default glibc allocator"
    print(f"SmolLM2-135M, clm, batch {args.batch} x {args.length} tokens, LoRA r={args.rank} on all linear layers, "
          f"{args.steps} steps, CPU fp32 compute, {allocator}; peak RSS per process (MiB)")
    print(f"{'variant':<14}{'trainable':>12}{'process peak':>14}{'train peak':>12}{'vs lora':>9}"
          f"{'above imports':>15}{'vs lora':>9}   losses")
    for name, r in results.items():
        above = r["process_peak_mb"] - r["after_imports_mb"]
        ratio = f"{r['process_peak_mb'] / base['process_peak_mb']:.2f}" if base else "-"
        ratio_above = f"{above / (base['process_peak_mb'] - base['after_imports_mb']):.2f}" if base else "-"
        print(f"{name:<14}{r['trainable']:>12,d}{r['process_peak_mb']:>14,d}{r['train_peak_mb']:>12,d}{ratio:>9}"
              f"{above:>15,d}{ratio_above:>9}   {r['losses']}")
    print("process peak: the whole process (loading included); train peak: from the model loaded to the last step; "
          "above imports: process peak minus the RSS of the imported libraries, i.e. what the run itself added.")
    threads = next(iter(results.values()))["threads"]
    print(f"step seconds ({threads} torch threads; wall clock on a shared machine, noisy): "
          + "; ".join(f"{k} {r['step_seconds']}" for k, r in results.items()))


if __name__ == "__main__":
    main()
