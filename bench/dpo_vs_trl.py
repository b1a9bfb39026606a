"""tunesmith vs trl's DPOTrainer + PEFT on the same LoRA preference tuning.

    python bench/dpo_vs_trl.py [--rows 128] [--eval-rows 30] [--max-length 128] [--gradient-checkpointing]

The settings of examples/dpo-lora.yaml on both sides, except gradient checkpointing (off on both sides unless
--gradient-checkpointing turns it on on both, as the example does): SmolLM2-135M-Instruct sample, LoRA r=16, alpha 32
on all linear layers, no dropout (both tools' default for dpo: trl's disable_dropout=True, tunesmith's
objective.dropout: false), sigmoid DPO loss with beta 0.1, the reference being the same model with the
adapter switched off and its log-probs precomputed once before training (tunesmith: precompute_ref: true;
trl: precompute_ref_log_probs=True; on both sides outside the timed training), batch 8 pairs, lr 5e-4 with
linear decay after 10% warmup, max grad norm 1, fp32 on the CPU, one epoch over the first --rows pairs of the
dpo-demo train split, no evaluation or checkpoints during training. Batches group pairs of similar length
on both sides (tunesmith's default; trl's DPOTrainer drops a `length` column before sampling, so its
sampler is swapped for transformers' LengthGroupedSampler on the same lengths).

Same pairs, same template: trl gets each pair as conversational prompt / chosen / rejected messages, the
prompt as tunesmith used it (shortened to fit --max-length when it had to be), and renders them with the
same chat template. trl 1.16's DPOTrainer has no path for pre-tokenized pairs, so its own tokenization
stands: its answers also carry the newline the template writes after <|im_end|>, and a sequence still too
long is cut at the right (tunesmith cuts the prompt first). The table prints each side's answer tokens.

Each tool trains in its own fresh process; train seconds are the optimizer steps only (trl: trainer.train(),
tunesmith: its loop's own clock), peak memory is that process's ru_maxrss (tunesmith's process runs on the allocator
the `tunesmith` command runs on: jemalloc when installed, else glibc with its mmap threshold fixed; trl's keeps its
process's defaults unless --peer-allocator gives it the same; tunesmith's includes its short end-of-run
evaluation, without gradients). The final loss is the mean training loss of the last 10% of steps (at least one),
the mean loss that of every step; each tool's per-step losses are printed too (the batches differ: each tool groups
pairs by length in its own order). Then each trained adapter is scored in a third fresh process by one function of
this script, on the first --eval-rows test pairs as tunesmith encodes them: the implicit reward margin beta *
((logp_c - ref_c) - (logp_r - ref_r)) of each pair, logp summed over answer tokens, the reference being the adapter
switched off; accuracy is the share of pairs with a positive margin (a tie counts half), test loss the mean sigmoid
DPO loss -log sigmoid(margin).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
from pathlib import Path

# run as `python bench/dpo_vs_trl.py`: bench/ is on the path
from peers import AS_THE_COMMAND, LAST_LOSSES, allocators, child, command_env

BENCH = "dpo_vs_trl.py"

# Shared by every child: the pairs exactly as tunesmith encodes them for dpo.
COMMON = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from tunesmith.config import DataConfig, ModelConfig
    from tunesmith.data.load import load_splits
    from tunesmith.models.load import load_tokenizer, resolve
    from tunesmith.objectives.pairs import prepare_pairs

    MODEL, DATA, BETA = "sample:smollm2-135m-instruct", "sample:dpo-demo", 0.1

    def encoded(split, rows, max_length):
        tok = load_tokenizer(ModelConfig(name=MODEL))
        data = DataConfig(train=DATA, max_length=max_length, max_rows={split: rows})
        part = load_splits(data, seed=0)[split]
        prepared = prepare_pairs({split: part}, tok, "auto", None, data)
        return tok, prepared.examples[split], prepared.prompts[split]

    def answer_tokens(examples):
        return sum(sum(l != -100 for l in e[k]) for e in examples for k in ("labels", "rejected_labels"))
""") + LAST_LOSSES

