"""Row formats for generative data: detect a row's format and turn it into a conversation.

Every format documented in docs/formats.md (with an example row each) is read here, and only here:

  text               {"text"}                                  plain text, trained on whole
  prompt_completion  {"prompt", "completion"}                  strings, or lists of messages
  alpaca             {"instruction", "input"?, "output", "system"?, "history"?}
  sharegpt           {"conversations": [{"from", "value"}], "system"?}
  messages           {"messages": [{"role", "content"}]}      OpenAI style, system allowed
  preference         {"prompt", "chosen", "rejected"}          (for preference objectives)
  unpaired           {"prompt", "completion", "label"}         one answer, thumbs up (true) or down (false) (kto)
  sharegpt_preference {"conversations", "chosen": {"from", "value"}, "rejected": {...}}
  prompt             {"prompt"}                                a prompt alone (for ppo, which writes its answers)
  scored             {"prompt", "responses": [{"text", "score"}, ...]}   several scored answers per prompt

Preference objectives (reward, dpo) read pairs: a preference row is one pair; a scored row gives a
pair of its best answer with each strictly worse one (`scored_pairs`: ties give no pair, so a row
whose answers all score the same gives none).
KTO (dpo's `loss: kto`) reads unpaired rows; preference rows given to it are unpaired (`unpaired_rows`):
each pair becomes its chosen answer labelled true and its rejected answer labelled false.

A conversation is a list of `{"role": "system" | "user" | "assistant", "content": str}`; templates
(data/templates.py) render conversations, never raw rows, so every format trains and generates the
same way.
"""

from __future__ import annotations

from ..errors import DataError

Conversation = list[dict]

# Keys that identify each format, checked in this order (the first whose keys are all present wins).
SIGNATURES: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt_preference": ("conversations", "chosen", "rejected"),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
    "scored": ("prompt", "responses"),
    "unpaired": ("prompt", "completion", "label"),
    "prompt_completion": ("prompt", "completion"),
    "prompt": ("prompt",),
    "text": ("text",),
}
SFT_FORMATS = ("text", "prompt_completion", "alpaca", "sharegpt", "messages")
PREFERENCE_FORMATS = ("preference", "sharegpt_preference", "scored")
UNPAIRED_FORMATS = ("unpaired",) + PREFERENCE_FORMATS
"""What KTO trains on: unpaired rows, or preference rows unpaired."""
LABEL_WORDS = {"true": True, "false": False, "1": True, "0": False}

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "bot": "assistant", "chatgpt": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")
# Alpaca-style data often spells "no input" out instead of leaving the field empty.
EMPTY_INPUTS = {"", "no input", "<noinput>", "none", "n/a"}


class FormatError(ValueError):
    """A row does not fit a format; the message says why (turned into a DataError with the row's place)."""


def detect(row: dict) -> str | None:
    """The format whose identifying keys the row has, or None."""
    for name, keys in SIGNATURES.items():
        if all(k in row for k in keys):
            return name
    return None


def describe(formats=SIGNATURES) -> str:
    return "; ".join(f"{name} ({', '.join(SIGNATURES[name])})" for name in formats)


def row_error(part, i: int, fmt: str | None, why: str = "", allowed=SFT_FORMATS) -> DataError:
    """The error for row `i` of a split: its index, its place in the file, the keys it had."""
    row = part.rows[i]
    keys = ", ".join(map(str, row)) or "none"
    if fmt is None or detect(row) is None:
        head = f"row {i} fits no format" + (f" (expected {fmt}: {why})" if fmt else "")
    else:
        head = f"row {i} does not fit the {fmt} format: {why}"
    return DataError(f"{head}; its keys: {keys}", where=part.where(i),
                     hint=f"formats: {describe(allowed)}; rename columns with data.columns or set data.format")


def split_format(part, wanted: str, allowed=SFT_FORMATS) -> str:
    """The format of a split: `wanted` unless auto, else detected from its first row."""
    fmt = detect(part.rows[0]) if wanted == "auto" else wanted
    if fmt is None:
        raise row_error(part, 0, None, allowed=allowed)
    if fmt not in allowed:
        where = "data.format" if wanted != "auto" else part.where(0)
        columns = ", ".join(map(str, part.rows[0]))
        hint = ("preference rows are for preference objectives; map a response column with data.columns "
                "(e.g. {completion: chosen}) to fine-tune on it") if fmt in PREFERENCE_FORMATS else \
            ("unpaired rows (prompt, completion, label) are for objective dpo with loss: kto; set data.format: "
             "prompt_completion to fine-tune on every completion") if fmt == "unpaired" else \
            f"this objective needs preference pairs: {describe(allowed)}; name yours with data.columns " \
            "(e.g. {chosen: better, rejected: worse})"
        raise DataError(f"the rows are in the {fmt} format, which this objective does not train on "
                        f"(it reads: {', '.join(allowed)}); columns found: {columns}", where=where, hint=hint)
    return fmt


