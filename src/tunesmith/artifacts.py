"""The run folder, `<output.dir>/<name>/`, and what is in it.

  config.yaml      the resolved config (every default filled in)
  manifest.json    library versions, data file hashes, seed, git commit, model head arguments
  status.json      running / failed (with the error) / completed
  data_card.json   rows, label balance, token lengths, truncation per split
  train_rows.json  8-byte digests of the rows it trained on (data.checks.trained_rows): `eval` and `compare`
                   leave those rows out of the data they score
  metrics.jsonl    one line per log step and per evaluation
  checkpoints/     for --resume, and the best weights for early stopping
  adapter/         peft adapter + tokenizer (parameter-efficient tunings), or
  model/           full weights (safetensors) + tokenizer
  summary.json     final metrics of the tuned model and of its base; written last
  .tunesmith-run   marker: tunesmith made this folder (only such a folder is replaced by --force)

A run is finished only when summary.json exists, and it is written last, by an atomic rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from . import allocator
from .errors import TunesmithError

SUMMARY, STATUS, CONFIG, MANIFEST = "summary.json", "status.json", "config.yaml", "manifest.json"
TRAIN_ROWS = "train_rows.json"
MARKER = ".tunesmith-run"
"""Written into every run folder tunesmith creates; --force deletes only folders that carry it."""
LOCK = ".lock"
"""Held (flock) by the process writing the run, so two runs of one name never share a folder."""


def write_json(path: Path, data) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path):
    """A JSON file tunesmith wrote; a damaged one is a located error, not a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunesmithError(f"{path.name} is missing", where=str(path),
                             hint="the folder is incomplete: rerun the command that made it") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise TunesmithError(f"damaged file, not readable JSON ({type(e).__name__})", where=str(path),
                             hint="the folder is corrupt: rerun the command that made it") from None


def is_finished(run_dir: Path) -> bool:
    return (run_dir / SUMMARY).exists()


def made_by_tunesmith(run_dir: Path) -> bool:
    """The folder carries the marker tunesmith writes into every run folder it creates."""
    return (run_dir / MARKER).is_file() and not run_dir.is_symlink()


def _is_empty(run_dir: Path) -> bool:
    """Nothing in it but what a claim writes first (a run that stopped before writing anything holds no run)."""
    return not any(p.name not in (LOCK, MARKER) for p in run_dir.iterdir())


def check_run_dir(run_dir: Path, *, resume: bool, force: bool, reopen: bool = False) -> None:
    """Refuse to clobber an existing run unless told how (only reads; nothing is written).

    `--force` replaces only a folder tunesmith made (it holds the marker file): never a folder of the user's
    that happens to have the run's name. `reopen`: with --resume, a finished run may be continued (a staged
    run one of whose stages is missing or unfinished)."""
    if run_dir.is_dir():
        _refuse_if_locked(run_dir)
    _check_state(run_dir, resume=resume, force=force, reopen=reopen)


def _check_state(run_dir: Path, *, resume: bool, force: bool, reopen: bool = False) -> None:
    if not run_dir.exists() or (run_dir.is_dir() and not run_dir.is_symlink() and _is_empty(run_dir)):
        return
    if not made_by_tunesmith(run_dir):
        raise TunesmithError(f"{run_dir} exists and is not a run folder made by tunesmith (it has no {MARKER} marker); "
                             "tunesmith neither writes into it nor deletes it, --force included",
                             hint="give the run another name (name=...) or another output.dir, or move that folder")
    if force:
        return
    if is_finished(run_dir) and not (resume and reopen):
        raise TunesmithError(f"{run_dir} already holds a finished run",
                             hint="pass --force to overwrite it, or give the run another name (name=...)")
    if not resume:
        state = read_json(run_dir / STATUS).get("state", "?") if (run_dir / STATUS).exists() else "unknown"
        raise TunesmithError(f"{run_dir} holds an unfinished run (status: {state})",
                             hint="pass --resume to continue from its last checkpoint, or --force to start over")


def clear_run_dir(run_dir: Path) -> None:
    """Empty a run folder tunesmith made (for --force); anything else is refused, whatever the caller checked."""
    if not run_dir.exists():
        return
    if not made_by_tunesmith(run_dir):
        raise TunesmithError(f"refusing to delete {run_dir}: it is not a run folder made by tunesmith (no {MARKER})")
    for child in run_dir.iterdir():
        if child.name == LOCK:
            continue  # held by this process while it replaces the run
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _in_use(run_dir: Path, holder: str) -> TunesmithError:
    return TunesmithError(f"{run_dir} is being written by another tunesmith process"
                          + (f" (pid {holder})" if holder.isdigit() else ""),
                          hint="wait for that run to end, or give this one another name (name=...)")


