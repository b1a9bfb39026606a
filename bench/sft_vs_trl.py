"""tunesmith vs trl's SFTTrainer + PEFT on the same LoRA instruction tuning.

    python bench/sft_vs_trl.py [--rows 64] [--eval-rows 99] [--max-length 512] [--packing]
                               [--no-gradient-checkpointing]

The settings of examples/sft-alpaca-lora.yaml on both sides: SmolLM2-135M-Instruct sample, LoRA r=16,
alpha 32, dropout 0.05 on all linear layers, batch 8, lr 5e-4 with linear decay after 10% warmup, max grad
norm 1, fp32 on the CPU, one epoch over the first --rows of the alpaca-demo train split, no evaluation or
checkpoints during training, gradient checkpointing on (non-reentrant) unless --no-gradient-checkpointing.

Same tokens: both tools train on the rows exactly as tunesmith renders them (the model's chat template; the
answer and its closing <|im_end|> are the targets, the prompt is masked; a row too long has its prompt
shortened). trl receives them pre-tokenized, its documented path for processed data: `input_ids` plus a
`completion_mask`, with completion_only_loss=True (trl 1.16's assistant_only_loss needs conversational rows
and, for a template without generation markers such as SmolLM2's, swaps in a training template of trl's
own: not the same rendering). So the final training losses are directly comparable and tokens/s counts the
same real (non-pad) tokens on both sides.

Batching: by default both pad each batch to its longest row and batch rows of similar length together
(tunesmith's default; trl: train_sampling_strategy="group_by_length"). With --packing both pack rows into
sequences of --max-length tokens with attention kept inside each row, 8 sequences per batch (tunesmith:
objective.pack; trl: packing=True, whose default "bfd" strategy turns on padding_free: its batch is then one
row of all 8 sequences, which without flash attention's varlen kernels, as on the CPU, attends through one
block-diagonal mask over the whole row).

Each tool trains in its own fresh process; train seconds are the optimizer steps only (trl: trainer.train(),
tunesmith: its loop's own clock), peak memory is that process's ru_maxrss (tunesmith's process runs on the allocator
the `tunesmith` command runs on: jemalloc when installed, else glibc with its mmap threshold fixed; trl's keeps its
process's defaults unless --peer-allocator gives it the same; tunesmith's includes its short end-of-run test
evaluation, without gradients). The final loss is the mean training loss of the last 10% of steps (at least one),
from each tool's per-step log. Then each trained adapter is scored in a third fresh process by one function of this
script: mean cross-entropy of the answer tokens of the first --eval-rows test rows, same encoding, same code for
both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

# run as `python bench/sft_vs_trl.py`: bench/ is on the path
from peers import AS_THE_COMMAND, LAST_LOSSES, allocators, child, command_env

BENCH = "sft_vs_trl.py"

# Shared by every child: the rows exactly as tunesmith encodes them for sft.
COMMON = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from tunesmith.config import DataConfig, ModelConfig
    from tunesmith.data.load import load_splits
    from tunesmith.models.load import load_tokenizer, resolve
    from tunesmith.objectives import sft

    MODEL, DATA = "sample:smollm2-135m-instruct", "sample:alpaca-demo"

    def encoded(split, rows, max_length):
        tok = load_tokenizer(ModelConfig(name=MODEL))
        data = DataConfig(train=DATA, max_length=max_length, max_rows={split: rows})
        part = load_splits(data, seed=0)[split]
        return tok, sft.prepare({split: part}, tok, sft.Config(), data).examples[split]
""") + LAST_LOSSES

