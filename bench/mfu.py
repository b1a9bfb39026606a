"""Model FLOPs utilisation (MFU): how much of this machine's measured matmul peak the benchmarked runs reach.

    python bench/mfu.py [--threads N]
    python bench/mfu.py --model sample:smollm2-135m-instruct --tokens-per-s 79.0 --seq 202 --weights frozen

The peak is the best fp32 `torch.mm` throughput over square sizes 1024, 2048 and 3072 (best of 5 each), with
torch's threads (all cores by default). A run's model FLOPs per token are counted from the model itself: 2 x the
weights of every nn.Linear (the output layer included, for every token) plus attention's two products (2 x 2 x
hidden x the positions attended, causal: half the sequence on average), for a forward pass; training multiplies
by 3 when every weight trains (forward, input gradients, weight gradients) and by 2 when the base weights are
frozen (LoRA and the other adapters: forward and input gradients; the adapters' own products are under 2%
here and not counted). Gradient checkpointing's recomputed forward is not counted: MFU counts the model's
work, not the hardware's. Decoding (generation) is one forward per new token over the cached positions, limited
by reading the weights once per step, not by the multiply units: its MFU is low by nature.

Without --model it prints the peak and the MFU of the runs measured in docs/performance.md and the README
(their tokens/s as those commands printed them, listed in RUNS below). Run it on an otherwise idle machine:
the peak is a timing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

TRAINING_PASSES = {"all": 3, "frozen": 2, "decode": 1}  # forward passes' worth of FLOPs per token

# (run, model, tokens/s, mean sequence length, weights): tokens/s are real (unpadded) tokens, as measured by the
# command in the run's name (docs/performance.md and the README have the tables).
RUNS = [
    ("sft LoRA, tunesmith (bench/sft_vs_trl.py, run 1)", "sample:smollm2-135m-instruct", 79.0, 202, "frozen"),
    ("sft LoRA, trl SFTTrainer (bench/sft_vs_trl.py, run 1)", "sample:smollm2-135m-instruct", 55.2, 202, "frozen"),
    ("dpo LoRA, tunesmith (bench/dpo_vs_trl.py, run 2)", "sample:smollm2-135m-instruct", 0.68 * 238, 119,
     "frozen"),
    ("dpo LoRA, trl DPOTrainer (bench/dpo_vs_trl.py, run 2)", "sample:smollm2-135m-instruct", 0.57 * 238, 119,
     "frozen"),
    ("classify LoRA, tunesmith (bench/classify_vs_hf_trainer.py)", "sample:minilm-l6", 84.3 * 27.0, 27, "frozen"),
    ("classify LoRA, HF Trainer group_by_length (same bench)", "sample:minilm-l6", 76.8 * 27.0, 27, "frozen"),
    ("generation, tunesmith (bench/generation.py, run 4)", "sample:smollm2-135m-instruct", 70.1, 100, "decode"),
]


def peak_gflops(sizes=(1024, 2048, 3072), repeats: int = 5) -> float:
    """The best fp32 matmul throughput (GFLOP/s) over `sizes`, best of `repeats` each."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: thread pool, packing buffers
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start) / 1e9)
    return best


def forward_flops_per_token(model_name: str, seq: int) -> float:
    """One forward pass's FLOPs per token: 2 x every nn.Linear's weights, plus attention's QK^T and AV over
    seq / 2 positions on average (causal), per layer. The model is built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from tunesmith.models.load import resolve

    config = AutoConfig.from_pretrained(resolve(model_name))
    with torch.device("meta"):
        build = AutoModelForCausalLM if "CausalLM" in str(config.architectures) else AutoModel
        model = build.from_config(config)
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = 2 * 2 * config.num_hidden_layers * config.hidden_size * seq / 2
    return 2 * linear + attention


def mfu(model_name: str, tokens_per_s: float, seq: int, weights: str, peak: float) -> tuple[float, float]:
    """(achieved GFLOP/s, its share of `peak`) for a run of `tokens_per_s` on `model_name`."""
    achieved = tokens_per_s * TRAINING_PASSES[weights] * forward_flops_per_token(model_name, seq) / 1e9
    return achieved, achieved / peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--model", help="one run: its model (with --tokens-per-s, --seq, --weights)")
    p.add_argument("--tokens-per-s", type=float)
    p.add_argument("--seq", type=int, default=256, help="mean sequence length (attention's share)")
    p.add_argument("--weights", choices=list(TRAINING_PASSES), default="frozen",
                   help="all: every weight trains; frozen: adapters on a frozen base; decode: generation")
    args = p.parse_args()
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s ({torch.get_num_threads()} threads, {os.cpu_count()} CPUs)")
    runs = [(args.model, args.model, args.tokens_per_s, args.seq, args.weights)] if args.model else RUNS
    print(f"{'run':<62}{'tokens/s':>9}{'GFLOP/s':>9}{'MFU':>7}")
    for name, model, tps, seq, weights in runs:
        achieved, share = mfu(model, tps, seq, weights, peak)
        print(f"{name:<62}{tps:>9.1f}{achieved:>9.1f}{share:>7.1%}")


if __name__ == "__main__":
    main()
