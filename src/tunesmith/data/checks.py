"""Data checks on the rows of every split, run before anything trains (and by `tunesmith check`).

  leakage      train against validation and test, and validation against test: exact copies after
               normalising case, punctuation and spacing, and near copies (MinHash LSH over word
               shingles, from datasketch, each candidate pair verified by its exact Jaccard
               similarity); for instruction and preference rows the prompt side is compared alone too
  duplicates   exact and near copies inside one split
  empty        rows whose text is blank
  truncation, label balance   read from the data card after tokenizing (`check_card`)

Each finding has a policy: `error` refuses to train, `warn` reports, `drop` removes rows and records
how many. Dropping takes the copies out of train (out of validation for validation~test overlap), so
the test split, the measure every run is compared by, never changes.

Rows are compared through `comparable_texts(row)`, which names the texts of a row that must not
reappear elsewhere: the whole example (`text`) and, where the row has one, its prompt (`prompt`).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from ..errors import DataError

SPLIT_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))
"""Held-out leakage is checked for these pairs; a `drop` removes rows from the first split of a pair."""

PROMPT_KEYS = ("prompt", "instruction", "question", "query")
"""Columns holding the prompt side of a row (alpaca's `input` is added to `instruction`)."""
RESPONSE_KEYS = ("completion", "output", "response", "answer", "chosen", "rejected", "responses")
"""Columns holding the response side (preference rows have two: chosen and rejected; scored rows a list)."""
CONVERSATION_KEYS = ("messages", "conversations")
"""Columns holding a list of turns ({role, content} or sharegpt's {from, value})."""
ASSISTANT_ROLES = ("assistant", "gpt", "model", "bot")


def normalise(text: str) -> str:
    """The text key used to call two rows the same: case, punctuation and spacing folded."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


# ---------------------------------------------------------------------------------------------
# What of a row is compared


def _content(value) -> str:
    """Plain text of a cell: a string, a turn ({content} / {value}), a scored answer ({text}), or a list of them."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return _content(value.get("content", value.get("value", value.get("text", ""))))
    if isinstance(value, (list, tuple)):
        return "\n".join(t for t in (_content(v) for v in value) if t)
    return str(value)


def _role(turn) -> str:
    return str(turn.get("role", turn.get("from", ""))).lower() if isinstance(turn, dict) else ""


def comparable_texts(row: dict) -> dict[str, str]:
    """The texts of a row that leakage is judged on: `text` (the whole example) and, for instruction,
    chat and preference rows, `prompt` (what the model is asked, without the answer).

    Plain rows: `text` (+ `text_pair`). Instruction rows: `prompt`/`instruction` (+ `input`) with
    `completion`/`output`/`response`/`answer`. Chat rows: `messages` or `conversations`, the prompt
    being every turn before the last assistant turn. Preference rows: a prompt (or conversation) with
    `chosen` and `rejected`. A row with none of these columns gives {} and is left to the objective
    to report.
    """
    prompt = None
    for key in PROMPT_KEYS:
        if key in row:
            prompt = _content(row[key])
            if key == "instruction" and row.get("input"):
                prompt = f"{prompt}\n{_content(row['input'])}"
            break
    responses = [_content(row[k]) for k in RESPONSE_KEYS if k in row]
    for key in CONVERSATION_KEYS:
        if key in row and isinstance(row[key], list):
            turns = row[key]
            if not responses:  # a chat row: the last assistant turn is the answer
                last = max((i for i, t in enumerate(turns) if _role(t) in ASSISTANT_ROLES), default=None)
                if last is not None:
                    responses = [_content(turns[last])]
                    turns = turns[:last]
            prompt = _content(turns) if prompt is None else f"{prompt}\n{_content(turns)}"
            break
    if prompt is not None:
        return {"text": "\n".join([prompt, *responses]), "prompt": prompt}
    if "text" in row:
        text = _content(row["text"])
        if row.get("text_pair") is not None:
            text = f"{text}\n{_content(row['text_pair'])}"
        return {"text": text}
    return {}


# ---------------------------------------------------------------------------------------------
# Near copies: word shingles -> MinHash -> LSH candidates -> exact Jaccard


def shingles(normalised: str, size: int) -> frozenset[int]:
    """Hashes of the `size`-word windows of a normalised text (the whole text if it is shorter)."""
    import xxhash

    words = normalised.split()
    if not words:
        return frozenset()
    n = max(1, len(words) - size + 1)
    return frozenset(xxhash.xxh32_intdigest(" ".join(words[i:i + size]).encode()) for i in range(n))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a or not b:
        return 0.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _identity(x):
    return x


def signatures(sets: list[frozenset], num_perm: int) -> list:
    """MinHash signatures of shingle sets (datasketch; the shingles are already 32-bit hashes, so
    datasketch only permutes them)."""
    from datasketch import LeanMinHash, MinHash

    return [LeanMinHash(m) for m in MinHash.generator(sets, num_perm=num_perm, seed=1, hashfunc=_identity)]


class NearIndex:
    """An LSH index over shingle sets: `add` rows, then `matches` finds those at or above the threshold.

    LSH gives candidates (some pairs below the threshold, a few above it missed, as its banding
    trades off); every candidate is verified on its shingle sets, so reported similarities are exact
    Jaccard similarities (of the shingles' 32-bit hashes) and no pair below the threshold is reported.
    """

    def __init__(self, threshold: float, num_perm: int):
        from datasketch import MinHashLSH

        self.threshold, self.num_perm = threshold, num_perm
        # Missing a leak costs more than verifying a few extra candidates: weigh false negatives up.
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.3, 0.7))
        self.sets: dict[int, frozenset] = {}

    def add(self, key: int, sig, shingle_set: frozenset) -> None:
        self.lsh.insert(key, sig, check_duplication=False)
        self.sets[key] = shingle_set

    def matches(self, sig, shingle_set: frozenset, first: bool = False) -> list[tuple[int, float]]:
        """Indexed keys whose exact Jaccard with `shingle_set` reaches the threshold (`first`: stop at one)."""
        found = []
        for key in sorted(self.lsh.query(sig)):
            sim = jaccard(shingle_set, self.sets[key])
            if sim >= self.threshold:
                found.append((key, sim))
                if first:
                    break
        return found