def try_lock(handle, tries: int = 10) -> bool:
    """flock without waiting on a holder for long; a few retries ride out another process's brief probe."""
    for i in range(tries):
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.1 * (i + 1))
    return False


def _refuse_if_locked(run_dir: Path) -> None:
    """Name the real reason first when another process is writing the run (else it looks merely unfinished)."""
    if not (run_dir / LOCK).is_file():
        return
    with open(run_dir / LOCK, "a+", encoding="utf-8") as probe:
        if not try_lock(probe, tries=1):
            probe.seek(0)
            raise _in_use(run_dir, probe.read().strip())


def claim_run_dir(run_dir: Path, *, resume: bool, force: bool, reopen: bool = False):
    """Create the run folder and lock it for this process; returns the lock, to `release` when the run ends.

    Two runs of one name started together both pass the first look (`check_run_dir`); only the one that gets
    the lock goes on, and it looks again under the lock, since the other may have finished a run there
    meanwhile. --force empties the folder only now, holding the lock."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / LOCK, "a+", encoding="utf-8")
    if not try_lock(lock):
        lock.seek(0)
        holder = lock.read().strip()
        lock.close()
        raise _in_use(run_dir, holder)
    try:
        _check_state(run_dir, resume=resume, force=force, reopen=reopen)
        if force and made_by_tunesmith(run_dir):  # else the folder is new (or empty): nothing to replace
            clear_run_dir(run_dir)
        mark_run_dir(run_dir)
    except BaseException:
        release(lock)
        raise
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def release(lock) -> None:
    """Let go of a run folder's lock (closing the file releases the flock)."""
    if lock is not None and not lock.closed:
        lock.close()


