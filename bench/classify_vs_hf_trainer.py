"""tunesmith vs Hugging Face Trainer + PEFT on the same LoRA classification work.

    python bench/classify_vs_hf_trainer.py [--rows 2048] [--epochs 1]

Same model (MiniLM-L6 sample), same LoRA (r=8 on query/key/value/dense), same data (the first
--rows of the rotten-tomatoes sample's train split), batch 32, max_length 64, fp32, one epoch,
no evaluation or checkpoints during training. Each tool runs in its own process; the script
prints training throughput, peak memory and test accuracy of both, and the ratios. tunesmith's process runs on
the allocator the `tunesmith` command runs on (jemalloc when installed), the Trainer's on its process's own.
HF Trainer runs twice: with its defaults, and with train_sampling_strategy="group_by_length"
(tunesmith groups by length by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from peers import AS_THE_COMMAND, command_env  # run as `python bench/classify_vs_hf_trainer.py`: bench/ is on the path

HF = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              Trainer, TrainingArguments, set_seed)
    from tunesmith.data.sources import read
    from tunesmith.samples import pull

    rows, epochs, group, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
    set_seed(0)
    path = str(pull("minilm-l6", log=lambda m: None))
    tok = AutoTokenizer.from_pretrained(path)
    splits = read("sample:rotten-tomatoes")
    labels = ["fresh", "rotten"]
    def ds(part, n=None):
        rows_ = part.rows[:n] if n else part.rows
        enc = tok([r["text"] for r in rows_], truncation=True, max_length=64)
        return Dataset.from_dict({**enc, "labels": [labels.index(r["label"]) for r in rows_]})
    train, test = ds(splits["train"], rows), ds(splits["test"])
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1,
                                             target_modules=["query", "key", "value", "dense"]))
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             num_train_epochs=epochs, learning_rate=1e-3, warmup_steps=0.06, lr_scheduler_type="linear",
                             max_grad_norm=1.0, weight_decay=0.0, bf16=False, fp16=False, use_cpu=True,
                             train_sampling_strategy="group_by_length" if group else "random", eval_strategy="no", save_strategy="no", report_to=[],
                             logging_strategy="no", disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    preds = trainer.predict(test)
    acc = float((preds.predictions.argmax(-1) == preds.label_ids).mean())
    print(json.dumps({"train_seconds": seconds, "examples_per_s": len(train) * epochs / seconds, "test_accuracy": acc,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")

TUNESMITH = """\
name: bench
model: sample:minilm-l6
data: {{train: sample:rotten-tomatoes, max_length: 64, max_rows: {{train: {rows}}}}}
tuning: {{kind: lora, r: 8, alpha: 16, dropout: 0.1, targets: [query, key, value, dense]}}
objective: {{kind: classify}}
train: {{epochs: {epochs}, batch_size: 32, lr: 1.0e-3, warmup: 0.06, eval_every: 1000000, early_stopping: {{enabled: false}}}}
eval: {{compare_base: false}}
output: {{dir: {out}}}
"""


def run_tunesmith(rows: int, epochs: float, tmp: Path) -> dict:
    """train_seconds counts optimizer steps only, as the Trainer's timing below does not include the
    final evaluation either."""
    cfg = tmp / "bench.yaml"
    cfg.write_text(TUNESMITH.format(rows=rows, epochs=epochs, out=tmp / "runs"))
    code = AS_THE_COMMAND + textwrap.dedent(f"""
        import json, resource
        from tunesmith.config import load_config
        from tunesmith.run import train
        cfg = load_config({str(cfg)!r})
        summary = train(cfg, force=True)
        print("RESULT" + json.dumps({{"train_seconds": summary["train"]["train_seconds"],
                                     "examples_per_s": summary["train"]["examples_per_s"],
                                     "test_accuracy": summary["test"]["accuracy"],
                                     "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=command_env())
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def run_hf(rows: int, epochs: float, group: bool, tmp: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", HF, str(rows), str(epochs), "1" if group else "0", str(tmp / "hf")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--epochs", type=float, default=1)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results = {
            "tunesmith": run_tunesmith(args.rows, args.epochs, tmp),
            "hf-trainer": run_hf(args.rows, args.epochs, False, tmp),
            "hf-trainer group_by_length": run_hf(args.rows, args.epochs, True, tmp),
        }
    print(f"LoRA classification, MiniLM-L6, {args.rows} rows x {args.epochs} epoch, batch 32, fp32, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'tool':<30}{'examples/s':>12}{'train s':>10}{'peak MiB':>10}{'test acc':>10}")
    for name, r in results.items():
        print(f"{name:<30}{r['examples_per_s']:>12.1f}{r['train_seconds']:>10.1f}{r['peak_rss_mb']:>10.0f}"
              f"{r['test_accuracy']:>10.4f}")
    ours = results["tunesmith"]
    for name in ("hf-trainer", "hf-trainer group_by_length"):
        r = results[name]
        print(f"tunesmith / {name}: throughput x{ours['examples_per_s'] / r['examples_per_s']:.2f}, "
              f"peak memory x{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
