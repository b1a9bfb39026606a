"""One fine-tuning run, top to bottom:

config -> data (read, split, replay rows, checks, tokenize, data card) -> probe text -> run folder
       -> model (load, tune) -> base scores, probe before, penalty anchor -> train
       -> evaluate, probe after, diagnosis -> artifacts (weights, summary)

Objectives that generate (sft) also have base and tuned model answer held-out prompts once, before
and after training, for generation metrics and a side-by-side report (compare.md / .html).

An objective that owns its step (ppo, grpo: rollouts, rewards, several updates per batch) trains in its own
loop (train/ppo.py, train/grpo.py); `_train_rl` below is its evaluate-train-evaluate-save, beside the supervised
one.

Everything that can be wrong with the input is checked before the run folder is touched (the data
checks included: leakage under the `error` policy refuses here), so a bad config or bad data never
leaves a folder that looks like a run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import set_seed

from . import artifacts, distilling, envs, scorers
from .axes import metric_directions
from .build import (apply_tuning, check_before_loading, enable_gradient_checkpointing, load_base,
                    precision_and_dtype)
from .config import RunConfig, dump
from .data.batches import train_batches
from .data.checks import Report, check_card, check_rows, raise_for_errors
from .data.load import load_splits
from .evaluate import forgetting
from .evaluate.compare import side_by_side, write_report
from .evaluate.diagnose import diagnose, read_history, update_size
from .evaluate.generation import Generation, evaluate_generation
from .evaluate.score import evaluate
from .models.load import load_tokenizer
from .models.params import count_parameters, format_parameters
from .objectives import OBJECTIVES
from .objectives.distill import Distilled
from .objectives.lm import check_packing
from .regimes import REGIMES
from .report import html, trackers
from .errors import TunesmithError
from .train import grpo, ppo, rollout
from .train.checkpoint import trainable_state
from .train.loop import fit
from .tuning import TUNINGS


RL_LOOPS = {loop.OBJECTIVE: loop for loop in (ppo, grpo)}
"""The loop of each objective that owns its step (rollouts and updates), by its objective module."""


def prepare_data(cfg: RunConfig, tokenizer):
    """Splits (plus the regime's replay rows) -> data checks -> tokenized examples and the data card.

    Returns (prepared, report); the caller decides what a failed check means (see `raise_for_errors`).
    Replay rows are checked and tokenized as their own split, then join train.
    """
    objective, regime = OBJECTIVES[cfg.objective.kind], REGIMES[cfg.regime.kind]
    if hasattr(regime, "prepare"):  # a regime over several tasks reads, checks and tokenizes each task's data
        return regime.prepare(cfg, tokenizer)
    made = getattr(objective, "make_splits", None)  # an environment's episodes instead of data rows
    splits = (made(cfg.objective, cfg.data) if made else None) or load_splits(cfg.data, cfg.train.seed)
    splits.update(regime.extra_splits(cfg.regime, len(splits["train"].rows), cfg.train.seed))
    splits, report = check_rows(splits, cfg.data.checks)
    prepared = objective.prepare(splits, tokenizer, cfg.objective, cfg.data)
    report.findings += check_card(prepared.card, cfg.data.checks, cfg.data.max_length)
    prepared.card["checks"] = report.to_dict()
    if "replay" in prepared.examples:
        prepared.examples["train"] = prepared.examples["train"] + prepared.examples.pop("replay")
    return prepared, report


def check_data(cfg: RunConfig) -> Report:
    """`tunesmith check`: the data checks alone (reads the tokenizer, not the model)."""
    cfg = distilling.student_config(cfg)  # keep_layers: the teacher's tokenizer, as train reads it
    tokenizer = load_tokenizer(cfg.model)
    prepared, report = prepare_data(cfg, tokenizer)
    print_card(prepared.card)
    print(report.render())
    raise_for_errors(report)
    return report


def generation_items(cfg: RunConfig, objective, prepared) -> list[dict]:
    """The test prompts answered for generation metrics (none if the objective does not generate)."""
    if not hasattr(objective, "GENERATION_METRICS") or prepared.chat is None or prepared.chat.template is None:
        return []
    return prepared.prompts.get("test", [])[:cfg.eval.generate.prompts]


def answer_prompts(model, chat, items: list[dict], cfg: RunConfig, say, who: str):
    """Generation metrics on the test prompts: (scores, answers, seconds taken)."""
    say(f"{who} model answering {len(items)} test prompts ...")
    tick = time.perf_counter()
    scores, answers = evaluate_generation(model, chat, items, cfg.eval.generate, cfg.train.seed)
    return scores, answers, round(time.perf_counter() - tick, 1)


def params_summary(trainable: int, total: int) -> dict:
    return {"trainable": trainable, "total": total, "trainable_pct": round(100 * trainable / total, 4)}


def checks_summary(report: Report) -> dict:
    """The data checks for summary.json (the example rows stay in the data card)."""
    return {"ok": not report.errors(), "dropped": dict(report.dropped),
            "findings": [{k: v for k, v in f.items() if k != "examples"} for f in report.to_dict()["findings"]]}


def chat_summary(chat) -> dict:
    """How the model is prompted, so inference renders as training did."""
    return {"template": chat.name if chat.template else None, "end_of_turn": chat.end_of_turn,
            "stop_ids": chat.stop_ids(), "system": chat.system}


def print_card(card: dict, title: str = "data card") -> None:
    for task, task_card in card.get("tasks", {}).items():
        print_card(task_card, f"data card: task {task}")
    if not any(card.get(s) for s in ("train", "validation", "test", "replay")):
        return
    print(title)
    for split in ("train", "validation", "test", "replay"):
        info = card.get(split)
        if not info:
            continue
        tok = info["tokens"]
        line = (f"  {split:<10} {info['rows']:>7,d} rows   tokens p50 {tok['p50']} p95 {tok['p95']} max {tok['max']}"
                f"   truncated {info['truncated']}")
        if "label_balance" in info:
            total = sum(info["label_balance"].values())
            line += "   labels " + " ".join(f"{k} {v / total:.0%}" for k, v in info["label_balance"].items())
        print(line)


def print_comparison(base: dict | None, tuned: dict, baselines: dict | None = None) -> None:
    """The test table: the trivial baselines (if any), the base model and the tuned model, one metric a row."""
    width = max([12] + [len(k) + 2 for k in tuned])  # a task's metrics read `<task>/accuracy`
    columns = {name: b.get("test") or {} for name, b in (baselines or {}).items()}
    columns.update(base=base or {}, tuned=tuned)
    widths = {name: max(10, len(name) + 2) for name in columns}
    print("\n" + f"{'test':<{width}}" + "".join(f"{name:>{widths[name]}}" for name in columns))
    for key in tuned:
        cells = "".join(f"{f'{col[key]:.4f}' if key in col else '-':>{widths[name]}}" for name, col in columns.items())
        print(f"{key:<{width}}{cells}")
    for name, b in (baselines or {}).items():
        print(f"  {name}: {b['about']}" + (f" (skipped: {b['skipped']})" if "skipped" in b else ""))


def print_diagnosis(diagnosis: dict, forgot: dict | None) -> None:
    print(f"\n{diagnosis['early_stopping']['message']}")
    if forgot:
        print(("warning: " if forgot["warning"] else "") + f"forgetting: {forgot['message']}")
    for line in diagnosis["warnings"]:
        print(f"warning: {line}")


def train(cfg: RunConfig, *, resume: bool = False, force: bool = False, on_eval=None) -> dict:
    """Run the whole flow. Under torchrun / accelerate launch every process runs this function;
    only the main process writes to the run folder and prints.

    on_eval: `(step, validation scores) -> stop?`, passed to the supervised loop (see `fit`); runs that train
    in their own loop (ppo, task sequences, meta-learning) never call it."""
    from .flows import flow_for

    if (flow := flow_for(cfg)) is not None:  # a task sequence or meta-learning: several trainings in one run
        return flow.train(cfg, resume=resume, force=force)
    started = time.perf_counter()
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    run_dir = Path(cfg.output.dir) / cfg.name
    mode, dtype = precision_and_dtype(cfg)
    # cpu=True is what lets accelerate run several processes (gloo) on a machine without a GPU.
    accelerator = Accelerator(mixed_precision=mode, cpu=not torch.cuda.is_available(),
                              **trackers.accelerator_kwargs(cfg.train.report_to, run_dir))
    main = accelerator.is_main_process

    # 1. Everything checkable before the run folder exists: config, data and its checks, tokenizer,
    #    labels, the probe text, and the tuning on this architecture (from the model's config and a
    #    meta-device build: no weights read). Every process checks, so a bad input stops them all alike.
    artifacts.check_run_dir(run_dir, resume=resume, force=force)
    artifacts.check_output_dir(run_dir.parent)
    cfg = distilling.student_config(cfg)  # keep_layers: the student's folder, built below from the teacher
    if resume:
        artifacts.check_resume(run_dir, cfg)
    tokenizer = load_tokenizer(cfg.model)
    prepared, report = prepare_data(cfg, tokenizer)
    if main:
        print_card(prepared.card)
        print(report.render())
    raise_for_errors(report)
    objective = run_objective(cfg, objective, tokenizer, prepared, accelerator)
    # ppo measures its drift as KL to the reference on held-out prompts instead of the forgetting probe
    owns_step = getattr(objective, "OWNS_STEP", False)
    probe = None if owns_step else forgetting.load_probe(cfg.eval.forgetting, tokenizer, objective.HEAD)
    check_before_loading(cfg, prepared.model_kwargs)

    # 2. The run folder, locked by this process and marked as running until summary.json is written.
    lock = artifacts.claim_run_dir(run_dir, resume=resume, force=force) if main else None
    try:
        if main:
            artifacts.set_status(run_dir, "running")
            (run_dir / artifacts.CONFIG).write_text(dump(cfg), encoding="utf-8")
            artifacts.write_json(run_dir / artifacts.MANIFEST, artifacts.manifest(cfg, prepared.model_kwargs))
            artifacts.write_json(run_dir / "data_card.json", prepared.card)
            if report.trained is not None:
                artifacts.write_json(run_dir / artifacts.TRAIN_ROWS, report.trained)
        trackers.start(accelerator, cfg, run_dir)
        accelerator.wait_for_everyone()
        distill = distilling.settings(cfg)
        hard = distilling.hard_label_run(cfg, run_dir, resume) if distill and distill.compare_hard_labels else None
        summary = _train_in(run_dir, cfg, objective, tuning, tokenizer, prepared, report, probe, resume, started,
                            accelerator, dtype, hard, on_eval)
        trackers.finish(accelerator, summary)
    except BaseException as e:
        trackers.finish(accelerator, None)
        if main:
            artifacts.fail(run_dir, e, fresh=not resume)
        raise
    finally:
        artifacts.release(lock)
    return summary


def run_objective(cfg: RunConfig, objective, tokenizer, prepared, accelerator):
    """The objective this run trains: the regime's over its tasks (multitask: each task on its own head), checked
    against a teacher's tokenizer, head and labels; a student built from its teacher's layers is written here,
    once, so the checks before loading read its config."""
    regime = REGIMES[cfg.regime.kind]
    if hasattr(regime, "wrap_objective"):
        objective = regime.wrap_objective(objective, cfg.regime, prepared)
    distilling.check(cfg, tokenizer, prepared, objective.HEAD)
    if accelerator.is_main_process:
        distilling.build_student(cfg, objective.HEAD, prepared.model_kwargs)
    accelerator.wait_for_everyone()
    return objective


def epoch_batches(cfg: RunConfig, prepared):
    """The regime's batching of train (multitask: one task per batch, in shares), or None for the loop's own."""
    sampler = getattr(REGIMES[cfg.regime.kind], "batches", None)
    return sampler(cfg.regime, prepared.examples["train"], cfg.train, train_batches) if sampler else None


@dataclass
class Flow:
    """What the steps of one run share: its inputs, decided before the run folder existed."""

    run_dir: Path
    cfg: RunConfig
    objective: object
    tuning: object
    tokenizer: object
    prepared: object
    report: Report
    probe: object
    resume: bool
    started: float
    accelerator: object
    hard: dict | None = None
    """`distill.compare_hard_labels`: the same student trained on the labels alone, for the table."""
    details: dict = field(default_factory=dict)
    """What the objective reports beyond metrics on the tuned model, per split (a classifier's confusion counts)."""

    @property
    def say(self):
        return self.accelerator.print

    @property
    def eval_bs(self) -> int:
        return self.cfg.train.eval_batch_size or 2 * self.cfg.train.batch_size

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _train_in(run_dir: Path, cfg: RunConfig, objective, tuning, tokenizer, prepared, report: Report, probe,
              resume: bool, started: float, accelerator, dtype: torch.dtype, hard: dict | None = None,
              on_eval=None) -> dict:
    """model -> base scores -> train -> tuned scores -> diagnosis -> summary and weights."""
    flow = Flow(run_dir, cfg, objective, tuning, tokenizer, prepared, report, probe, resume, started, accelerator,
                hard)
    model, counts = build_model(flow, dtype)
    if getattr(objective, "OWNS_STEP", False):
        return _train_rl(run_dir, cfg, tuning, tokenizer, prepared, report, model, resume, started, accelerator,
                         counts)
    task, (teacher, cached) = objective, with_teacher(flow, dtype)
    objective = flow.objective
    gen_items = generation_items(cfg, objective, prepared)
    base, base_answers, gen_seconds = score_base(flow, model, gen_items)
    trivial = score_baselines(flow)
    # The model holds its starting weights here (a resumed run loads its checkpoint inside fit).
    probe_before = forgetting.measure(model, probe, tokenizer.pad_token_id, flow.eval_bs, accelerator.device) \
        if probe else None
    start = trainable_state(model)
    penalty = REGIMES[cfg.regime.kind].make_penalty(cfg.regime, model, objective.HEAD, tokenizer, accelerator.device)
    trained = fit(model=model, objective=objective, obj_cfg=cfg.objective,
                  train_examples=prepared.examples["train"], val_examples=prepared.examples.get("validation"),
                  cfg=cfg.train, pad_id=tokenizer.pad_token_id, run_dir=run_dir, accelerator=accelerator,
                  resume=resume, penalty=penalty, batches=epoch_batches(cfg, prepared), on_eval=on_eval)
    model = accelerator.unwrap_model(model)
    results, answers, gen_seconds["tuned"] = score_tuned(flow, model, gen_items)
    if gen_seconds["tuned"] is None:
        del gen_seconds["tuned"]
    forgot = None
    if probe:
        after = forgetting.measure(model, probe, tokenizer.pad_token_id, flow.eval_bs, accelerator.device)
        forgot = forgetting.compare(probe_before, after, cfg.eval.forgetting, probe, cfg)
    side = teacher_and_student(flow, teacher, task, model, cached)
    watch = cfg.train.early_stopping.metric or objective.MAIN_METRIC
    rows = (prepared.card.get("train") or {}).get("rows")  # for advice: "more training rows (now ...)"
    diagnosis = diagnose(read_history(run_dir), {**trained, "train_rows": rows}, cfg, watch, objective.METRICS[watch],
                         base, results, update_size(start, model), trivial)
    del start
    results, base = reported(cfg, results, base)
    summary = run_summary(flow, trained, counts, results, base, forgot, diagnosis, reported_baselines(cfg, trivial))
    save_run(flow, model, summary, (gen_items, base_answers, answers, gen_seconds), (base, results), side)
    return summary


def with_teacher(flow: Flow, dtype: torch.dtype):
    """`objective.distill`: the teacher loaded (outside the model: never trained, never saved) and the run's
    objective made the task's loss plus its soft targets; (teacher, cached outputs' facts), or (None, None)."""
    cfg, acc = flow.cfg, flow.accelerator
    settings = distilling.settings(cfg)
    if settings is None:
        return None, None
    teacher = distilling.load_teacher(cfg, flow.objective.HEAD, acc.device, dtype)
    train_rows = flow.prepared.examples["train"]
    augmented = distilling.augmentation(cfg, train_rows, flow.tokenizer)
    cached = distilling.cache_outputs(cfg, teacher, train_rows, flow.eval_bs, flow.tokenizer.pad_token_id,
                                      acc.device, augmented) if settings.cache else None
    if augmented is not None:
        flow.say(f"augment: {augmented.copies} masked copies of each of the {len(train_rows)} train examples "
                 f"(mask_prob {settings.augment.mask_prob}), learned from the teacher's soft targets alone")
    flow.objective = Distilled(flow.objective, teacher, settings, augmented)
    return teacher, cached


def teacher_and_student(flow: Flow, teacher, task, model, cached) -> dict | None:
    """Teacher, student (and the hard-label student) side by side on test, measured in this run."""
    if teacher is None or "test" not in flow.prepared.examples:
        return None
    side = distilling.side_by_side(flow.cfg, teacher, task, model, flow.prepared.examples["test"], flow.eval_bs,
                                   flow.tokenizer.pad_token_id, flow.accelerator, flow.run_dir, flow.hard)
    if cached:
        side["teacher_cache"] = cached
    return side


def build_model(flow: Flow, dtype: torch.dtype):
    """The base loaded as the tuning needs it, the tuning applied, on the device: (model, (trainable, total))."""
    cfg, objective, tokenizer, chat = flow.cfg, flow.objective, flow.tokenizer, flow.prepared.chat
    if chat is not None and chat.template is not None:
        tokenizer.chat_template = chat.template  # saved with the weights: inference renders as training did
    set_seed(cfg.train.seed)
    model = load_base(cfg, objective.HEAD, flow.prepared.model_kwargs, dtype, tokenizer.pad_token_id)
    model = apply_tuning(model, flow.tuning, cfg, objective.HEAD, tokenizer, flow.say)
    if hasattr(objective, "prepare_model") and (said := objective.prepare_model(model, cfg.objective)):
        flow.say(said)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    trainable, total = count_parameters(model)
    flow.say(format_parameters(trainable, total))
    model.to(flow.accelerator.device)
    if getattr(cfg.objective, "pack", False):
        check_packing(model)  # before any training: fail if attention would cross packed examples
    return model, (trainable, total)


def score_base(flow: Flow, model, gen_items: list[dict]):
    """The starting model's scores per held-out split (and its answers to the test prompts), read back from
    the run folder on resume: (base, base_answers, {"base": seconds})."""
    cfg, objective, prepared, acc = flow.cfg, flow.objective, flow.prepared, flow.accelerator
    pad_id = flow.tokenizer.pad_token_id
    if hasattr(objective, "attach_reference"):  # the starting model, before anything trains (dpo's reference)
        objective.attach_reference(model, prepared.examples, cfg.objective, flow.eval_bs, pad_id, acc)
    base, base_answers, gen_seconds = None, None, {}
    held_out = [s for s in ("test", "validation") if prepared.examples.get(s)]
    if not (cfg.eval.compare_base and held_out):
        return base, base_answers, gen_seconds
    base_file, answers_file = flow.run_dir / "base_scores.json", flow.run_dir / "base_generations.json"
    if flow.resume and base_file.exists():
        base = artifacts.read_json(base_file)
        base_answers = [Generation(**g) for g in artifacts.read_json(answers_file)] if gen_items else None
    else:
        base = {s: evaluate(model, objective, cfg.objective, prepared.examples[s], flow.eval_bs, pad_id, acc,
                            f"base {s}") for s in held_out}
        if gen_items and "test" in base:
            scores, base_answers, gen_seconds["base"] = answer_prompts(model, prepared.chat, gen_items, cfg, flow.say,
                                                                       "base")
            base["test"].update(scores)
            if flow.main:
                artifacts.write_json(answers_file, [g.__dict__ for g in base_answers])
        if flow.main:
            artifacts.write_json(base_file, base)
    for s, scores in base.items():
        flow.say(f"base {s} " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    return base, base_answers, gen_seconds


def score_baselines(flow: Flow) -> dict | None:
    """The objective's trivial baselines on the held-out splits (majority class, bag-of-words, chance), or None
    for an objective that has none. Cheap and seeded, so a resumed run scores them again."""
    hook = getattr(flow.objective, "baselines", None)
    found = hook(flow.prepared, flow.cfg.objective, flow.cfg.train.seed) if hook else None
    for name, b in (found or {}).items():
        scores = "; ".join(f"{s} " + ", ".join(f"{k} {v:.4f}" for k, v in m.items())
                           for s, m in b.items() if isinstance(m, dict))
        flow.say(f"baseline {name} ({b['about']}): " + (scores or f"skipped: {b['skipped']}"))
    return found or None


def score_tuned(flow: Flow, model, gen_items: list[dict]):
    """The tuned model's scores per held-out split and its answers: (results, answers, seconds or None)."""
    cfg, prepared = flow.cfg, flow.prepared
    results = {}
    for split in ("validation", "test"):
        if prepared.examples.get(split):
            found: dict = {}
            results[split] = evaluate(model, flow.objective, cfg.objective, prepared.examples[split], flow.eval_bs,
                                      flow.tokenizer.pad_token_id, flow.accelerator, split, found)
            for key, value in found.items():  # e.g. summary["confusion"]["test"]
                flow.details.setdefault(key, {})[split] = value
    if not (gen_items and "test" in results):
        return results, None, None
    scores, answers, seconds = answer_prompts(model, prepared.chat, gen_items, cfg, flow.say, "tuned")
    results["test"].update(scores)
    return results, answers, seconds


def reported(cfg: RunConfig, results: dict, base: dict | None):
    """Only the metrics `eval.metrics` asks for (all if it is unset)."""
    if not cfg.eval.metrics:
        return results, base
    def keep(k: str) -> bool:  # a task's metrics read `<task>/accuracy`
        return k.rsplit("/", 1)[-1] in cfg.eval.metrics

    results = {s: {k: v for k, v in m.items() if keep(k)} for s, m in results.items()}
    base = {s: {k: v for k, v in m.items() if keep(k)} for s, m in base.items()} if base else base
    return results, base


def reported_baselines(cfg: RunConfig, trivial: dict | None) -> dict | None:
    """The baselines' scores narrowed to `eval.metrics` as base and tuned are ("about", "skipped" kept)."""
    if not trivial:
        return None
    out = {}
    for name, b in trivial.items():
        scores = {k: v for k, v in b.items() if isinstance(v, dict)}
        out[name] = {**{k: v for k, v in b.items() if k not in scores}, **reported(cfg, scores, None)[0]}
    return out


def run_summary(flow: Flow, trained: dict, counts, results: dict, base: dict | None, forgot, diagnosis,
                baselines: dict | None = None) -> dict:
    return {
        "name": flow.cfg.name,
        **results,
        "base": base,
        **({"baselines": baselines} if baselines else {}),
        "train": {k: v for k, v in trained.items() if k != "validation_history"},
        "params": params_summary(*counts),
        "checks": checks_summary(flow.report),
        **({"tasks": flow.objective.per_task(results, base)} if hasattr(flow.objective, "per_task") else {}),
        "forgetting": forgot,
        "diagnosis": diagnosis,
        **flow.details,
        "peak_memory_mb": artifacts.peak_memory_mb(),
        "wall_seconds": round(time.perf_counter() - flow.started, 1),
    }


def save_run(flow: Flow, model, summary: dict, generation, scores, side: dict | None = None) -> None:
    """The chat and generation facts into the summary, the base-vs-tuned report, the weights, summary.json."""
    cfg, chat, objective = flow.cfg, flow.prepared.chat, flow.objective
    gen_items, base_answers, answers, gen_seconds = generation
    base, results = scores
    if chat is not None:
        summary["chat"] = chat_summary(chat)
        if chat.template is not None and objective.HEAD == "causal-lm":
            # plain transformers `generate` on the saved model then stops at the end of a turn too
            model.generation_config.eos_token_id = chat.stop_ids()
    if answers is not None:
        settings = cfg.eval.generate
        summary["generation"] = {"prompts": len(answers), "max_new_tokens": settings.max_new_tokens,
                                 "do_sample": settings.do_sample, "seconds": gen_seconds,
                                 "report": "compare.md" if base_answers is not None else "generations.json"}
    if not flow.main:
        return
    run_dir = flow.run_dir
    if answers is not None and base_answers is not None:
        write_report(run_dir, f"{cfg.name}: base vs tuned on the test prompts", (cfg.model.name, str(run_dir)),
                     (base["test"], results["test"]), side_by_side(gen_items, base_answers, answers),
                     metric_directions(objective))
    elif answers is not None:
        artifacts.write_json(run_dir / "generations.json", [{"messages": it["messages"], "reference":
                             it["reference"], **a.__dict__} for it, a in zip(gen_items, answers)])
    if hasattr(flow.tuning, "speed_up_done") and (said := flow.tuning.speed_up_done(cfg.tuning, model)):
        flow.say(said)
    sizes = (lambda weights: {"distill": distilling.with_sizes(side, cfg, run_dir, weights)}) if side else None
    write_run(run_dir, flow.tuning, model, flow.tokenizer, summary, sizes)
    if "test" in results:
        print_comparison((base or {}).get("test"), results["test"], summary.get("baselines"))
    if side is not None:
        distilling.print_table(summary["distill"], flow.objective.MAIN_METRIC)
    print_diagnosis(summary["diagnosis"], summary["forgetting"])
    print(f"\nrun saved to {run_dir}")


def write_run(run_dir: Path, tuning, model, tokenizer, summary: dict, after_weights=None) -> None:
    """The weights (as the tuning saves them), then the run marked completed and summary.json: last, so a
    folder with a summary always holds everything. `after_weights(weights folder name)` -> more summary keys
    that need the saved weights (a distilled student's size on disk)."""
    save = getattr(tuning, "save", None) or artifacts.save_weights
    summary["weights"] = save(run_dir, model, tokenizer)
    artifacts.honour_umask(run_dir / summary["weights"])  # a tuning's own save writes safetensors 0600 too
    if after_weights is not None:
        summary.update(after_weights(summary["weights"]))
    artifacts.set_status(run_dir, "completed")
    artifacts.write_json(run_dir / artifacts.SUMMARY, summary)
    html.write_after_run(run_dir)


def _rl_start_scores(run_dir: Path, resume: bool, split: str, score):
    """The starting model's held-out scores and answers: `score()` once, saved, and read back on --resume."""
    base_file, answers_file = run_dir / "base_scores.json", run_dir / "base_generations.json"
    if resume and base_file.exists():
        return (artifacts.read_json(base_file)[split],
                [Generation(**g) for g in artifacts.read_json(answers_file)])
    base, answers = score()
    artifacts.write_json(base_file, {split: base})
    artifacts.write_json(answers_file, [g.__dict__ for g in answers])
    return base, answers


def _rl_warnings(results: dict, trivial: dict, obj, kl_hint: str, where: str) -> list[str]:
    """A tuned policy that drifted past kl_bound, or that scores no better than a scripted player."""
    warnings = [f"the tuned model's KL to the reference on {where} is {results['kl']:.2f} nats per answer, above "
                f"objective.kl_bound {obj.kl_bound}: it may be exploiting the reward; {kl_hint}"] \
        if results["kl"] > obj.kl_bound else []
    return warnings + [f"the tuned model's mean reward on {where} ({results['reward']:.4f}) is no better than "
                       f"{b['about']} ({name} baseline {b['reward']:.4f})"
                       for name, b in trivial.items() if results["reward"] <= b["reward"]]


def _print_rl_table(title: str, trivial: dict, base: dict, results: dict, kl_bound: float) -> None:
    """The end-of-run table of an RL objective: the scripted players (if any), the starting and the tuned model."""
    print(f"\n{title:<20}" + "".join(f"{name:>10}" for name in trivial) + f"{'start':>10}{'tuned':>10}")
    for key in results:
        floors = "".join(f"{b[key]:>10.4f}" if key in b else f"{'-':>10}" for b in trivial.values())
        print(f"{key:<20}{floors}{base[key]:>10.4f}{results[key]:>10.4f}")
    for name, b in trivial.items():
        print(f"({name}: {b['about']}, on the same episodes)")
    print(f"(kl: nats per answer against the reference; bound {kl_bound})")


def _train_rl(run_dir: Path, cfg: RunConfig, tuning, tokenizer, prepared, report: Report, model, resume: bool,
              started: float, accelerator, counts: tuple[int, int]) -> dict:
    """An RL objective (its own loop, train/ppo.py or train/grpo.py): the starting model answers held-out prompts
    (or plays held-out episodes), the loop trains, the tuned model answers them again; reward, KL to the
    reference and an environment's success rates before and after, a side-by-side report, the weights and the
    summary."""

    kind = cfg.objective.kind
    if accelerator.num_processes > 1:
        raise TunesmithError(f"{kind} trains on one process (its rollouts are not sharded)",
                             hint="run it without torchrun / accelerate launch")
    say, obj, chat = accelerator.print, cfg.objective, prepared.chat
    objective, loop = OBJECTIVES[kind], RL_LOOPS[OBJECTIVES[kind]]
    tokenizer.chat_template = chat.template  # saved with the weights: the tuned policy is prompted as trained
    # built here and passed in: the objective stays a leaf
    scorer = scorers.load(obj.reward, accelerator.device, cfg.model.trust_remote_code) if obj.reward else None
    answers_from = rollout.source(obj, chat, prepared, scorer)
    trainee = loop.wrap(model).to(accelerator.device)
    reference = rollout.make_reference(trainee.policy)
    split = "test" if prepared.examples.get("test") else "validation"
    n = min(cfg.eval.generate.prompts, len(prepared.examples.get(split, [])))
    held = prepared.prompts.get(split, [])[:n]
    settings = cfg.eval.generate.model_copy(update={"max_new_tokens": obj.max_new_tokens})
    what = "episodes" if obj.env is not None else "prompts"
    base = base_answers = None
    if held:
        say(f"starting model answering {n} {split} {what} ...")
        base, base_answers = _rl_start_scores(run_dir, resume, split, lambda: rollout.evaluate(
            trainee.policy, reference, answers_from, split, n, settings, cfg.train.seed))
        say(f"base {split} " + ", ".join(f"{k} {v:.4f}" for k, v in base.items()))
    trivial = answers_from.baselines(split, n) if held else {}  # scripted players of an environment, if any
    for name, b in trivial.items():
        say(f"baseline {name} ({b['about']}): {split} " + ", ".join(f"{k} {v:.4f}" for k, v in b.items()
                                                                    if k != "about"))

    trained = loop.fit(model=trainee, reference=reference,
                       source=answers_from, rows=len(prepared.examples["train"]), obj=obj, cfg=cfg.train,
                       run_dir=run_dir, resume=resume, say=say, accelerator=accelerator)
    results = answers = None
    warnings = []
    if held:
        say(f"tuned model answering {n} {split} {what} ...")
        results, answers = rollout.evaluate(trainee.policy, reference, answers_from, split, n, settings,
                                            cfg.train.seed)
        warnings = _rl_warnings(results, trivial, obj, objective.kl_hint(obj), f"{split} {what}")
    trainable, total = counts
    summary = {
        "name": cfg.name,
        **({split: results} if results else {}),
        "base": {split: base} if base else None,
        **({"baselines": {name: {"about": b["about"], split: {k: v for k, v in b.items() if k != "about"}}
                          for name, b in trivial.items()}} if trivial else {}),
        "train": trained,
        "params": params_summary(trainable, total),
        "checks": checks_summary(report),
        "kl_bound": obj.kl_bound,
        "diagnosis": {"warnings": warnings},
        "chat": chat_summary(chat),
        "peak_memory_mb": artifacts.peak_memory_mb(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    model = trainee.policy
    model.generation_config.eos_token_id = chat.stop_ids()
    if answers is not None:
        summary["generation"] = {"prompts": len(answers), "max_new_tokens": settings.max_new_tokens,
                                 "do_sample": settings.do_sample, "report": "compare.md"}
        # an environment's success rates (accuracy, win rate, legal-move rate): higher is better
        directions = {**metric_directions(objective), **{m: "max" for m in envs.metrics(obj.env)}} \
            if obj.env is not None else metric_directions(objective)
        write_report(run_dir, f"{cfg.name}: starting model vs {kind}-tuned policy on the {split} {what}",
                     (cfg.model.name, str(run_dir)), (base, results), side_by_side(held, base_answers, answers),
                     directions)
    loop.save_extra(trainee, run_dir)
    write_run(run_dir, tuning, model, tokenizer, summary)
    if results:
        _print_rl_table(f"{split} {what} ({n})", trivial, base, results, obj.kl_bound)
    for line in warnings:
        print(f"warning: {line}")
    print(f"\nrun saved to {run_dir}")
    return summary
