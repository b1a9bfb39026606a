"""Base vs tuned, side by side: both models answer the same held-out prompts, rendered by the tuned
run's template, and are scored on them (loss of the reference answers, ROUGE / exact match, stop
rate). The report is written as markdown and as HTML (all text escaped), plus JSON for tools.

`tunesmith compare BASE RUN --data FILE` calls `compare`; an sft run writes the same report for its
test prompts at the end of training (`write_report`).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from ..axes import better, metric_directions
from ..errors import TunesmithError



def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def _prompt_text(messages: list[dict]) -> str:
    """A conversation as readable text: the last user turn, earlier turns labelled by role."""
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _md_block(text: str) -> str:
    fence = "````" if "```" in text else "```"
    return f"{fence}text\n{text}\n{fence}"


def render_markdown(title: str, names: tuple[str, str], scores: tuple[dict, dict], rows: list[dict]) -> str:
    base_name, tuned_name = names
    lines = [f"# {title}", "", f"- base: `{base_name}`", f"- tuned: `{tuned_name}`", f"- prompts: {len(rows)}", "",
             "| metric | base | tuned |", "|---|---|---|"]
    for key in scores[1]:
        lines.append(f"| {key} | {_fmt(scores[0].get(key))} | {_fmt(scores[1][key])} |")
    for i, row in enumerate(rows, 1):
        lines += ["", f"## {i}", "", "**prompt**", "", _md_block(_prompt_text(row["messages"]))]
        if row.get("reference") is not None:
            lines += ["", "**reference**", "", _md_block(row["reference"])]
        for side in ("base", "tuned"):
            stop = "" if row[f"{side}_stopped"] else " (did not stop)"
            lines += ["", f"**{side}**{stop}", "", _md_block(row[side])]
    return "\n".join(lines) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:110em}
table{border-collapse:collapse;margin-bottom:2em}td,th{border:1px solid #ccc;padding:.4em .6em;vertical-align:top}
td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.85em;width:25%}
.better{font-weight:bold}.nostop{color:#a00;font-size:.8em}"""


def render_html(title: str, names: tuple[str, str], scores: tuple[dict, dict], rows: list[dict],
                directions: dict) -> str:
    """`directions`: metric -> "max", "min" or None (the objective's); the tuned score that is better is bold."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{_CSS}</style>",
           f"</head><body><h1>{e(title)}</h1><p>base: <code>{e(names[0])}</code><br>tuned: <code>{e(names[1])}</code>"
           f"<br>prompts: {len(rows)}</p><table><tr><th>metric</th><th>base</th><th>tuned</th></tr>"]
    for key, tuned in scores[1].items():
        base = scores[0].get(key)
        won = isinstance(base, float) and isinstance(tuned, float) and better(directions.get(key), tuned, base)
        out.append(f"<tr><td>{e(key)}</td><td>{e(_fmt(base))}</td>"
                   f"<td{' class=better' if won else ''}>{e(_fmt(tuned))}</td></tr>")
    out.append("</table><table><tr><th>#</th><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>")
    for i, row in enumerate(rows, 1):
        cells = [_prompt_text(row["messages"]), row.get("reference") or ""]
        out.append(f"<tr><td>{i}</td>" + "".join(f"<td class=text>{e(c)}</td>" for c in cells))
        for side in ("base", "tuned"):
            note = "" if row[f"{side}_stopped"] else "<div class=nostop>did not stop</div>"
            out.append(f"<td class=text>{e(row[side])}{note}</td>")
        out.append("</tr>")
    out.append("</table></body></html>")
    return "\n".join(out) + "\n"


def side_by_side(items: list[dict], base_gens, tuned_gens) -> list[dict]:
    return [{"messages": it["messages"], "reference": it.get("reference"),
             "base": b.text, "base_stopped": b.stopped, "base_tokens": b.tokens,
             "tuned": t.text, "tuned_stopped": t.stopped, "tuned_tokens": t.tokens}
            for it, b, t in zip(items, base_gens, tuned_gens)]


def write_report(folder: Path, title: str, names: tuple[str, str], scores: tuple[dict, dict], rows: list[dict],
                 directions: dict, stem: str = "compare", extra: dict | None = None) -> list[Path]:
    """compare.md, compare.html and compare.json in `folder`; `directions` as in `render_html`; `extra`: more
    keys for compare.json (e.g. train_overlap)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{stem}.{ext}" for ext in ("md", "html", "json")]
    paths[0].write_text(render_markdown(title, names, scores, rows), encoding="utf-8")
    paths[1].write_text(render_html(title, names, scores, rows, directions), encoding="utf-8")
    paths[2].write_text(json.dumps({"base": names[0], "tuned": names[1], "scores": {"base": scores[0],
                                    "tuned": scores[1]}, **(extra or {}), "rows": rows}, indent=1,
                                   ensure_ascii=False) + "\n",
                        encoding="utf-8")
    return paths


