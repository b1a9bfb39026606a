"""The meta-learning run (`regime: {kind: meta, ...}`), top to bottom:

config -> data (splits, checks, tokenize) -> classes split into meta-train / meta-test -> run folder
       -> model (load with an N-way head, tune) -> meta-training: episodes of meta-train classes, a meta
          update per `meta_batch` (reptile or fomaml, regimes/meta.py), the start checkpointed for --resume
       -> transfer baseline: a conventional fine-tune on the meta-train classes (the shared loop)
       -> evaluation: the same held-out episodes (meta-test classes, test split) adapted from the
          meta-learned start, the base start and the transfer start; mean accuracy with 95% CIs
       -> artifacts: the meta-learned start (weights), summary.json, the table

Meta-training draws rows from the train split, evaluation from the test split; the class split keeps the
classes apart too, so an evaluation episode's classes and rows were never seen in meta-training.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import set_seed

from .. import artifacts
from ..config import RunConfig
from ..data.checks import raise_for_errors
from ..data.collate import collate
from ..errors import TunesmithError
from ..models.anatomy import head_parameters
from ..models.load import load_tokenizer
from ..models.params import count_parameters, format_parameters
from ..objectives import OBJECTIVES
from ..regimes import meta
from ..train.loop import MetricsLog, fit
from ..tuning import TUNINGS
from ..build import check_before_loading, load_base
from .common import finish, one_process, open_run_dir


def applies(cfg: RunConfig) -> bool:
    return True


def _head_kwargs(names: list[str]) -> dict:
    return {"num_labels": len(names), "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def train(cfg: RunConfig, *, resume: bool = False, force: bool = False) -> dict:
    from ..run import prepare_data, print_card, checks_summary, params_summary  # the single flow's data step

    started = time.perf_counter()
    reg = cfg.regime
    objective, tuning = OBJECTIVES[cfg.objective.kind], TUNINGS[cfg.tuning.kind]
    run_dir = Path(cfg.output.dir) / cfg.name
    accelerator = one_process(cfg, run_dir)
    artifacts.check_run_dir(run_dir, resume=resume, force=force)
    tokenizer = load_tokenizer(cfg.model)
    prepared, report = prepare_data(cfg, tokenizer)
    print_card(prepared.card)
    print(report.render())
    raise_for_errors(report)
    if not prepared.examples.get("test"):
        raise TunesmithError("meta-learning is evaluated on the test split's rows of the meta-test classes; "
                             "there is no test split", where="data.split.test")
    labels = prepared.card["labels"]
    train_classes, test_classes = meta.split_classes(labels, reg, cfg.train.seed)
    row_labels = {s: [labels[e["labels"]] for e in ex] for s, ex in prepared.examples.items()}
    train_sampler = meta.EpisodeSampler(row_labels["train"], train_classes, reg, cfg.train.seed, "data.train")
    test_sampler = meta.EpisodeSampler(row_labels["test"], test_classes, reg, cfg.train.seed + 1, "data.test")
    episode_kwargs = _head_kwargs([f"class {i}" for i in range(reg.ways)])
    check_before_loading(cfg, episode_kwargs)
    print(f"meta-train classes ({len(train_classes)}): {', '.join(train_classes)}")
    print(f"meta-test classes ({len(test_classes)}): {', '.join(test_classes)}")

    lock = open_run_dir(run_dir, cfg, episode_kwargs, prepared.card, resume, force, accelerator)
    try:
        return _run(run_dir, cfg, objective, tuning, tokenizer, prepared, report, accelerator, train_classes,
                    test_classes, train_sampler, test_sampler, episode_kwargs, resume, started,
                    checks_summary, params_summary)
    except BaseException as e:
        artifacts.set_status(run_dir, "failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        artifacts.release(lock)


class Episodes:
    """Batches of one split's examples for episodes, and the model's weights moved in and out."""

    def __init__(self, model, examples: dict[str, list[dict]], pad_id: int, device):
        self.model, self.examples, self.pad_id, self.device = model, examples, pad_id, device
        heads = {id(p) for p in head_parameters(model)}
        self.body = {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in heads}
        """The meta-learned weights: every trainable weight but the per-episode head."""
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def batch(self, split: str, rows: list[tuple[int, int]]) -> dict:
        items = [{"input_ids": self.examples[split][i]["input_ids"], "labels": label} for i, label in rows]
        return {k: v.to(self.device) for k, v in collate(items, self.pad_id).items()}

    def weights(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.body.items()}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        for n, p in self.body.items():
            p.copy_(state[n])

    def adapted(self, split: str, episode: meta.Episode, start: dict, steps: int, lr: float, how: str,
                before: list | None = None):
        """Load `start`, give the model a fresh head, adapt on the support set; return the query batch.
        `before`: a list that gets the query accuracy of the fresh head, before any step."""
        self.load(start)
        support, query = self.batch(split, episode.support), self.batch(split, episode.query)
        meta.init_head(self.model, support, len(episode.classes), how)
        if before is not None:
            before.append(meta.accuracy(self.model, query))
        meta.adapt(self.model, self.trainable, support, steps, lr)
        return query


def _run(run_dir, cfg, objective, tuning, tokenizer, prepared, report, accelerator, train_classes, test_classes,
         train_sampler, test_sampler, episode_kwargs, resume, started, checks_summary, params_summary) -> dict:
    reg, device = cfg.regime, accelerator.device
    set_seed(cfg.train.seed)
    model = load_base(cfg, objective.HEAD, episode_kwargs, torch.float32, tokenizer.pad_token_id)
    model = tuning.apply(model, cfg.tuning, objective.HEAD, tokenizer).to(device)
    model.eval()  # no dropout inside episodes: a few steps on a few rows, and episodes repeat exactly
    trainable, total = count_parameters(model)
    print(format_parameters(trainable, total))
    ep = Episodes(model, prepared.examples, tokenizer.pad_token_id, device)
    ckpt = run_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    base_file = ckpt / "base_start.safetensors"
    if resume and base_file.exists():
        base_start = load_file(base_file, device=str(device))
    else:
        base_start = ep.weights()
        save_file({n: t.cpu().contiguous() for n, t in base_start.items()}, base_file)

    theta = meta_train(ep, reg, train_sampler, ckpt, MetricsLog(run_dir / "metrics.jsonl", accelerator), resume, base_start)

    starts = {"meta": theta, "base": base_start}
    if reg.transfer_steps:
        starts["transfer"] = transfer_start(cfg, objective, tuning, tokenizer, prepared, train_classes, run_dir,
                                            accelerator, resume, set(ep.body))
    steps = reg.inner_steps if reg.eval_steps is None else reg.eval_steps
    print(f"\nevaluating on {reg.eval_episodes} held-out {reg.ways}-way {reg.shots}-shot episodes "
          f"({steps} adaptation steps, classes never seen in meta-training)")
    results = {name: evaluate_start(ep, start, test_sampler, reg, steps, name) for name, start in starts.items()}
    ep.load(theta)

    table = {
        "algorithm": reg.algorithm, "ways": reg.ways, "shots": reg.shots, "queries": reg.queries,
        "adaptation_steps": steps, "head_init": reg.head_init,
        "classes": {"meta_train": train_classes, "meta_test": test_classes},
        "eval": results,
        "meta_minus_base": results["meta"]["after"]["accuracy"] - results["base"]["after"]["accuracy"],
        "ci_overlap_meta_base": _overlap(results["meta"]["after"], results["base"]["after"]),
    }
    if "transfer" in results:
        table["meta_minus_transfer"] = results["meta"]["after"]["accuracy"] - results["transfer"]["after"]["accuracy"]
        table["ci_overlap_meta_transfer"] = _overlap(results["meta"]["after"], results["transfer"]["after"])
    summary = {
        "name": cfg.name,
        "test": {"accuracy": results["meta"]["after"]["accuracy"]},
        "base": {"test": {"accuracy": results["base"]["after"]["accuracy"]}},
        "meta": table,
        "params": params_summary(trainable, total),
        "checks": checks_summary(report),
        "peak_memory_mb": artifacts.peak_memory_mb(),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    save = getattr(tuning, "save", None) or artifacts.save_weights
    summary["weights"] = save(run_dir, model, tokenizer)
    finish(run_dir, summary, accelerator)
    print(render(table))
    print(f"\nrun saved to {run_dir}")
    return summary


def meta_train(ep: Episodes, reg, sampler, ckpt: Path, log: MetricsLog, resume: bool, start: dict) -> dict:
    """The meta-learned start after `reg.episodes` episodes; checkpointed every `save_every` updates."""
    updates = math.ceil(reg.episodes / reg.meta_batch)
    theta, done = start, 0
    state_file, weights_file = ckpt / "meta_state.json", ckpt / "meta_start.safetensors"
    if resume and state_file.exists():
        done = json.loads(state_file.read_text())["updates"]
        theta = load_file(weights_file, device=str(next(iter(start.values())).device))
        print(f"resuming meta-training after update {done} of {updates}")
        log.truncate_after(done)
    tick = time.perf_counter()
    for u in range(done, updates):
        outs, accs = [], []
        for i in range(u * reg.meta_batch, min((u + 1) * reg.meta_batch, reg.episodes)):
            episode = sampler.episode(i)
            query = ep.adapted("train", episode, theta, reg.inner_steps, reg.inner_lr, reg.head_init)
            accs.append(meta.accuracy(ep.model, query))
            outs.append(ep.weights() if reg.algorithm == "reptile" else meta.gradient(ep.model, ep.body, query))
        theta = (meta.reptile_step(theta, outs, reg.meta_lr) if reg.algorithm == "reptile"
                 else meta.fomaml_step(theta, outs, reg.meta_lr))
        log.write(step=u + 1, split="meta-train", query_accuracy=sum(accs) / len(accs))
        if (u + 1) % reg.save_every == 0 or u + 1 == updates:
            tmp = weights_file.with_suffix(".tmp")
            save_file({n: t.cpu().contiguous() for n, t in theta.items()}, tmp)
            tmp.replace(weights_file)
            artifacts.write_json(state_file, {"updates": u + 1})
            print(f"meta update {u + 1}/{updates}: query accuracy after adapting {sum(accs) / len(accs):.4f} "
                  f"({time.perf_counter() - tick:.0f}s)")
    return theta


def transfer_start(cfg, objective, tuning, tokenizer, prepared, train_classes, run_dir, accelerator, resume,
                   body_names: set[str]) -> dict:
    """The body of a conventional fine-tune on every meta-train class (one head over all of them), trained by
    the shared loop for `transfer_steps` steps; its weights are the transfer baseline's start."""
    out = run_dir / "checkpoints" / "transfer_start.safetensors"
    if resume and out.exists():
        return load_file(out, device=str(accelerator.device))
    labels = prepared.card["labels"]
    index = {c: i for i, c in enumerate(train_classes)}
    examples = {s: [{"input_ids": e["input_ids"], "labels": index[labels[e["labels"]]]}
                    for e in prepared.examples.get(s, []) if labels[e["labels"]] in index] for s in ("train", "validation")}
    print(f"\ntransfer baseline: fine-tuning on the {len(train_classes)} meta-train classes "
          f"({len(examples['train'])} rows, {cfg.regime.transfer_steps} steps)")
    set_seed(cfg.train.seed)
    model = load_base(cfg, objective.HEAD, _head_kwargs(train_classes), torch.float32, tokenizer.pad_token_id)
    model = tuning.apply(model, cfg.tuning, objective.HEAD, tokenizer).to(accelerator.device)
    train_cfg = cfg.train.model_copy(update={"max_steps": cfg.regime.transfer_steps})
    (run_dir / "transfer").mkdir(exist_ok=True)
    fit(model=model, objective=objective, obj_cfg=cfg.objective, train_examples=examples["train"],
        val_examples=examples["validation"] or None, cfg=train_cfg, pad_id=tokenizer.pad_token_id,
        run_dir=run_dir / "transfer", accelerator=accelerator, resume=resume)
    model = accelerator.unwrap_model(model)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in body_names}
    missing = body_names - set(start)
    if missing:
        raise RuntimeError(f"the transfer model lacks meta-learned weights: {sorted(missing)[:3]}")
    save_file({n: t.cpu().contiguous() for n, t in start.items()}, out)
    return start


