"""Tiny random models, tokenizers and datasets built in-process, so tests never need a download.

`make_model_dir(path, "bert")` writes a 2-layer BERT (hidden 32) with a word-level tokenizer;
`"llama"` writes a 2-layer Llama with a chat template; `"llama-bpe"` the same Llama with a byte-level
BPE tokenizer like SmolLM2's (what GGUF export writes). All load through the same code path as a real
local model folder.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

POSITIVE = "good great fine superb lovely brilliant moving fun charming smart".split()
NEGATIVE = "bad awful dull boring weak poor messy flat tedious silly".split()
FILLER = ("the a movie film story plot actor scene it is was and but very quite this that of to with "
          "for an its by on as at from one two three four five six seven eight nine ten").split()
WORDS = sorted(set(POSITIVE + NEGATIVE + FILLER))

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LLAMA_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 pre-tokenization), trained in-process on the tiny vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=LLAMA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + sentiment_texts()
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def sentiment_texts() -> list[str]:
    return [r["text"] for r in sentiment_rows(200, seed=9)]


def make_tokenizer(kind: str = "bert"):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind == "llama-bpe":
        return make_bpe_tokenizer()

    specials = BERT_SPECIALS if kind == "bert" else LLAMA_SPECIALS
    extra = ["user", "assistant", "system", "User", "Assistant", "#", "Instruction", "Response", "\n", ":", "?",
             ".", ","]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS + extra)}
    unk = "[UNK]" if kind == "bert" else "<unk>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="<|im_end|>",
                                   additional_special_tokens=["<|im_start|>", "</s>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model_dir(path: Path, kind: str = "bert", seed: int = 0, **overrides) -> Path:
    """Save a tiny random model and its tokenizer to `path` (a base model, no task head)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

    torch.manual_seed(seed)
    tokenizer = make_tokenizer(kind)
    n = len(tokenizer)
    if kind not in ("bert", "llama", "llama-bpe"):
        raise ValueError(kind)
    if kind == "bert":
        config = BertConfig(**{"vocab_size": n, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 64, "max_position_embeddings": 128, "pad_token_id": 0, **overrides})
        model = AutoModel.from_config(config)
    else:
        config = LlamaConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True, **overrides)
        model = AutoModelForCausalLM.from_config(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """Short texts whose label is set by one sentiment word among filler: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, rng.randint(3, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


def embed_rows(n: int, seed: int = 0, negatives: bool = False) -> list[dict]:
    """(anchor, positive[, negative]) rows: a positive shares its anchor's two key words in other filler (a
    paraphrase); a negative has one of them and another."""
    rng = random.Random(seed)
    keys = POSITIVE + NEGATIVE
    rows = []
    for _ in range(n):
        a, b, c = rng.sample(keys, 3)
        text = lambda *ws: " ".join(rng.sample(FILLER, rng.randint(2, 5)) + list(ws))  # noqa: E731
        row = {"anchor": text(a, b), "positive": text(b, a)}
        if negatives:
            row["negative"] = text(a, c)
        rows.append(row)
    return rows


def embed_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", extra: str = "",
                 objective: str = "{kind: embed}") -> Path:
    """A small embedding run config on `embed_rows`."""
    text = f"""\
name: tiny
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {tuning}
objective: {objective}
train: {{epochs: 3, batch_size: 16, lr: 3.0e-3, eval_every: 8, log_every: 4, seed: 0}}
{with_eval(extra)}"""
    return write_config(path, text)


def patterned_rows(n: int, seed: int) -> list[dict]:
    """Plain text for causal LMs: sentences of one pattern with random fillers; learnable, and no two
    rows alike (so train, validation and test do not leak)."""
    rng, nouns = random.Random(seed), "movie film story plot scene actor".split()

    def sentence():
        return (f"the {rng.choice(nouns)} was {rng.choice(POSITIVE + NEGATIVE)} and the {rng.choice(nouns)} was "
                f"{rng.choice(POSITIVE + NEGATIVE)} .")

    return [{"text": " ".join(sentence() for _ in range(3))} for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


NO_PROBE = "forgetting: {enabled: false}"
"""Unit tests never read the packaged general-text samples: the forgetting probe is off unless a test
turns it on with its own probe file."""


def with_eval(extra: str, eval_keys: str = NO_PROBE) -> str:
    """`extra` config text with `eval_keys` added to its `eval: {...}` line (or as a new one); a test that
    configures the probe itself keeps its own."""
    if "forgetting:" in extra:
        return extra
    if "eval: {" in extra:
        return extra.replace("eval: {", f"eval: {{{eval_keys}, ", 1)
    return extra + f"eval: {{{eval_keys}}}\n"


def clm_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", extra: str = "") -> Path:
    """A small causal-LM run config on plain text (e.g. `patterned_rows`)."""
    text = f"""\
name: tiny
model: {model}
data: {{train: {data}, max_length: 64}}
tuning: {tuning}
objective: {{kind: clm}}
train: {{epochs: 3, batch_size: 8, lr: 3.0e-3, eval_every: 8, log_every: 4, seed: 0}}
{with_eval(extra)}"""
    return write_config(path, text)


def classify_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", extra: str = "") -> Path:
    """A small classification run config: the tiny task learns in about 60 steps at this lr."""
    text = f"""\
