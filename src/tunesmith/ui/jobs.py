"""Runs started from the web UI: a config (an example file, or YAML pasted into the page) is validated by the
same code as `tunesmith train` (so the page shows the CLI's own error text), then trained by
`python -m tunesmith train CONFIG output.dir=RUNS` in a child process whose output goes to a log the page polls.

Pasted YAML is saved as `<runs>/.ui/<name>.yaml` (relative paths in it are read from that folder, as for any
config file: use absolute paths, or samples); each job's log is `<runs>/.ui/<job>.log`. A job outlives the
page, and the run folder it writes is listed like any other run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import artifacts, stages
from ..config import RUN_NAME, load_config
from ..errors import ConfigError, TunesmithError

UI_DIR = ".ui"
"""Inside the runs folder: pasted configs and job logs (not a run folder, so `tunesmith runs` skips it)."""
LOG_CHUNK = 1 << 16
"""Most bytes of a log one poll returns."""


@dataclass
class Job:
    id: str
    run: str
    """The run's name (its folder under the runs folder)."""
    config: Path
    log: Path
    command: list[str]
    process: subprocess.Popen
    started: float = field(default_factory=time.time)

    def describe(self) -> dict:
        code = self.process.poll()
        return {"id": self.id, "run": self.run, "config": str(self.config), "command": self.command,
                "state": "running" if code is None else "completed" if code == 0 else "failed", "exit_code": code,
                "started": self.started}


def _config_name(text: str) -> str:
    """A file name for pasted YAML: its `name:` when that is a usable run name, else one made from the time
    (then also the run's name, as for any config file without `name:`)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None  # the real error is reported when the saved file is loaded, with its line
    name = data.get("name") if isinstance(data, dict) else None
    if isinstance(name, str) and RUN_NAME.fullmatch(name) and not name.endswith((" ", ".")):
        return name
    return time.strftime("ui-run-%Y%m%d-%H%M%S")


class Jobs:
    def __init__(self, runs: Path, examples: Path):
        self.runs, self.examples = runs, examples
        self.jobs: dict[str, Job] = {}

    def example_paths(self) -> dict[str, Path]:
        return {p.stem: p for p in sorted(self.examples.glob("*.yaml"))} if self.examples.is_dir() else {}

    def example(self, name: str) -> str:
        path = self.example_paths().get(name)
        if path is None:
            raise TunesmithError(f"no example named {name!r} in {self.examples}",
                                 hint=f"examples: {', '.join(self.example_paths()) or 'none'}")
        return path.read_text(encoding="utf-8")

    def _config_file(self, text: str, example: str | None) -> Path:
        """The example's own file when the page sends it unchanged (errors then name it, as on the command line),
        else the pasted text saved under the runs folder."""
        if example:
            path = self.example_paths().get(example)
            if path is not None and path.read_text(encoding="utf-8") == text:
                return path.resolve()
        if not text.strip():
            raise ConfigError("the config is empty", hint="pick an example or paste a run config (YAML)")
        folder = self.runs / UI_DIR
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{_config_name(text)}.yaml"
        path.write_text(text, encoding="utf-8")
        return path.resolve()

    def start(self, text: str, example: str | None = None, force: bool = False) -> Job:
        """Validate the config as `tunesmith train` does, refuse what it would refuse, then start it."""
        path = self._config_file(text, example)
        overrides = [f"output.dir={self.runs.resolve()}"]
        if stages.is_staged(path):
            run = stages.load(path, overrides).name
        else:
            cfg = load_config(path, overrides)
            run = cfg.name
            artifacts.check_run_dir(Path(cfg.output.dir) / cfg.name, resume=False, force=force)
        job_id = f"{run}-{time.strftime('%Y%m%d-%H%M%S')}"
        while job_id in self.jobs:
            job_id += "-1"
        log = self.runs / UI_DIR / f"{job_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "tunesmith", "train", str(path), *overrides, *(["--force"] if force else [])]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the log shows each line as it is printed
        with open(log, "wb") as out:
            process = subprocess.Popen(command, cwd=self.runs, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        job = Job(job_id, run, path, log, command, process)
        self.jobs[job_id] = job
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise TunesmithError(f"no job {job_id!r} was started by this UI")
        return self.jobs[job_id]

    def log(self, job_id: str, offset: int = 0) -> dict:
        """The log from byte `offset` (at most LOG_CHUNK bytes), where to ask next, and the job's state. The
        state is read before the log, so a `completed` answer's log is whole once `more` is false."""
        job = self.get(job_id)
        info = job.describe()
        with open(job.log, "rb") as f:
            f.seek(max(0, offset))
            data = f.read(LOG_CHUNK)
            more = bool(f.read(1))
        return {**info, "text": data.decode("utf-8", errors="replace"), "offset": max(0, offset) + len(data),
                "more": more}