TRL = COMMON + textwrap.dedent("""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, set_seed
    from transformers.trainer_pt_utils import LengthGroupedSampler
    from trl import DPOConfig, DPOTrainer

    class GroupedDPOTrainer(DPOTrainer):
        def _get_train_sampler(self, dataset=None):
            dataset = dataset if dataset is not None else self.train_dataset
            lengths = [len(p) + max(len(c), len(r)) for p, c, r in
                       zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
            return LengthGroupedSampler(self.args.train_batch_size, lengths=lengths)

    rows, max_length, out, checkpointing = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    set_seed(0)
    tok, examples, prompts = encoded("train", rows, max_length)
    train = Dataset.from_list([{"prompt": p["messages"], "chosen": [{"role": "assistant", "content": p["reference"]}],
                                "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in prompts])
    model = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=8, num_train_epochs=1, learning_rate=5e-4,
                     warmup_steps=0.1, lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0,
                     bf16=False, fp16=False, use_cpu=True, max_length=max_length, beta=BETA, loss_type=["sigmoid"],
                     precompute_ref_log_probs=True, precompute_ref_batch_size=8, gradient_checkpointing=checkpointing,
                     gradient_checkpointing_kwargs={"use_reentrant": False},
                     eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
                     seed=0, dataloader_num_workers=0)
    trainer = GroupedDPOTrainer(model=model, args=args, train_dataset=train, processing_class=tok,
                                peft_config=LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(out + "/adapter")
    ds = trainer.train_dataset
    answers = sum(max(0, min(len(a), max_length - len(p))) for p, c, r in
                  zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]) for a in (c, r))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "grad_norm" in h]
    print("RESULT" + json.dumps({"train_seconds": seconds, "pairs": len(ds), "answer_tokens": answers,
                                 "steps": trainer.state.global_step, "final_loss": last_losses(losses),
                                 "mean_loss": sum(losses) / len(losses), "losses": losses,
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

TUNESMITH_CONFIG = """\
name: bench
model: sample:smollm2-135m-instruct
data:
  train: sample:dpo-demo
  max_length: {max_length}
  max_rows: {{train: {rows}, validation: 8, test: 8}}
  checks: {{leakage: {{exact: warn, near: "off"}}, duplicates: "off"}}   # never change the rows
tuning: {{kind: lora, r: 16, alpha: 32, dropout: 0.0, targets: all-linear}}
objective: {{kind: dpo, beta: 0.1, precompute_ref: true}}
train: {{epochs: 1, batch_size: 8, lr: 5.0e-4, warmup: 0.1, eval_every: 1000000, log_every: 1,
         gradient_checkpointing: {checkpointing}, early_stopping: {{enabled: false}}}}
eval: {{compare_base: false, forgetting: {{enabled: false}}}}
output: {{dir: {out}}}
"""

TUNESMITH = AS_THE_COMMAND + COMMON + textwrap.dedent("""
    from tunesmith.config import load_config
    from tunesmith.run import train

    config, rows, max_length, run_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    summary = train(load_config(config), force=True)
    lines = [json.loads(l) for l in open(run_dir + "/metrics.jsonl")]
    losses = [l["loss"] for l in lines if "loss" in l and "grad_norm" in l]
    _, examples, _ = encoded("train", rows, max_length)
    print("RESULT" + json.dumps({"train_seconds": summary["train"]["train_seconds"], "pairs": len(examples),
                                 "answer_tokens": answer_tokens(examples), "steps": summary["train"]["steps"],
                                 "final_loss": last_losses(losses),
                                 "mean_loss": sum(losses) / len(losses), "losses": losses,
                                 "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

# The held-out score, one function for both tools' adapters.
SCORE = COMMON + textwrap.dedent("""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from tunesmith.data.collate import collate

    adapter, rows, max_length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    tok, examples, _ = encoded("test", rows, max_length)
    base = AutoModelForCausalLM.from_pretrained(resolve(MODEL), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()

    def logps(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels = labels[:, 1:]
        picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (picked * (labels != -100)).sum(-1)

    margins = []
    with torch.no_grad():
        for i in range(0, len(examples), 8):
            batch = collate(examples[i:i + 8], tok.pad_token_id)
            sides = [(batch["input_ids"], batch["attention_mask"], batch["labels"]),
                     (batch["rejected_input_ids"], batch["rejected_attention_mask"], batch["rejected_labels"])]
            policy = [logps(*s) for s in sides]
            with model.disable_adapter():
                ref = [logps(*s) for s in sides]
            margins += (BETA * ((policy[0] - ref[0]) - (policy[1] - ref[1]))).tolist()
    accuracy = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    loss = -torch.nn.functional.logsigmoid(torch.tensor(margins)).mean().item()  # the sigmoid DPO loss, held out
    print("RESULT" + json.dumps({"reward_accuracy": accuracy, "reward_margin": sum(margins) / len(margins),
                                 "test_loss": loss, "test_pairs": len(margins)}))
""")



def run_tunesmith(args, tmp: Path) -> dict:
    cfg = tmp / "bench.yaml"
    cfg.write_text(TUNESMITH_CONFIG.format(rows=args.rows, max_length=args.max_length, out=tmp / "runs",
                                           checkpointing=str(args.gradient_checkpointing).lower()))
    result = child(BENCH, "tunesmith", TUNESMITH, cfg, args.rows, args.max_length, tmp / "runs" / "bench",
                   env=command_env())
    return {**result, **child(BENCH, "tunesmith scoring", SCORE, tmp / "runs" / "bench" / "adapter",
                              args.eval_rows, args.max_length)}


def run_trl(args, tmp: Path) -> dict:
    out = tmp / "trl"
    result = child(BENCH, "trl", TRL, args.rows, args.max_length, out, int(args.gradient_checkpointing),
                   env=command_env() if args.peer_allocator else None)
    return {**result, **child(BENCH, "trl scoring", SCORE, out / "adapter", args.eval_rows, args.max_length)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=128, help="first pairs of the train split")
    p.add_argument("--eval-rows", type=int, default=30, help="first pairs of the test split scored after training")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--gradient-checkpointing", action="store_true", help="on both sides (examples/dpo-lora.yaml's)")
    p.add_argument("--peer-allocator", action="store_true",
                   help="run trl on the allocator the tunesmith command runs on too (default: its process's own)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {"tunesmith": run_tunesmith(args, tmp), "trl DPOTrainer": run_trl(args, tmp)}
    print(allocators(args.peer_allocator))
    ours, trl = results["tunesmith"], results["trl DPOTrainer"]
    if ours["pairs"] != trl["pairs"] or ours["test_pairs"] != trl["test_pairs"]:
        sys.exit(f"the two tools did not see the same pairs: {ours} vs {trl}")
    print(f"LoRA dpo, SmolLM2-135M-Instruct, dpo-demo {ours['pairs']} pairs x 1 epoch, batch 8, max_length "
          f"{args.max_length}, reference log-probs precomputed, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, fp32, {os.cpu_count()} CPU threads; "
          f"held-out on {ours['test_pairs']} test pairs")
    print(f"{'tool':<16}{'steps':>6}{'answer tok':>11}{'train s':>9}{'pairs/s':>9}{'peak GiB':>10}{'final loss':>12}"
          f"{'mean loss':>11}{'test loss':>11}{'test acc':>10}{'margin':>9}")
    for name, r in results.items():
        print(f"{name:<16}{r['steps']:>6}{r['answer_tokens']:>11,d}{r['train_seconds']:>9.1f}"
              f"{r['pairs'] / r['train_seconds']:>9.2f}{r['peak_rss_mb'] / 1024:>10.2f}{r['final_loss']:>12.4f}"
              f"{r['mean_loss']:>11.4f}{r['test_loss']:>11.4f}{r['reward_accuracy']:>10.3f}{r['reward_margin']:>9.4f}")
    for name, r in results.items():  # step by step: the batches differ (each tool's own length-grouped order)
        print(f"{name} losses by step: " + " ".join(f"{x:.3f}" for x in r["losses"]))
    print(f"tunesmith / trl: pairs/s x{trl['train_seconds'] / ours['train_seconds']:.2f}, "
          f"peak memory x{ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}, "
          f"test accuracy {ours['reward_accuracy'] - trl['reward_accuracy']:+.3f}")


if __name__ == "__main__":
    main()