name: tiny
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {tuning}
objective: {{kind: classify}}
train: {{epochs: 5, batch_size: 16, lr: 3.0e-3, eval_every: 12, log_every: 4, seed: 0}}
{with_eval(extra)}"""
    return write_config(path, text)


def instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """Alpaca rows whose answer is one word set by the sentiment word in the instruction: learnable in a
    few steps by a tiny model, short enough that a tuned model's stop rate is easy to see."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos = rng.random() < 0.5
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(POSITIVE if pos else NEGATIVE)]
        rows.append({"instruction": " ".join(words), "input": "", "output": "good" if pos else "bad"})
    return rows


def sft_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", objective: str = "",
               extra: str = "") -> Path:
    """A small sft run config: the tiny instruction task learns (and learns to stop) in about 30 steps."""
    text = f"""\
name: sft
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {tuning}
objective: {{kind: sft{', ' + objective if objective else ''}}}
train: {{epochs: 4, batch_size: 8, lr: 3.0e-3, seed: 0}}
eval: {{generate: {{max_new_tokens: 8, prompts: 16}}}}
{extra}"""
    return write_config(path, text)


def count_good(prompts: list[str], answers: list[str]) -> list[float]:
    """A reward for ppo tests: how often the answer says `good` (a tiny random model rarely does)."""
    return [float(a.split().count("good")) for a in answers]


def ppo_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", objective: str = "",
               extra: str = "") -> Path:
    """A small ppo run on the tiny model: prompts are the first words of the sentiment rows, the reward
    `count_good`; the reward rises within about 20 steps at this lr."""
    text = f"""\
name: ppo
model: {model}
data: {{train: {data}, max_length: 32, max_rows: {{test: 16}}}}
tuning: {tuning}
objective: {{kind: ppo, reward: {{function: "tiny:count_good"}}, prompt_words: 3, max_new_tokens: 12, minibatch: 8,
             kl: {{coef: 0.3, target: 4.0}}, kl_bound: 12.0{', ' + objective if objective else ''}}}
train: {{max_steps: 40, batch_size: 16, lr: 3.0e-3, log_every: 5, seed: 0}}
eval: {{forgetting: {{enabled: false}}, generate: {{prompts: 16, do_sample: true}}}}
{extra}"""
    return write_config(path, text)


def grpo_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: full}", objective: str = "",
                extra: str = "") -> Path:
    """A small grpo run on the tiny model: the prompts and the `count_good` reward of `ppo_config`, each of 4
    prompts per step answered 4 times."""
    text = f"""\
name: grpo
model: {model}
data: {{train: {data}, max_length: 32, max_rows: {{test: 16}}}}
tuning: {tuning}
objective: {{kind: grpo, reward: {{function: "tiny:count_good"}}, prompt_words: 3, max_new_tokens: 12, group_size: 4,
             beta: 0.04, micro_batch: 8, kl_bound: 12.0{', ' + objective if objective else ''}}}
train: {{max_steps: 30, batch_size: 4, lr: 3.0e-3, log_every: 5, seed: 0}}
eval: {{forgetting: {{enabled: false}}, generate: {{prompts: 16, do_sample: true}}}}
{extra}"""
    return write_config(path, text)


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Preference rows (prompt of filler words) where the chosen answer is a positive phrase and the rejected
    one a negative phrase: a preference a tiny model learns in a few steps."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.sample(FILLER, rng.randint(2, 6)))
        chosen = " ".join([rng.choice(POSITIVE)] + rng.sample(FILLER, rng.randint(0, 3)))
        rejected = " ".join([rng.choice(NEGATIVE)] + rng.sample(FILLER, rng.randint(0, 3)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def preference_config(path: Path, model: Path, data: Path | str, tuning: str = "{kind: lora, r: 4}",
                      objective: str = "{kind: dpo, beta: 0.5}", extra: str = "",
                      train: str = "{epochs: 3, batch_size: 8, lr: 1.0e-2, eval_every: 8, log_every: 4, seed: 0}") -> Path:
    """A small preference run config (dpo or reward) on `preference_rows`."""
    text = f"""\
name: tiny
model: {model}
data: {{train: {data}, max_length: 32}}
tuning: {tuning}
objective: {objective}
train: {train}
{with_eval(extra)}"""
    return write_config(path, text)


def cli(args, cwd, env=None, script=None):
    """`tunesmith ARGS` in a fresh process (or `script` run with those arguments), for tests that kill it."""
    cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "tunesmith"]
    # this folder on the path: configs name reward functions in this module (`tiny:count_good`)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run(cmd + args, cwd=cwd, env={**os.environ, "PYTHONPATH": path, **(env or {})},
                          capture_output=True, text=True)


def train_small(root: Path, model, data, tuning: str, name: str, objective: str = "clm", steps: int = 8,
                generate: str = "") -> Path:
    """Train a short run in root (the CLI, in-process) and return its folder."""
    from tunesmith.cli import main

    gen = f", generate: {{{generate}}}" if generate else ""
    cfg = write_config(root / f"{name}.yaml", f"""\
name: {name}
model: {model}
data: {{train: {data}, max_length: 48}}
tuning: {tuning}
objective: {{kind: {objective}}}
train: {{max_steps: {steps}, batch_size: 8, lr: 1.0e-2, eval_every: {steps}}}
eval: {{compare_base: false, forgetting: {{enabled: false}}{gen}}}
""")
    assert main(["train", str(cfg)]) == 0
    return root / "runs" / name