def _same_vocabulary(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def compare(base_ref: str, run_ref: str, data: str, split: str = "test", prompts: int | None = None,
            max_new_tokens: int | None = None, out: Path | None = None, batch_size: int = 8,
            trust_remote_code: bool = False, allow_train_overlap: bool = False) -> tuple[Path, dict]:
    """Generate with base and tuned model on the same prompts from `data`, score both, write the report. Rows the
    run trained on are left out before the first `prompts` rows are taken (kept, with a warning, with
    `allow_train_overlap`); the scores' `train_overlap` says how many."""
    from ..data.formats import split_format
    from ..data.load import rename_columns
    from ..data.sources import Split, read
    from ..trained import load_trained
    from . import overlap
    from .generation import evaluate_generation
    from .score import evaluate

    tuned = load_trained(run_ref, trust_remote_code=trust_remote_code)
    if (tuned.cfg is None or tuned.chat is None or tuned.chat.template is None
            or not hasattr(tuned.objective, "GENERATION_METRICS")):
        raise TunesmithError(f"{run_ref} is not a finished run of a chat-templated causal LM (an sft run)",
                             hint="compare needs prompts and answers: train with objective: sft")
    base = load_trained(base_ref, head="causal-lm", trust_remote_code=trust_remote_code)
    if not _same_vocabulary(base.tokenizer, tuned.tokenizer):
        raise TunesmithError(f"{base_ref} and {run_ref} use different tokenizers, so they cannot be given the same "
                             "prompts", hint="compare a run with the model it was tuned from")
    found = read(data)
    where = data
    if isinstance(found, dict):
        where = f"{data} ({split})"
        if split not in found:
            raise TunesmithError(f"{data} has no {split} split (found: {', '.join(found)})")
        found = found[split]
    assert isinstance(found, Split)
    part = rename_columns(found, {k: v for k, v in tuned.data_cfg.columns.items() if v in found.columns()})
    part, train_overlap = overlap.apply(overlap.find(tuned, part), part, allow_train_overlap, run_ref, data)
    if prompts is not None:
        part = part.subset(list(range(min(prompts, len(part.rows)))))
    if split_format(part, tuned.data_cfg.format) == "text":
        raise TunesmithError(f"{data} holds plain text; compare needs prompts with reference answers",
                             hint="see docs/formats.md")
    # prepared as the run prepared its data: same template, and over-long prompts shortened the same way
    objective = tuned.objective
    prepared = objective.prepare({split: part}, tuned.tokenizer, tuned.obj_cfg, tuned.data_cfg)
    items = prepared.prompts[split]
    settings = tuned.generate  # the run's generation settings, so compare repeats what training measured
    if max_new_tokens is not None:
        settings = settings.model_copy(update={"max_new_tokens": max_new_tokens})
    seed = tuned.cfg.train.seed
    pad = tuned.tokenizer.pad_token_id
    scores, generations = [], []
    for trained in (base, tuned):
        s = evaluate(trained.model, objective, tuned.obj_cfg, prepared.examples[split], batch_size, pad, None, split)
        g_scores, gens = evaluate_generation(trained.model, tuned.chat, items, settings, seed)
        scores.append({**s, **g_scores})
        generations.append(gens)
    rows = side_by_side(items, *generations)
    folder = out or Path(run_ref) / "compare"
    title = f"{Path(run_ref).name}: base vs tuned on {where}"
    facts = {"train_overlap": train_overlap} if train_overlap is not None else {}
    write_report(folder, title, (base_ref, run_ref), (scores[0], scores[1]), rows, metric_directions(objective),
                 extra=facts)
    return folder, {"base": scores[0], "tuned": scores[1], **facts}