# ---------------------------------------------------------------------------------------------
# Rows -> conversations


def _text(value, what: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _message(m, i: int) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise FormatError(f"message {i} needs 'role' and 'content'")
    if m["role"] not in ROLES:
        raise FormatError(f"message {i} has role {m['role']!r}; roles: {', '.join(ROLES)}")
    return {"role": m["role"], "content": _text(m["content"], f"message {i} content")}


def _messages(value, what: str) -> Conversation:
    if not isinstance(value, list) or not value:
        raise FormatError(f"{what} must be a non-empty list of messages")
    return [_message(m, i) for i, m in enumerate(value)]


def _sharegpt_turn(t, i: int) -> dict:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise FormatError(f"turn {i} needs 'from' and 'value'")
    role = SHAREGPT_ROLES.get(str(t["from"]).lower())
    if role is None:
        raise FormatError(f"turn {i} is from {t['from']!r}; supported: {', '.join(SHAREGPT_ROLES)}")
    return {"role": role, "content": _text(t["value"], f"turn {i} value")}


def _with_system(row: dict, conv: Conversation) -> Conversation:
    system = row.get("system")
    if system and conv[0]["role"] != "system":
        return [{"role": "system", "content": _text(system, "system")}] + conv
    return conv


def _prompt_messages(prompt) -> Conversation:
    """A prompt is a string (one user turn) or a list of messages (trl's conversational format)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt, "prompt")


def _response(value, what: str) -> Conversation:
    """A response is a string, one message, or a list of messages ending with the assistant."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_sharegpt_turn(value, 0) if "from" in value else _message(value, 0)]
    return _messages(value, what)


def _alpaca(row: dict) -> Conversation:
    instruction = _text(row["instruction"], "instruction")
    extra = row.get("input")
    user = instruction if extra is None or str(extra).strip().lower() in EMPTY_INPUTS \
        else f"{instruction}\n\n{_text(extra, 'input')}"
    conv = []
    for j, pair in enumerate(row.get("history") or []):  # earlier turns, as [question, answer] pairs
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise FormatError(f"history item {j} must be a [question, answer] pair")
        conv += [{"role": "user", "content": _text(pair[0], "history question")},
                 {"role": "assistant", "content": _text(pair[1], "history answer")}]
    conv += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"], "output")}]
    return _with_system(row, conv)


def to_conversation(row: dict, fmt: str) -> Conversation | str:
    """The row as a conversation, or as a string for the `text` format. Raises FormatError."""
    missing = [k for k in SIGNATURES[fmt] if k not in row]
    if missing:
        raise FormatError(f"missing {', '.join(missing)}")
    if fmt == "text":
        return _text(row["text"], "text")
    if fmt == "prompt_completion":
        conv = _prompt_messages(row["prompt"]) + _response(row["completion"], "completion")
    elif fmt == "alpaca":
        return _alpaca(row)
    elif fmt == "sharegpt":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise FormatError("conversations must be a non-empty list of turns")
        conv = [_sharegpt_turn(t, i) for i, t in enumerate(turns)]
    elif fmt == "messages":
        conv = _messages(row["messages"], "messages")
    else:
        raise FormatError(f"{fmt} rows hold preferences, not one conversation")
    conv = _with_system(row, conv)
    if conv[-1]["role"] != "assistant":
        raise FormatError("the conversation must end with an assistant turn (the response to learn)")
    return conv


def to_preference(row: dict, fmt: str) -> tuple[Conversation, str, str]:
    """(prompt conversation, chosen response, rejected response) of a preference row. Raises FormatError."""
    missing = [k for k in SIGNATURES[fmt] if k not in row]
    if missing:
        raise FormatError(f"missing {', '.join(missing)}")
    if fmt == "preference":
        prompt = _prompt_messages(row["prompt"])
    elif fmt == "sharegpt_preference":
        turns = row["conversations"]
        if not isinstance(turns, list) or not turns:
            raise FormatError("conversations must be a non-empty list of turns")
        prompt = [_sharegpt_turn(t, i) for i, t in enumerate(turns)]
    else:
        raise FormatError(f"{fmt} rows hold one conversation, not a preference pair")
    answers = []
    for key in ("chosen", "rejected"):
        response = _response(row[key], key)
        if len(response) != 1 or response[0]["role"] != "assistant":
            raise FormatError(f"{key} must be one assistant response")
        answers.append(response[0]["content"])
    return _with_system(row, prompt), answers[0], answers[1]


def conversations(part, fmt: str) -> list[Conversation | str]:
    """Every row of a split as a conversation (or text), each failure reported with its row."""
    out = []
    for i, row in enumerate(part.rows):
        try:
            out.append(to_conversation(row, fmt))
        except FormatError as e:
            raise row_error(part, i, fmt, str(e)) from None
    return out


def scored_pairs(responses) -> list[tuple[str, str]]:
    """(chosen, rejected) pairs of a scored row: its best answer against every answer scored strictly lower.

    The best is the first of the highest score; ties with it give no pair (no preference to learn), so
    n answers give at most n - 1 pairs, all sharing the best answer. Raises FormatError.
    """
    if not isinstance(responses, list) or len(responses) < 2:
        raise FormatError("responses must be a list of at least two {text, score} answers")
    answers = []
    for i, r in enumerate(responses):
        if not isinstance(r, dict) or "text" not in r or "score" not in r:
            raise FormatError(f"response {i} needs 'text' and 'score'")
        if not isinstance(r["score"], (int, float)) or isinstance(r["score"], bool):
            raise FormatError(f"response {i} has score {r['score']!r}; scores are numbers")
        answers.append((_text(r["text"], f"response {i} text"), float(r["score"])))
    best, top = max(answers, key=lambda a: a[1])
    return [(best, text) for text, score in answers if score < top]


def preference_pairs(part, fmt: str) -> list[tuple[int, Conversation, str, str]]:
    """Every (row index, prompt conversation, chosen, rejected) of a split, each failure reported with its row."""
    out = []
    for i, row in enumerate(part.rows):
        try:
            if fmt == "scored":
                missing = [k for k in SIGNATURES[fmt] if k not in row]
                if missing:
                    raise FormatError(f"missing {', '.join(missing)}")
                prompt = _with_system(row, _prompt_messages(row["prompt"]))
                out += [(i, prompt, c, r) for c, r in scored_pairs(row["responses"])]
            else:
                out.append((i, *to_preference(row, fmt)))
        except FormatError as e:
            raise row_error(part, i, fmt, str(e), allowed=PREFERENCE_FORMATS) from None
    return out


def _label(value) -> bool:
    """An unpaired row's label: true/false (JSON booleans, 1/0, or the words, as CSV files spell them)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    raise FormatError(f"label must be true (a desirable answer) or false (an undesirable one), got {value!r}")


def unpaired_rows(part, fmt: str) -> list[tuple[int, Conversation, str, bool, int]]:
    """Every (row index, prompt conversation, answer, label, pair) of a split for KTO. Unpaired rows give
    themselves (pair -1); a preference row (or each pair of a scored row) gives two, its chosen answer labelled
    true and its rejected answer labelled false, which share a pair number (held-out pairs are then also
    compared pair by pair). Each failure is reported with its row."""
    if fmt != "unpaired":
        out = []
        for k, (i, prompt, chosen, rejected) in enumerate(preference_pairs(part, fmt)):
            out += [(i, prompt, chosen, True, k), (i, prompt, rejected, False, k)]
        return out
    out = []
    for i, row in enumerate(part.rows):
        try:
            missing = [k for k in SIGNATURES[fmt] if k not in row]
            if missing:
                raise FormatError(f"missing {', '.join(missing)}")
            response = _response(row["completion"], "completion")
            if len(response) != 1 or response[0]["role"] != "assistant":
                raise FormatError("completion must be one assistant response")
            prompt = _with_system(row, _prompt_messages(row["prompt"]))
            out.append((i, prompt, response[0]["content"], _label(row["label"]), -1))
        except FormatError as e:
            raise row_error(part, i, fmt, str(e), allowed=UNPAIRED_FORMATS) from None
    return out
