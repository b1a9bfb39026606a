"""Generation throughput: tunesmith's decoding loop against plain `model.generate`, same prompts and settings.

    python bench/generation.py [--model sample:smollm2-135m-instruct] [--prompts 64] [--max-new-tokens 128]
                               [--batch-size 8] [--repetition-penalty 1.0] [--threads N]

The prompts are the first --prompts instructions of the alpaca-demo sample's test split (instruction and
input as one user turn), rendered through the model's chat template as `tunesmith generate` renders them;
generation stops on the template's end-of-turn token or at --max-new-tokens, greedy, fp32, on the CPU.
Three ways, one after the other in this process, each after the same warm-up:

- plain: `model.generate` on batches of --batch-size prompts taken in the given order (what a script would do);
- plain sorted: `model.generate` on batches sorted by prompt length (less padding; tunesmith's path before);
- tunesmith: evaluate/generation.py (continuous batching: finished rows leave the batch, waiting prompts
  join it; KV cache; logits of the last position only).

Tokens/s counts the answers' tokens (up to and including the stop token), the same count for every way.
The greedy answers of each plain way are compared with tunesmith's, token for token, and the count of
identical answers is printed (a difference would be a float near-tie, and is shown).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def alpaca_prompts(n: int) -> list[list[dict]]:
    from tunesmith.samples import pull

    rows = [json.loads(line) for line in (pull("alpaca-demo", log=lambda s: None) / "test.jsonl").open()]
    if n > len(rows):
        rows += [json.loads(line) for line in (pull("alpaca-demo", log=lambda s: None) / "train.jsonl").open()]
    return [[{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")}]
            for r in rows[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sample:smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import GenerateConfig
    from tunesmith.data.templates import ChatFormat
    from tunesmith.evaluate.decoding import plain_decode
    from tunesmith.evaluate.generation import generate
    from tunesmith.models.load import resolve

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chat = ChatFormat.build(tokenizer, "auto")
    prompts = [chat.encode_prompt(c) for c in alpaca_prompts(args.prompts)]
    stop = chat.stop_ids()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    settings = GenerateConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              repetition_penalty=args.repetition_penalty)
    by_length = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    ways = {
        "plain model.generate": lambda: plain_decode(model, prompts, settings, stop, pad),
        "plain, sorted by length": lambda: plain_decode(model, prompts, settings, stop, pad, order=by_length),
        "tunesmith": lambda: [g.ids for g in generate(model, tokenizer, prompts, settings, stop)],
    }
    warm = settings.model_copy(update={"max_new_tokens": 4})
    plain_decode(model, prompts[:2], warm, stop, pad)
    generate(model, tokenizer, prompts[:2], warm, stop)

    results = {}
    for name, run in ways.items():
        start = time.perf_counter()
        rows = run()
        results[name] = (time.perf_counter() - start, rows)
    ours_s, ours = results["tunesmith"]
    tokens = sum(len(r) for r in ours)
    print(f"\n{args.model}: {len(prompts)} alpaca-demo prompts, greedy, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}, repetition_penalty {args.repetition_penalty:g}, fp32, "
          f"{torch.get_num_threads()} threads ({os.cpu_count()} CPUs)")
    print(f"answers: {tokens} tokens, {sum(len(r) < args.max_new_tokens for r in ours)} stopped before the limit, "
          f"lengths {min(map(len, ours))}-{max(map(len, ours))}\n")
    print(f"{'':<26}{'seconds':>9}{'tokens/s':>10}{'tunesmith x':>13}{'identical greedy':>18}")
    for name, (seconds, rows) in results.items():
        same = sum(a == b for a, b in zip(rows, ours))
        print(f"{name:<26}{seconds:>9.1f}{sum(len(r) for r in rows) / seconds:>10.1f}{seconds / ours_s:>13.2f}"
              f"{f'{same}/{len(ours)}':>18}")
    plain_s, plain = results["plain model.generate"]
    print(f"\ntunesmith {tokens / ours_s:.1f} tokens/s vs plain model.generate {sum(map(len, plain)) / plain_s:.1f}: "
          f"x{plain_s / ours_s:.2f}; greedy outputs identical: "
          + ("yes" if all(rows == ours for _, rows in results.values()) else "NO (see below)"))
    for name, (_, rows) in results.items():
        for i, (a, b) in enumerate(zip(rows, ours)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"  {name}, prompt {i}: differs from token {k}: {tokenizer.decode(a[k:k + 8])!r} vs "
                      f"{tokenizer.decode(b[k:k + 8])!r}")


if __name__ == "__main__":
    main()