def evaluate_start(ep: Episodes, start: dict, sampler, reg, steps: int, name: str) -> dict:
    """Query accuracy of every held-out episode adapted from `start`: before adapting (the fresh head alone)
    and after `steps` steps, each as mean and 95% CI over episodes."""
    before, after = [], []
    tick = time.perf_counter()
    for i in range(reg.eval_episodes):
        query = ep.adapted("test", sampler.episode(i), start, steps, reg.inner_lr, reg.head_init, before)
        after.append(meta.accuracy(ep.model, query))
    out = {"before": meta.interval(before), "after": meta.interval(after)}
    print(f"  {name:<10} {out['after']['accuracy']:.4f} +- {out['after']['ci95']:.4f} "
          f"({time.perf_counter() - tick:.0f}s)")
    return out


def _overlap(a: dict, b: dict) -> bool:
    return not (a["low"] > b["high"] or b["low"] > a["high"])


def render(table: dict) -> str:
    names = {"meta": "meta-learned", "base": "base model", "transfer": "transfer"}
    lines = [f"\n{table['ways']}-way {table['shots']}-shot, {table['adaptation_steps']} steps, "
             f"{table['eval']['meta']['after']['episodes']} held-out episodes ({table['algorithm']})",
             f"{'start':<14}{'after steps':>14}{'95% CI':>20}{'head alone':>14}"]
    for key, res in table["eval"].items():
        a, b = res["after"], res["before"]
        ci = f"[{a['low']:.4f}, {a['high']:.4f}]"
        lines.append(f"{names[key]:<14}{a['accuracy']:>14.4f}{ci:>20}{b['accuracy']:>14.4f}")
    lines.append(f"meta-learned minus base: {table['meta_minus_base']:+.4f} (95% CIs "
                 f"{'overlap' if table['ci_overlap_meta_base'] else 'do not overlap'})")
    if "meta_minus_transfer" in table:
        lines.append(f"meta-learned minus transfer: {table['meta_minus_transfer']:+.4f} (95% CIs "
                     f"{'overlap' if table['ci_overlap_meta_transfer'] else 'do not overlap'})")
    return "\n".join(lines)
