"""Packing vs padding on variable-length instruction data: training throughput in real tokens per second.

    python bench/packing.py [--rows 96] [--batch-size 8] [--max-length 512] [--model sample:smollm2-135m-instruct]

The same rows (the first --rows of the alpaca-demo sample, SmolLM2's chat template, loss on the
answers) go through forward and backward of SmolLM2-135M-Instruct with LoRA (r=8, all linear
layers), fp32, three ways, one after another in this process:

  padded   batches drawn at random, padded to their longest row (the usual default)
  grouped  batches of similar length (tunesmith's default, group_by_length), padded
  packed   rows packed into sequences of --max-length tokens (objective.pack), no padding

Packed micro-batches hold about as many real tokens as the padded ones. Throughput counts real
(non-pad) tokens only; the summed loss over all rows is printed per way and must agree (it is the
same loss, computed differently). Ratios are against `padded`, measured in the same run. Timings
on a shared machine are noisy: compare the ratios, not the absolute numbers, across runs.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--model", default="sample:smollm2-135m-instruct")
    p.add_argument("--data", default="sample:alpaca-demo")
    args = p.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunesmith.config import DataConfig, ModelConfig
    from tunesmith.data.collate import collate
    from tunesmith.data.load import load_splits
    from tunesmith.models.load import load_tokenizer, resolve
    from tunesmith.objectives import sft
    from tunesmith.objectives.lm import check_packing
    from tunesmith.data.batches import train_batches

    torch.manual_seed(0)
    tokenizer = load_tokenizer(ModelConfig(name=args.model))
    data = DataConfig(train=args.data, max_length=args.max_length, max_rows={"train": args.rows})
    splits = {"train": load_splits(data, seed=0)["train"]}
    rows = sft.prepare(splits, tokenizer, sft.Config(), data).examples["train"]
    packed = sft.prepare(splits, tokenizer, sft.Config(pack=True), data).examples["train"]
    lengths = [len(e["input_ids"]) for e in rows]
    real = sum(lengths)
    packed_bs = max(1, round(args.batch_size * real / len(rows) / args.max_length))

    model = AutoModelForCausalLM.from_pretrained(resolve(args.model), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    check_packing(model)
    pad = tokenizer.pad_token_id

    ways = {
        "padded": (rows, train_batches(lengths, args.batch_size, 0, 0, group_by_length=False)),
        "grouped": (rows, train_batches(lengths, args.batch_size, 0, 0, group_by_length=True)),
        "packed": (packed, train_batches([len(e["input_ids"]) for e in packed], packed_bs, 0, 0,
                                         group_by_length=False)),
    }
    print(f"{args.rows} rows, {real:,d} real tokens (p50 {sorted(lengths)[len(lengths) // 2]}, max {max(lengths)}); "
          f"padded/grouped batches of {args.batch_size} rows, packed batches of {packed_bs} x {args.max_length} tokens")
    results = {}
    for name, (examples, batches) in ways.items():
        warm = collate([examples[i] for i in batches[0]], pad)
        sft.loss(model, warm, sft.Config()).total.backward()
        model.zero_grad(set_to_none=True)
        loss_sum, computed, start = 0.0, 0, time.perf_counter()
        for idx in batches:
            batch = collate([examples[i] for i in idx], pad)
            out = sft.loss(model, batch, sft.Config())
            out.total.backward()
            model.zero_grad(set_to_none=True)
            loss_sum += float(out.total.detach())
            computed += batch["input_ids"].numel()
        seconds = time.perf_counter() - start
        results[name] = {"seconds": seconds, "tokens_per_s": real / seconds, "padding": 1 - real / computed,
                         "sequences": len(examples), "steps": len(batches), "loss_sum": loss_sum}

    base = results["padded"]["tokens_per_s"]
    print(f"\n{'way':<9}{'real tok/s':>12}{'ratio':>8}{'padding':>9}{'batches':>9}{'seconds':>9}{'summed loss':>14}")
    for name, r in results.items():
        print(f"{name:<9}{r['tokens_per_s']:>12.1f}{r['tokens_per_s'] / base:>7.2f}x{r['padding']:>9.1%}"
              f"{r['steps']:>9d}{r['seconds']:>9.1f}{r['loss_sum']:>14.3f}")


if __name__ == "__main__":
    main()