# ---------------------------------------------------------------------------------------------
# Findings and the report


@dataclass
class Finding:
    """One thing a check found: how many rows, under which policy, and a few examples."""

    check: str
    """leakage, duplicates, empty, truncation or label-balance."""
    message: str
    """One line for people: what, how many, where."""
    policy: str
    """error, warn or drop."""
    count: int = 0
    """Rows affected (for leakage: rows of the held-out split that have a copy in the other)."""
    kind: str = ""
    """exact or near (leakage and duplicates)."""
    view: str = ""
    """text (the whole example) or prompt (the prompt side alone)."""
    splits: str = ""
    """The split, or the pair of splits, e.g. train~test."""
    dropped: int = 0
    """Rows removed under the drop policy."""
    examples: list[dict] = field(default_factory=list)
    rows: list[int] = field(default_factory=list, repr=False)
    """Indices of the affected rows (of the held-out split, for leakage); kept out of the data card."""


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    """Rows removed per split."""
    trained: dict | None = field(default=None, repr=False)
    """The rows that train on, after drops (`trained_rows`): kept in the run folder so that scoring data later
    can leave them out."""

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.policy == "error"]

    def to_dict(self) -> dict:
        return {"ok": not self.errors(), "dropped": dict(self.dropped),
                "findings": [{k: v for k, v in asdict(f).items() if k != "rows"} for f in self.findings]}

    def render(self) -> str:
        if not self.findings:
            return "data checks: nothing found"
        lines = ["data checks"]
        for f in self.findings:
            mark = {"error": "ERROR", "warn": "warn ", "drop": "drop "}[f.policy]
            lines.append(f"  {mark} {f.message}")
            for ex in f.examples:
                sim = f" (similarity {ex['similarity']:.2f})" if "similarity" in ex else ""
                if "other" in ex:
                    lines.append(f"          {ex['where']}: {ex['text']!r}")
                    lines.append(f"        ~ {ex['other_where']}: {ex['other']!r}{sim}")
                else:
                    lines.append(f"          {ex['where']}: {ex['text']!r}")
        return "\n".join(lines)


class DataCheckError(DataError):
    """A data check whose policy is `error` found something."""