TRL = COMMON + textwrap.dedent("""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    rows, max_length, packing, checkpointing, out = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1",
                                                     sys.argv[4] == "1", sys.argv[5])
    set_seed(0)
    tok, examples = encoded("train", rows, max_length)
    train = Dataset.from_dict({"input_ids": [e["input_ids"] for e in examples],
                               "completion_mask": [[int(l != -100) for l in e["labels"]] for e in examples]})
    model = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    args = SFTConfig(output_dir=out, per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-4,
                     warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                     bf16=False, fp16=False, use_cpu=True, max_length=max_length, completion_only_loss=True,
                     packing=packing, train_sampling_strategy="random" if packing else "group_by_length",
                     gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
                     eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
                     seed=0, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05,
                                                target_modules="all-linear"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(out + "/adapter")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    print("RESULT" + json.dumps({"train_seconds": seconds, "tokens": sum(len(e["input_ids"]) for e in examples),
                                 "steps": trainer.state.global_step, "final_loss": last_losses(losses),
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

TUNESMITH_CONFIG = """\
name: bench
model: sample:smollm2-135m-instruct
data:
  train: sample:alpaca-demo
  max_length: {max_length}
  max_rows: {{train: {rows}, validation: 8, test: 8}}
  checks: {{leakage: {{exact: warn, near: "off"}}, duplicates: "off"}}   # never change the rows
tuning: {{kind: lora, r: 16, alpha: 32, dropout: 0.05, targets: all-linear}}
objective: {{kind: sft, pack: {packing}}}
train: {{epochs: 1, batch_size: 8, lr: 5.0e-4, warmup: 0.1, eval_every: 1000000, log_every: 1,
         gradient_checkpointing: {checkpointing}, early_stopping: {{enabled: false}}}}
eval: {{compare_base: false, generate: {{prompts: 0}}, forgetting: {{enabled: false}}}}
output: {{dir: {out}}}
"""

TUNESMITH = AS_THE_COMMAND + COMMON + textwrap.dedent("""
    from tunesmith.config import load_config
    from tunesmith.run import train

    config, rows, max_length, run_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    summary = train(load_config(config), force=True)
    lines = [json.loads(l) for l in open(run_dir + "/metrics.jsonl")]
    losses = [l["loss"] for l in lines if "loss" in l and "grad_norm" in l]
    _, examples = encoded("train", rows, max_length)
    print("RESULT" + json.dumps({"train_seconds": summary["train"]["train_seconds"],
                                 "tokens": sum(len(e["input_ids"]) for e in examples),
                                 "steps": summary["train"]["steps"], "final_loss": last_losses(losses),
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

# The held-out score, one function for both tools' adapters.
SCORE = COMMON + textwrap.dedent("""
    import torch.nn.functional as F
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunesmith.data.collate import collate

    adapter, rows, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tok, examples = encoded("test", rows, max_length)
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i:i + 8], tok.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    print("RESULT" + json.dumps({"test_loss": total / count, "test_tokens": count}))
""")



def run_tunesmith(args, tmp: Path) -> dict:
    cfg = tmp / "bench.yaml"
    cfg.write_text(TUNESMITH_CONFIG.format(rows=args.rows, max_length=args.max_length, out=tmp / "runs",
                                           packing=str(args.packing).lower(),
                                           checkpointing=str(args.gradient_checkpointing).lower()))
    result = child(BENCH, "tunesmith", TUNESMITH, cfg, args.rows, args.max_length, tmp / "runs" / "bench",
                   env=command_env())
    return {**result, **child(BENCH, "tunesmith scoring", SCORE, tmp / "runs" / "bench" / "adapter",
                              args.eval_rows, args.max_length)}


def run_trl(args, tmp: Path) -> dict:
    out = tmp / "trl"
    result = child(BENCH, "trl", TRL, args.rows, args.max_length, int(args.packing), int(args.gradient_checkpointing),
                   out, env=command_env() if args.peer_allocator else None)
    return {**result, **child(BENCH, "trl scoring", SCORE, out / "adapter", args.eval_rows, args.max_length)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64, help="first rows of the train split")
    p.add_argument("--eval-rows", type=int, default=99, help="first rows of the test split scored after training")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--packing", action="store_true", help="pack rows on both sides (default: padded, grouped)")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    p.add_argument("--peer-allocator", action="store_true",
                   help="run trl on the allocator the tunesmith command runs on too (default: its process's own)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {"tunesmith": run_tunesmith(args, tmp), "trl SFTTrainer": run_trl(args, tmp)}
    print(allocators(args.peer_allocator))
    ours, trl = results["tunesmith"], results["trl SFTTrainer"]
    if ours["tokens"] != trl["tokens"] or ours["test_tokens"] != trl["test_tokens"]:
        sys.exit(f"the two tools did not see the same tokens: {ours} vs {trl}")
    batching = "packed" if args.packing else "padded, grouped by length"
    print(f"LoRA sft, SmolLM2-135M-Instruct, alpaca-demo {args.rows} rows ({ours['tokens']:,d} tokens) x 1 epoch, "
          f"batch 8, max_length {args.max_length}, {batching}, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, fp32, {os.cpu_count()} CPU threads; "
          f"test loss on {args.eval_rows} rows ({ours['test_tokens']:,d} answer tokens)")
    print(f"{'tool':<18}{'steps':>6}{'train s':>9}{'tokens/s':>10}{'peak GiB':>10}{'final loss':>12}{'test loss':>11}")
    for name, r in results.items():
        print(f"{name:<18}{r['steps']:>6}{r['train_seconds']:>9.1f}{r['tokens'] / r['train_seconds']:>10.1f}"
              f"{r['peak_rss_mb'] / 1024:>10.2f}{r['final_loss']:>12.4f}{r['test_loss']:>11.4f}")
    print(f"tunesmith / trl: tokens/s x{trl['train_seconds'] / ours['train_seconds']:.2f}, "
          f"peak memory x{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}, "
          f"test loss {ours['test_loss'] - trl['test_loss']:+.4f}")


if __name__ == "__main__":
    main()
