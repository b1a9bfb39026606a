"""The leakage check, measured: recall on planted copies, what fires on clean splits, and speed.

    python bench/leakage.py            # the rotten-tomatoes study at the default settings, then 100k rows
    python bench/leakage.py --sweep    # the same study over shingle size x threshold x min_words

Study: 5% of the test rows of the rotten-tomatoes sample are copied into train (some with case,
spacing or punctuation changed, so exact only after normalising) and another 5% are copied with
one or two small edits (a word substituted, inserted, deleted or swapped with its neighbour, or a
typo). Recall is the share of planted copies found, precision the share of flagged train~test rows
that were planted; "clean" counts what fires across the sample's own splits, which have exact repeats
removed. Numbers are averaged over 5 plantings (seeds 0-4).

Speed: 100,000 rows of real text (passages of 12-40 words cut from every text sample), split
80/10/10 with the same 5% + 5% planted, checked with the default settings; the time covers
normalising, shingling, MinHash, LSH and verification for all three split pairs and duplicates within
each split. Timings are wall-clock on whatever machine runs this (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tunesmith.config import ChecksConfig  # noqa: E402
from tunesmith.data.checks import check_rows, normalise  # noqa: E402
from tunesmith.data.sources import Split, read  # noqa: E402

EDITS = ("substitute", "insert", "delete", "swap", "typo")


def small_edit(text: str, rng: random.Random, vocab: list[str], n: int) -> str:
    """`n` word-level edits of the kinds in EDITS (each edit at one random position)."""
    words = text.split()
    for _ in range(n):
        kind, i = rng.choice(EDITS), rng.randrange(len(words))
        if kind == "substitute":
            words[i] = rng.choice(vocab)
        elif kind == "insert":
            words.insert(i, rng.choice(vocab))
        elif kind == "delete" and len(words) > 3:
            del words[i]
        elif kind == "swap" and i + 1 < len(words):
            words[i], words[i + 1] = words[i + 1], words[i]
        else:  # a typo: one letter replaced
            w = words[i]
            k = rng.randrange(len(w))
            words[i] = w[:k] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[k + 1:]
    return " ".join(words)


def cosmetic(text: str, rng: random.Random) -> str:
    """The same text as far as normalisation goes: case, spacing or punctuation changed."""
    return rng.choice([text, text.lower(), text.upper(), text.rstrip(".!?") + "!!", f"  {text}  "])


def plant(splits: dict[str, Split], seed: int, share: float = 0.05):
    """Copy `share` of test into train exactly and another `share` with small edits.
    Returns the leaky splits and the test row indices of each kind of copy."""
    rng = random.Random(seed)
    test = splits["test"].rows
    vocab = [w for r in splits["train"].rows[:3000] for w in r["text"].split()]
    order = list(range(len(test)))
    rng.shuffle(order)
    n = round(share * len(test))
    exact, edited = sorted(order[:n]), sorted(order[n:2 * n])
    extra = [{**test[j], "text": cosmetic(test[j]["text"], rng)} for j in exact]
    extra += [{**test[j], "text": small_edit(test[j]["text"], rng, vocab, rng.choice([1, 2]))} for j in edited]
    train = splits["train"]
    leaky = dict(splits, train=Split(train.rows + extra, train.source, None))
    return leaky, set(exact), set(edited)


def flagged(report, pair: str) -> dict[str, set[int]]:
    """Held-out row indices flagged per kind (exact, near) for one pair of splits."""
    out = {"exact": set(), "near": set()}
    for f in report.findings:
        if f.check == "leakage" and f.splits == pair:
            out[f.kind] |= set(f.rows)
    return out


def study(cfg: ChecksConfig, seeds=range(5)) -> dict:
    splits = read("sample:rotten-tomatoes")
    long = {j for j, r in enumerate(splits["test"].rows) if len(normalise(r["text"]).split()) >= cfg.leakage.min_words}
    rec_exact, rec_near, rec_long, precision = [], [], [], []
    for seed in seeds:
        leaky, exact, edited = plant(splits, seed)
        _, report = check_rows(leaky, cfg)
        got = flagged(report, "train~test")
        rec_exact.append(len(got["exact"] & exact) / len(exact))
        rec_near.append(len((got["exact"] | got["near"]) & edited) / len(edited))
        rec_long.append(len((got["exact"] | got["near"]) & edited & long) / len(edited & long))
        flagged_all = got["exact"] | got["near"]
        precision.append(len(flagged_all & (exact | edited)) / max(1, len(flagged_all)))
    _, clean = check_rows(splits, cfg)
    fires = [(f.splits, f.kind, f.count) for f in clean.findings if f.check == "leakage"]
    examples = [(e.get("similarity"), e["text"], e["other"]) for f in clean.findings if f.check == "leakage"
                for e in f.examples]  # the first `examples` of each finding
    return {"recall_exact": statistics.mean(rec_exact), "recall_edited": statistics.mean(rec_near),
            "recall_edited_min": min(rec_near), "recall_edited_long": statistics.mean(rec_long),
            "long_share": len(long) / len(splits["test"].rows), "precision": statistics.mean(precision),
            "clean_fires": fires, "clean_examples": examples}


def passages(seed: int = 0, n: int = 100_000) -> list[dict]:
    """`n` rows of real text: passages of 12-40 words cut from every text sample."""
    rng = random.Random(seed)
    words = []
    for name in ("newsgroups", "reuters-r8", "shakespeare", "wiki-demo", "c4-demo", "rotten-tomatoes"):
        for part in read(f"sample:{name}").values():
            for row in part.rows:
                words += row["text"].split()
    rows, at = [], 0
    while len(rows) < n and at < len(words):
        size = rng.randint(12, 40)
        rows.append({"text": " ".join(words[at:at + size])})
        at += size
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} passages in the samples")
    rng.shuffle(rows)
    a, b = int(0.8 * n), int(0.9 * n)
    return [Split(rows[:a], "train"), Split(rows[a:b], "validation"), Split(rows[b:], "test")]


def timing(cfg: ChecksConfig) -> dict:
    train, validation, test = passages()
    splits = {"train": train, "validation": validation, "test": test}
    leaky, exact, edited = plant(splits, 0)
    total = sum(len(s.rows) for s in leaky.values())
    start = time.perf_counter()
    _, report = check_rows(leaky, cfg)
    seconds = time.perf_counter() - start
    got = flagged(report, "train~test")
    return {"rows": total, "seconds": round(seconds, 1),
            "recall_exact": len(got["exact"] & exact) / len(exact),
            "recall_edited": len((got["exact"] | got["near"]) & edited) / len(edited),
            "findings": [f.message for f in report.findings]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", action="store_true", help="study shingle size x threshold x min_words")
    p.add_argument("--fine", action="store_true", help="with --sweep: a finer grid around the default")
    p.add_argument("--no-timing", action="store_true", help="skip the 100k-row timing")
    args = p.parse_args()
    default = ChecksConfig()
    settings = [(default.leakage.shingle, default.leakage.threshold, default.leakage.min_words)]
    if args.sweep:
        settings = [(k, t, m) for k in (1, 2, 3) for t in (0.4, 0.5, 0.6, 0.7) for m in (1, 8, 10)]
        if args.fine:
            settings = [(k, t, m) for k in (1, 2) for t in (0.5, 0.55, 0.6, 0.65, 0.7) for m in (9, 10, 12)]
    print("recall on planted copies (mean of 5 plantings; 'long': edited copies of texts with >= min_words words)")
    print(f"{'shingle':>7} {'thresh':>6} {'min_w':>5}  {'exact':>5} {'edited':>6} {'(min)':>5} {'long':>5} {'prec':>5}  "
          "fires on the clean splits")
    for k, t, m in settings:
        cfg = ChecksConfig(leakage={"shingle": k, "threshold": t, "min_words": m})
        r = study(cfg)
        fires = ", ".join(f"{s} {kind} {n}" for s, kind, n in r["clean_fires"]) or "nothing"
        print(f"{k:>7} {t:>6} {m:>5}  {r['recall_exact']:>5.2f} {r['recall_edited']:>6.2f} {r['recall_edited_min']:>5.2f} "
              f"{r['recall_edited_long']:>5.2f} {r['precision']:>5.2f}  {fires}", flush=True)
        if not args.sweep:
            for sim, a, b in r["clean_examples"]:
                print(f"    {sim}: {a!r} ~ {b!r}")
    if not args.no_timing:
        t = timing(default)
        print(f"\n{t['rows']:,d} rows (passages of real text), default settings: {t['seconds']} s "
              f"(exact recall {t['recall_exact']:.2f}, edited recall {t['recall_edited']:.2f})")
        for line in t["findings"]:
            print(f"  {line}")


if __name__ == "__main__":
    main()