def mark_run_dir(run_dir: Path) -> None:
    """Create the run folder with its marker: the proof that --force may later replace it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).write_text("a tunesmith run folder: `tunesmith train --force` may replace it\n", encoding="utf-8")


def check_output_dir(out: Path) -> None:
    """The parent of run folders can be made and written (checked before anything is written): the nearest
    existing folder on its path must be a writable folder."""
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise TunesmithError(f"{probe} is a file, so the run folder cannot be made under it", where="output.dir",
                             hint="set output.dir to a folder")
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise TunesmithError(f"cannot write under {probe} ({e.strerror or e})", where="output.dir",
                             hint="set output.dir to a folder you can write to") from None


def fail(run_dir: Path, exc: BaseException, *, fresh: bool) -> None:
    """A run that stopped with an error. Bad input found before any checkpoint of a fresh run removes what
    this run wrote, so nothing blocks a re-run; otherwise the run is marked failed (resumable), and
    the traceback of a bug goes to `error.log` in the folder (named in the CLI's one-line message)."""
    from .errors import TunesmithError as UserError

    if fresh and isinstance(exc, UserError) and not (run_dir / "checkpoints").exists():
        # empty it, keeping only the lock this process holds and the marker: such a folder holds no run and
        # blocks nothing (`_is_empty`), and removing the lock file could let two later runs both lock it
        for child in run_dir.iterdir():
            if child.name in (LOCK, MARKER):
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink()
        return
    try:
        set_status(run_dir, "failed", error=f"{type(exc).__name__}: {exc}")
        if not isinstance(exc, (UserError, KeyboardInterrupt)):
            import traceback

            log = run_dir / "error.log"
            log.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
            exc.tunesmith_log = str(log.resolve())
    except OSError:
        pass  # the disk may be the problem (full): the original error is what the user needs to see


# Keys a resumed run may change: they do not alter the model, the data or the optimisation path.
RESUME_MAY_CHANGE = ("name", "output.", "eval.", "train.log_every", "train.save_every", "train.eval_batch_size",
                     "train.gradient_checkpointing", "model.trust_remote_code")


def flatten(data, prefix: str = "") -> dict:
    """Nested settings -> {"train.lr": 0.001, ...} (lists and other leaves as they are)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def _same_setting(old, new) -> bool:
    """Equal values, or two spellings of one existing path (a run started as `runs/x` and resumed from
    another folder, or a stage reference saved absolute and given relative)."""
    if old == new:
        return True
    if isinstance(old, str) and isinstance(new, str) and old and new:
        a, b = Path(old).expanduser(), Path(new).expanduser()
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def check_resume(run_dir: Path, cfg) -> None:
    """`--resume` continues the run it finds only with the same model, data and training: refuse (naming the
    keys) a config that changes any of them."""
    import yaml

    from .config import dump

    path = run_dir / CONFIG
    if not path.exists():
        return  # nothing saved yet: the run starts from the beginning
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise TunesmithError("the saved config is damaged", where=str(path),
                             hint="start over with --force instead of --resume")
    old, new = flatten(saved), flatten(yaml.safe_load(dump(cfg)))
    changed = sorted(k for k in old.keys() | new.keys()
                     if not _same_setting(old.get(k), new.get(k)) and not k.startswith(RESUME_MAY_CHANGE))
    if changed:
        shown = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise TunesmithError(f"--resume with a changed config: {shown}{more}; these change the model, the data or "
                             "the training, so the checkpoint does not belong to this config", where=str(path),
                             hint="undo those changes to resume, or start over with --force (or another name)")


def set_status(run_dir: Path, state: str, **extra) -> None:
    write_json(run_dir / STATUS, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra})


def file_hashes(refs: list[str]) -> dict[str, str]:
    """sha256 of every data file a run read (folders: each file inside; samples: their folder)."""
    from .cache import home

    out = {}
    for ref in refs:
        path = home() / "samples" / ref[len("sample:"):] if ref.startswith("sample:") else Path(ref)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                out[f"{ref}:{f.name}" if path.is_dir() else ref] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def manifest(cfg, model_kwargs: dict) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("tunesmith", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    sections = [cfg.data] + [task.data for task in getattr(cfg.regime, "tasks", None) or []]
    data_refs = list(dict.fromkeys(r for d in sections for r in (d.train, d.validation, d.test) if r))
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "allocator": allocator.describe(),
        "versions": versions,
        "seed": cfg.train.seed,
        "git_commit": commit or None,
        "data_sha256": file_hashes(data_refs),
        "model": cfg.model.name,
        "model_kwargs": model_kwargs,
    }


def read_finished(run_dir: Path):
    """A finished run's resolved config, model head arguments, summary and weights folder, each checked, so a
    damaged file is a located error: (cfg, model_kwargs, summary, weights)."""
    import yaml

    from .config import _Source, validate
    from .models.load import check_safetensors

    path = run_dir / CONFIG
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise TunesmithError("the run's saved config is damaged (not a YAML mapping)", where=str(path),
                             hint="the run folder is corrupt: train it again")
    cfg = validate(data, _Source(str(path)))
    manifest_data, summary = read_json(run_dir / MANIFEST), read_json(run_dir / SUMMARY)
    kwargs = manifest_data.get("model_kwargs") if isinstance(manifest_data, dict) else None
    weights = summary.get("weights") if isinstance(summary, dict) else None
    if not isinstance(kwargs, dict):
        raise TunesmithError("no model_kwargs in the manifest", where=str(run_dir / MANIFEST),
                             hint="the run folder is corrupt: train it again")
    if not isinstance(weights, str) or not (run_dir / weights).is_dir() or "/" in weights or weights.startswith("."):
        raise TunesmithError(f"the summary names no weights folder of this run (weights: {weights!r})",
                             where=str(run_dir / SUMMARY), hint="the run folder is corrupt: train it again")
    for f in sorted((run_dir / weights).glob("*.safetensors")):
        check_safetensors(f)
    for name in ("adapter_config.json", "config.json"):
        if (run_dir / weights / name).exists():
            read_json(run_dir / weights / name)
    return cfg, kwargs, summary, run_dir / weights


def peak_memory_mb() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def save_weights(run_dir: Path, model, tokenizer) -> str:
    """Adapter (peft format) for parameter-efficient runs, full safetensors weights otherwise."""
    from .models.load import quiet_transformers

    is_peft = hasattr(model, "peft_config")
    out = run_dir / ("adapter" if is_peft else "model")
    with quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    if is_peft:
        portable_adapter(out)
    honour_umask(out)
    return out.name


def honour_umask(folder: Path) -> None:
    """Give the files in `folder` the mode a plain `open()` would: safetensors writes its files 0600 (readable by
    the owner alone), which keeps a shared model folder from others on the machine the umask lets in."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)


def portable_base_name(base: str | None) -> str | None:
    """The name a config gave the base model, not the cache folder it was read from: a packaged sample's folder
    becomes `sample:NAME` (hub ids and the user's own paths are kept as they are)."""
    from .models.samples import MODELS

    if base:
        for name, sample in MODELS.items():
            if Path(base).expanduser().resolve() == sample.path().resolve():
                return f"sample:{name}"
    return base


def portable_adapter(folder: Path) -> None:
    """adapter_config.json as peft writes it names the base by the local folder it was loaded from and may list a
    head twice in modules_to_save (peft adds the classifier, and so does the tuning); name the base portably and
    list each module once, so the folder works on another machine (peft's from_pretrained with the base given)."""
    path = folder / "adapter_config.json"
    if not path.exists():
        return
    data = read_json(path)
    data["base_model_name_or_path"] = portable_base_name(data.get("base_model_name_or_path"))
    if isinstance(data.get("modules_to_save"), list):
        data["modules_to_save"] = list(dict.fromkeys(data["modules_to_save"]))
    write_json(path, data)
