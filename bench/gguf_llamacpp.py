"""llama.cpp itself on tunesmith's GGUF export: does the exported file answer held-out prompts as the tuned model does?

    python bench/gguf_llamacpp.py RUN [--llama-bin DIR] [--prompts 8] [--max-new-tokens 64]
                                  [--quant f32 q8_0 q4_0] [--kquant q4_k_m q5_k_m] [--threads N]

RUN is a finished sft (or any chat-templated causal LM) run folder of a Llama-family model. --llama-bin is the
folder holding llama.cpp's `llama-completion` and `llama-quantize` (default: $LLAMA_CPP_BIN, else
.cache/llama.cpp/build/bin, where `make llama-cpp` builds them from the pinned llama-cpp-python sdist).

1. The prompts are the first --prompts rows of the run's test split, prepared as training prepared them
   (tunesmith.run.prepare_data: same data checks, template and system prompt): what the run's generation
   metrics answered, never trained on.
2. The tuned model answers them through tunesmith (evaluate/generation.answer, what `tunesmith generate` runs):
   greedy, --max-new-tokens, repetition penalty off, one prompt at a time (llama.cpp decodes one prompt at a
   time; batching would pad, which moves logits by float rounding only, but this keeps the two paths alike).
3. `tunesmith.export.ship.export` writes RUN/export/RUN-<quant>.gguf for each --quant, as `tunesmith export RUN
   --format gguf --quant Q` does (and prints its own transformers read-back check); `llama-quantize` makes each
   --kquant from the f32 file.
4. `llama-completion` answers each prompt from each file: the prompt rendered through the run's chat template
   (ChatFormat.render, the text whose tokens tunesmith generates from) given raw (-no-cnv, --no-escape), special
   tokens parsed, a BOS only if the GGUF says the tokenizer adds one (then the template's own is left out, so there
   is one, as in tunesmith's prompt); --temp 0 --top-k 1, repetition penalty off, -n --max-new-tokens; it stops
   at an end-of-generation token (<|im_end|>, EOS). Its --verbose-prompt token ids are compared with tunesmith's
   prompt ids, so a tokenizer mismatch shows as such.

Printed: per file its size, prompts tokenized identically, answers identical (text, trailing whitespace aside),
the mean length of the common prefix of the two answers in characters next to the mean tunesmith answer length,
and one JSON line. Exits 1 when the f32 file does not give tunesmith's answer on every prompt (f32 holds the
same weights, so any difference is an exporter or tokenizer bug); the quantized files are reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_BIN = Path(__file__).resolve().parents[1] / ".cache" / "llama.cpp" / "build" / "bin"


def held_out(trained, n: int) -> list[list[dict]]:
    """The first n test prompts of the run, prepared as training prepared them."""
    from tunesmith.run import prepare_data

    prepared, _ = prepare_data(trained.cfg, trained.tokenizer)
    items = prepared.prompts.get("test", [])
    if not items:
        raise SystemExit(f"{trained.name}: the run's data has no test prompts (an sft run with a test split)")
    return [it["messages"] for it in items[:n]]


def tunesmith_answers(trained, conversations, max_new_tokens: int) -> list[list[int]]:
    """Token ids of tunesmith's greedy answers, the stop token left out."""
    from tunesmith.evaluate.generation import answer

    settings = trained.generate.model_copy(update={"max_new_tokens": max_new_tokens, "do_sample": False,
                                                   "repetition_penalty": 1.0, "batch_size": 1})
    stops = set(trained.chat.stop_ids())
    return [g.ids[:-1] if g.ids and g.ids[-1] in stops else g.ids
            for g in answer(trained.model, trained.chat, conversations, settings, trained.cfg.train.seed)]


def llama_answer(binary: Path, model: Path, prompt: str, max_new_tokens: int, threads: int) -> tuple[str, list[int]]:
    """llama.cpp's greedy answer to a raw prompt, and the prompt's token ids as llama.cpp read them."""
    cmd = [str(binary), "-m", str(model), "-p", prompt, "-n", str(max_new_tokens), "-no-cnv", "--no-escape",
           "--no-display-prompt", "--verbose-prompt", "--temp", "0", "--top-k", "1", "--repeat-penalty", "1",
           "--seed", "0", "-c", "0", "-t", str(threads), "--no-warmup", "--simple-io"]
    # an answer cut at max_new_tokens may end inside a character; tunesmith decodes that to U+FFFD as well
    out = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise SystemExit(f"{binary.name} failed on {model.name} (exit {out.returncode}):\n{out.stderr[-3000:]}")
    # --verbose-prompt logs "number of tokens in prompt = K", then K lines "   ID -> 'piece'" (a piece may span lines),
    # each line after a log prefix such as "0.01.109.531 I " in this version
    count = int(re.search(r"number of tokens in prompt = (\d+)", out.stderr).group(1))
    after = out.stderr[out.stderr.index("number of tokens in prompt"):]
    ids = [int(m) for m in re.findall(r"^(?:[\d.]+ [A-Z] )?\s*(\d+) -> '", after, flags=re.M)[:count]]
    text = out.stdout.rstrip()
    text = text.removesuffix("[end of text]").rstrip()  # printed after an end-of-generation token
    return text, ids


