"""Peak memory of language-model training steps with the loss's logits chunked (objective.loss_chunk) or whole.

    python bench/lm_memory.py [--steps 4] [--chunk 1024] [--config examples/sft-alpaca-lora.yaml
                               --config examples/dpo-lora.yaml] [--set key=value ...]

For each config, two fresh processes, one after the other, each: read the config (with --set overrides),
tokenize its data, build its model and tuning as a run does (dpo: the reference log-probs attached first,
as a run does before training), then run --steps optimizer steps of the objective's loss at the config's
batch size, in fp32 on the CPU, with the loop's batching (group_by_length), clipping and AdamW. One process
has `objective.loss_chunk: --chunk` (chunked: the default), the other `objective.loss_chunk: 0` (the whole
batch's logits at once, as before). Each process reports its own peak RSS (getrusage), its RSS before the
first step, and the loss of every step; the table prints them side by side with the ratio of the peaks
and the largest difference between the two runs' losses (the same computation, so it should be ~1e-6).

No evaluation, generation or saving runs: the numbers are the training step's, not the whole command's.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CONFIGS = ["examples/sft-alpaca-lora.yaml", "examples/dpo-lora.yaml"]


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def child(config: str, overrides: list[str], steps: int) -> dict:
    """One measured process: `steps` training steps; returns peak RSS, RSS before training and the losses."""
    import torch

    from tunesmith.build import load_base
    from tunesmith.config import load_config
    from tunesmith.data.batches import train_batches
    from tunesmith.data.collate import collate
    from tunesmith.models.load import load_tokenizer
    from tunesmith.objectives import OBJECTIVES
    from tunesmith.run import prepare_data
    from tunesmith.tuning import TUNINGS

    torch.manual_seed(0)
    cfg = load_config(config, overrides)
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    tokenizer = load_tokenizer(cfg.model)
    prepared, _ = prepare_data(cfg, tokenizer)
    model = tuning.apply(load_base(cfg, objective.HEAD, prepared.model_kwargs, torch.float32, tokenizer.pad_token_id),
                         cfg.tuning, objective.HEAD, tokenizer)
    pad = tokenizer.pad_token_id
    if hasattr(objective, "attach_reference"):
        objective.attach_reference(model, {"train": prepared.examples["train"]}, cfg.objective, cfg.train.batch_size,
                                   pad)
    train = prepared.examples["train"]
    batches = train_batches([len(e["input_ids"]) for e in train], cfg.train.batch_size, cfg.train.seed, 0,
                            cfg.train.group_by_length)[:steps]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    model.train()
    before = _rss_gib()
    losses, tick = [], time.perf_counter()
    for idx in batches:
        out = objective.loss(model, collate([train[i] for i in idx], pad), cfg.objective)
        loss = out.total / max(1, int(out.count))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return {"peak_gib": _rss_gib(), "before_gib": before, "losses": losses,
            "seconds": time.perf_counter() - tick}


def measure(config: str, overrides: list[str], steps: int, chunk: int) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--steps", str(steps),
           *[a for o in [*overrides, f"objective.loss_chunk={chunk}"] for a in ("--set", o)]]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="run config (repeat); default: " + ", ".join(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per process")
    p.add_argument("--chunk", type=int, default=1024, help="objective.loss_chunk of the chunked process")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeat)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.set, args.steps)))
        return

    rows = []
    for config in args.config or DEFAULT_CONFIGS:
        whole = measure(config, args.set, args.steps, 0)
        chunked = measure(config, args.set, args.steps, args.chunk)
        rows.append((Path(config).name, whole, chunked))

    import os
    import platform

    import torch

    print(f"\n{args.steps} training steps per process, fp32 on CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads")
    print(f"{'config':<24} {'loss_chunk':>10} {'RSS before':>11} {'peak RSS':>9} {'s/step':>7}  losses")
    for name, whole, chunked in rows:
        for chunk, r in ((0, whole), (args.chunk, chunked)):
            print(f"{name:<24} {chunk:>10} {r['before_gib']:>9.2f}Gi {r['peak_gib']:>7.2f}Gi "
                  f"{r['seconds'] / max(1, len(r['losses'])):>7.2f}  " + " ".join(f"{x:.6f}" for x in r["losses"]))
    print()
    for name, whole, chunked in rows:
        diff = max((abs(a - b) for a, b in zip(whole["losses"], chunked["losses"])), default=0.0)
        print(f"{name}: peak RSS chunked / whole = {chunked['peak_gib'] / whole['peak_gib']:.2f} "
              f"({whole['peak_gib']:.2f} -> {chunked['peak_gib']:.2f} GiB); largest loss difference {diff:.2e}")


if __name__ == "__main__":
    main()