def raise_for_errors(report: Report) -> None:
    """Refuse to go on when a check under the `error` policy found something."""
    errors = report.errors()
    if not errors:
        return
    what = "; ".join(f.message for f in errors)
    keys = sorted({_policy_key(f) for f in errors})
    raise DataCheckError(
        f"data checks failed: {what}",
        where=", ".join(keys),
        hint=f"look at the examples above; to go on, set {' / '.join(keys)} to drop (remove the copies "
             f"from train) or warn (train anyway); `tunesmith check CONFIG` runs only these checks",
    )


def _policy_key(f: Finding) -> str:
    if f.check == "leakage":
        return f"data.checks.leakage.{f.kind}"
    return f"data.checks.{f.check}"


def _short(text: str, n: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Row checks: empty rows, leakage between splits, duplicates within a split


class _Rows:
    """The comparable texts of every split, their normalised keys, and shingle sketches on demand."""

    def __init__(self, splits: dict, leak):
        self.splits, self.leak = splits, leak
        self.texts = {n: [comparable_texts(r) for r in part.rows] for n, part in splits.items()}
        self.keys = {n: [{v: normalise(t) for v, t in row.items()} for row in rows] for n, rows in self.texts.items()}
        self._sketches: dict[tuple[str, str], tuple[list, list]] = {}
        self._indexes: dict[tuple[str, str], tuple[NearIndex, dict]] = {}

    def views(self) -> list[str]:
        found = {v for rows in self.keys.values() for k in rows for v in k}
        return [v for v in ("text", "prompt") if v in found]

    def sketch(self, name: str, view: str) -> tuple[list, list]:
        """Shingle sets and MinHash signatures of one split's view."""
        if (name, view) not in self._sketches:
            # too few words for similarity to mean anything: such texts are compared exactly only
            sets = [shingles(t, self.leak.shingle) if len(t.split()) >= self.leak.min_words else frozenset()
                    for t in (k.get(view, "") for k in self.keys[name])]
            self._sketches[name, view] = (sets, signatures(sets, self.leak.num_perm))
        return self._sketches[name, view]

    def index(self, name: str, view: str) -> tuple[NearIndex, dict[str, list[int]]]:
        """An LSH index of one split's view (one entry per distinct text), and each text's rows."""
        if (name, view) not in self._indexes:
            sets, sigs = self.sketch(name, view)
            near, rows = NearIndex(self.leak.threshold, self.leak.num_perm), defaultdict(list)
            for i, k in enumerate(self.keys[name]):
                if sets[i]:
                    if k[view] not in rows:
                        near.add(i, sigs[i], sets[i])
                    rows[k[view]].append(i)
            self._indexes[name, view] = (near, rows)
        return self._indexes[name, view]

    def example(self, split, i, view, other_split=None, j=None, sim=None) -> dict:
        ex = {"where": self.splits[split].where(i), "text": _short(self.texts[split][i][view])}
        if other_split is not None:
            ex.update(other_where=self.splits[other_split].where(j), other=_short(self.texts[other_split][j][view]))
        if sim is not None:
            ex["similarity"] = round(sim, 3)
        return ex


def check_rows(splits: dict, cfg) -> tuple[dict, Report]:
    """Run the row checks of `cfg` (a ChecksConfig) on the splits; returns the splits after any
    `drop` policy, and the report. Nothing is raised here: see `raise_for_errors`."""
    rows, report, drop = _Rows(splits, cfg.leakage), Report(), defaultdict(set)
    if cfg.empty != "off":
        _empty(rows, cfg, report, drop)
    for a, b in SPLIT_PAIRS:
        if a in splits and b in splits:
            caught: set[int] = set()  # held-out rows already reported (on the whole text, or exactly)
            for view in rows.views():
                for kind in ("exact", "near"):
                    if getattr(cfg.leakage, kind) != "off":
                        caught |= _leakage(rows, a, b, view, kind, caught, report, drop)
    if cfg.duplicates != "off":
        for name in splits:
            _duplicates(rows, name, cfg, report, drop)

    out = dict(splits)
    for name, removed in drop.items():
        if removed:
            out[name] = splits[name].subset([i for i in range(len(splits[name].rows)) if i not in removed])
            report.dropped[name] = len(removed)
            if not out[name].rows:
                raise DataError(f"the data checks' drop policy removed every row of {name}",
                                where="data.checks", hint="look at the report above; the data is mostly copies")
    report.trained = trained_rows([out[n] for n in TRAINED_SPLITS if n in out])
    return out, report


# ---------------------------------------------------------------------------------------------
# The rows a run trained on, as digests: what `tunesmith eval` / `compare` leave out of the data they score

TRAINED_SPLITS = ("train", "replay")
"""Splits whose rows a run trains on (replay rows join train)."""
DIGEST = "blake2b-64 of the normalised view"


def digest(key: str) -> bytes:
    """8 bytes that stand for a normalised text (a collision among a million rows has odds of about 1 in 10^7)."""
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


def trained_rows(parts: list) -> dict:
    """The digests of every view (`comparable_texts`) of the rows in `parts`, for the run folder's train_rows.json:
    {"digest": ..., "rows": n, "views": {"text": base64 of 8 bytes per distinct text, "prompt": ...}}."""
    views: dict[str, set[bytes]] = defaultdict(set)
    rows = 0
    for part in parts:
        for row in part.rows:
            rows += 1
            for view, text in comparable_texts(row).items():
                if normalise(text):
                    views[view].add(digest(normalise(text)))
    return {"digest": DIGEST, "rows": rows,
            "views": {v: base64.b64encode(b"".join(sorted(d))).decode("ascii") for v, d in views.items()}}


def record_digests(record: dict) -> dict[str, set[bytes]]:
    """train_rows.json's views back as sets of digests."""
    out = {}
    for view, text in (record.get("views") or {}).items():
        raw = base64.b64decode(text)
        out[view] = {raw[i:i + 8] for i in range(0, len(raw), 8)}
    return out


def trained_on(record: dict, part) -> list[int]:
    """Rows of `part` with a view (the whole example, or its prompt) that is, after normalising, the same view of
    a row the record's run trained on: the exact-copy check of training, against digests."""
    seen = record_digests(record)
    return [i for i, row in enumerate(part.rows)
            if any(normalise(t) and digest(normalise(t)) in seen.get(v, ()) for v, t in comparable_texts(row).items())]


def near_copies(train, part, leak) -> list[int]:
    """Rows of `part` with an exact or near copy in the split `train`, found by the training checks' own leakage
    check (`leak`: a LeakageConfig) with both policies at warn."""
    from .config import ChecksConfig

    cfg = ChecksConfig(leakage=leak.model_copy(update={"exact": "warn", "near": "warn"}), duplicates="off",
                       empty="off")
    _, report = check_rows({"train": train, "test": part}, cfg)
    return sorted({i for f in report.findings if f.check == "leakage" for i in f.rows})


def _empty(rows: _Rows, cfg, report: Report, drop) -> None:
    """Rows whose text is blank: nothing to learn from or to score."""
    for name in rows.splits:
        empty = [i for i, k in enumerate(rows.keys[name]) if k and not k["text"]]
        if not empty:
            continue
        if cfg.empty == "drop":
            drop[name].update(empty)
        report.findings.append(Finding(
            "empty", f"{len(empty)} empty rows in {name}", cfg.empty, len(empty), splits=name,
            dropped=len(empty) if cfg.empty == "drop" else 0,
            examples=[{"where": rows.splits[name].where(i), "text": ""} for i in empty[:cfg.leakage.examples]],
            rows=empty))


def _leakage(rows: _Rows, a: str, b: str, view: str, kind: str, skip: set[int], report: Report, drop) -> set[int]:
    """Rows of held-out split `b` whose `view` has an exact or near copy in `a`; returns them."""
    leak = rows.leak
    policy = getattr(leak, kind)
    hits: list[tuple[int, list[tuple[int, float]]]] = []  # (row of b, [(row of a, similarity)])
    if kind == "exact":
        by_key = _rows_by_key(rows.keys[a], view)
        for j, k in enumerate(rows.keys[b]):
            if j not in skip and k.get(view) and k[view] in by_key:
                hits.append((j, [(i, 1.0) for i in by_key[k[view]]]))
    else:
        near, by_key = rows.index(a, view)
        sets_b, sigs_b = rows.sketch(b, view)
        for j in range(len(rows.keys[b])):
            if j not in skip and sets_b[j]:
                found = near.matches(sigs_b[j], sets_b[j])
                if found:  # every row of `a` with a matching text
                    hits.append((j, [(r, sim) for i, sim in found for r in by_key[rows.keys[a][i][view]]]))
    if not hits:
        return set()
    involved = sorted({i for _, found in hits for i, _ in found})
    if policy == "drop":
        drop[a].update(involved)
    side = "prompt" if view == "prompt" else "text"
    how = "exact copies after normalising case, punctuation and spacing" if kind == "exact" \
        else f"near copies, word-shingle Jaccard >= {leak.threshold}"
    message = f"{len(hits)} {b} rows have their {side} in {a} ({how}; {len(involved)} {a} rows involved)"
    best = [(j, max(found, key=lambda f: f[1])) for j, found in hits[:leak.examples]]
    report.findings.append(Finding(
        "leakage", message, policy, len(hits), kind, view, f"{a}~{b}", len(involved) if policy == "drop" else 0,
        [rows.example(b, j, view, a, i, None if kind == "exact" else sim) for j, (i, sim) in best],
        [j for j, _ in hits]))
    return {j for j, _ in hits}


def _rows_by_key(keys: list[dict], view: str) -> dict[str, list[int]]:
    by_key = defaultdict(list)
    for i, k in enumerate(keys):
        if k.get(view):
            by_key[k[view]].append(i)
    return by_key


def _duplicates(rows: _Rows, name: str, cfg, report: Report, drop) -> None:
    """Later rows of a split that copy an earlier row of it, exactly or nearly (whole text only)."""
    first: dict[str, int] = {}
    exact = []
    for i, k in enumerate(rows.keys[name]):
        if k.get("text"):
            if k["text"] in first:
                exact.append((i, first[k["text"]], None))
            else:
                first[k["text"]] = i
    near_dups = []
    if len(first) > 1 and rows.leak.near != "off":
        sets, sigs = rows.sketch(name, "text")
        near = NearIndex(rows.leak.threshold, rows.leak.num_perm)
        for i in first.values():  # first copies, in order: each is compared with the earlier ones kept
            if sets[i]:
                found = near.matches(sigs[i], sets[i], first=True)
                if found:
                    near_dups.append((i, *found[0]))
                else:
                    near.add(i, sigs[i], sets[i])
    # held-out splits are never changed by a duplicate drop: their copies are only reported
    policy = cfg.duplicates if cfg.duplicates != "drop" or name == "train" else "warn"
    for kind, dups in (("exact", exact), ("near", near_dups)):
        if not dups:
            continue
        if policy == "drop":
            drop[name].update(d[0] for d in dups)
        what = "exact copies" if kind == "exact" else f"near copies (similarity >= {rows.leak.threshold})"
        report.findings.append(Finding(
            "duplicates", f"{len(dups)} rows of {name} are {what} of earlier {name} rows", policy, len(dups),
            kind, "text", name, len(dups) if policy == "drop" else 0,
            [rows.example(name, i, "text", name, j, sim) for i, j, sim in dups[:rows.leak.examples]],
            [d[0] for d in dups]))


# ---------------------------------------------------------------------------------------------
# Card checks: after tokenizing


def check_card(card: dict, cfg, max_length: int) -> list[Finding]:
    """Truncation and label balance, read from the data card (warnings: they never stop a run)."""
    found = []
    for name in ("train", "validation", "test"):
        info = card.get(name)
        if not info or not info.get("rows"):
            continue
        share = info["truncated"] / info["rows"]
        if share > cfg.truncation:
            found.append(Finding(
                "truncation", f"{info['truncated']} of {info['rows']} {name} examples ({share:.0%}) are cut at "
                f"data.max_length={max_length} (p95 length {info['tokens']['p95']}); raise data.max_length "
                f"to keep their ends", "warn", info["truncated"], splits=name))
    balance = (card.get("train") or {}).get("label_balance")
    if balance:
        counts = sorted(balance.values())
        if counts[0] and counts[-1] / counts[0] > cfg.label_imbalance:
            rare = min(balance, key=balance.get)
            common = max(balance, key=balance.get)
            found.append(Finding(
                "label-balance", f"train labels are imbalanced: {common!r} has {balance[common]} rows, {rare!r} "
                f"{balance[rare]} ({balance[common] / balance[rare]:.0f}x); watch macro_f1 rather than accuracy",
                "warn", balance[rare], splits="train"))
        for name in ("validation", "test"):
            seen = (card.get(name) or {}).get("label_balance")
            if seen is not None:
                missing = [k for k in balance if k not in seen]
                if missing:
                    found.append(Finding(
                        "label-balance", f"{name} has no rows of label(s) {', '.join(map(repr, missing))}; its "
                        f"scores say nothing about them", "warn", len(missing), splits=name))
    return found