def shared_prefix(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--llama-bin", type=Path, default=Path(os.environ.get("LLAMA_CPP_BIN", DEFAULT_BIN)))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--quant", nargs="*", default=["f32", "q8_0", "q4_0"], help="types tunesmith's exporter writes")
    ap.add_argument("--kquant", nargs="*", default=["q4_k_m", "q5_k_m"], help="types llama-quantize makes from f32")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (the answers do not depend on it)")
    args = ap.parse_args(argv)
    completion, quantize = args.llama_bin / "llama-completion", args.llama_bin / "llama-quantize"
    for binary in (completion, quantize):
        if not binary.exists():
            raise SystemExit(f"no {binary}: build llama.cpp with `make llama-cpp`, or pass --llama-bin DIR")
    if args.kquant and "f32" not in args.quant:
        args.quant = ["f32", *args.quant]  # the K-quants are made from the f32 file

    from tunesmith.export.ship import export, render
    from tunesmith.trained import load_trained

    run = Path(args.run)
    trained = load_trained(run)
    if trained.cfg is None or trained.chat is None or trained.chat.template is None:
        raise SystemExit(f"{run} is not a run of a chat-templated causal LM (an sft run)")
    conversations = held_out(trained, args.prompts)
    chat, tokenizer = trained.chat, trained.tokenizer
    prompts = [chat.render(chat.with_system(c), add_generation_prompt=True) for c in conversations]
    prompt_ids = [chat.encode_prompt(c) for c in conversations]
    assert all(tokenizer(p, add_special_tokens=False)["input_ids"] == ids for p, ids in zip(prompts, prompt_ids)), \
        "the rendered prompt does not tokenize to tunesmith's prompt ids"
    if tokenizer.bos_token and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]:
        # the GGUF says add_bos (gguf_vocab.write): llama.cpp puts BOS first itself, so a template's own goes
        prompts = [p.removeprefix(tokenizer.bos_token) for p in prompts]
    print(f"tunesmith answering {len(prompts)} test prompts (greedy, max_new_tokens {args.max_new_tokens}) ...")
    ours = [tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).rstrip()
            for ids in tunesmith_answers(trained, conversations, args.max_new_tokens)]
    del trained

    files = {}
    for quant in args.quant:
        report = export(run, "gguf", quant=quant)
        print(render(report))
        files[quant] = Path(report["path"])
    for kquant in args.kquant:
        files[kquant] = files["f32"].with_name(files["f32"].name.replace("-f32.gguf", f"-{kquant}.gguf"))
        out = subprocess.run([str(quantize), str(files["f32"]), str(files[kquant]), kquant.upper(), str(args.threads)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama-quantize {kquant.upper()} failed:\n{out.stderr[-3000:]}")
        print(f"wrote {files[kquant]} (llama-quantize {kquant.upper()})")

    rows, differences = [], {}
    for quant, path in files.items():
        print(f"llama.cpp answering with {path.name} ...")
        answers = [llama_answer(completion, path, p, args.max_new_tokens, args.threads) for p in prompts]
        same_prompt = sum(ids == ref for (_, ids), ref in zip(answers, prompt_ids))
        same = [text == ref for (text, _), ref in zip(answers, ours)]
        prefix = [shared_prefix(text, ref) for (text, _), ref in zip(answers, ours)]
        rows.append({"quant": quant, "bytes": path.stat().st_size, "prompts": len(prompts),
                     "prompt_tokens_identical": same_prompt, "identical": sum(same),
                     "mean_shared_prefix_chars": round(sum(prefix) / len(prefix), 1),
                     "mean_answer_chars": round(sum(map(len, ours)) / len(ours), 1)})
        differences[quant] = [(i, answers[i][0], prefix[i]) for i, s in enumerate(same) if not s]

    n = len(prompts)
    print(f"\n{run.name}: {n} test prompts, greedy, max_new_tokens {args.max_new_tokens}; llama.cpp "
          f"({completion}) vs tunesmith's tuned model")
    print(f"{'quant':<8}{'MiB':>8}{'prompt ids same':>17}{'answers identical':>19}{'shared prefix chars':>21}")
    for r in rows:
        same_ids, same = f"{r['prompt_tokens_identical']}/{n}", f"{r['identical']}/{n}"
        prefix = f"{r['mean_shared_prefix_chars']:g} of {r['mean_answer_chars']:g}"
        print(f"{r['quant']:<8}{r['bytes'] / 2**20:>8.1f}{same_ids:>17}{same:>19}{prefix:>21}")
    for quant, diffs in differences.items():
        for i, text, k in diffs[:3]:
            print(f"  {quant}, prompt {i}: differs from character {k}: llama.cpp {text[k:k + 40]!r} vs tunesmith "
                  f"{ours[i][k:k + 40]!r}")
    print(json.dumps({"run": str(run), "prompts": n, "max_new_tokens": args.max_new_tokens, "results": rows}))
    f32 = next((r for r in rows if r["quant"] == "f32"), None)
    return 0 if f32 is None or f32["identical"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
