"""berth's releases, and the previous one built from the repository's own history.

The compatibility promise (README, "Compatibility"): a release works with what the previous
minor release left behind: its shims, its state dir, its database, its clients. The test
that keeps the promise (tests/test_compat.py) and the upgrade benchmark run that release
for real: `install(PREVIOUS)` exports its commit with `git archive` and installs it,
non-editable, into a venv of its own under build/releases/ (kept between runs: the cffi
module is compiled once). Its dependencies come from this checkout's .venv through a .pth
line, so nothing is downloaded; the release's own `berth` package shadows the tree's.

When a minor release is tagged, PREVIOUS moves to it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "releases"


@dataclasses.dataclass(frozen=True)
class Release:
    version: str
    commit: str  # the tagged commit (tag v<version>), full hash


PREVIOUS = Release("0.1.0", "c343cad57c7e361aeb571d55d04ae61dbaf089a3")


@dataclasses.dataclass(frozen=True)
class Installed:
    release: Release
    bin: Path  # berthd, berth, berth-shim of that release

    @property
    def berthd(self) -> str:
        return str(self.bin / "berthd")

    @property
    def berth(self) -> str:
        return str(self.bin / "berth")


class HistoryMissing(RuntimeError):
    """The commit is not in this clone (a shallow clone, say)."""


def history_has(commit: str) -> bool:
    probe = subprocess.run(
        ["git", "-C", str(REPO), "cat-file", "-e", f"{commit}^{{commit}}"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def is_shallow() -> bool:
    probe = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--is-shallow-repository"],
        capture_output=True,
        check=False,
    )
    return probe.stdout.strip() == b"true"


def install(release: Release) -> Installed:
    """The release installed in its own venv (built on first use; serialized by a lock)."""
    if not history_has(release.commit):
        raise HistoryMissing(f"commit {release.commit} (berth {release.version}) is not in {REPO}")
    home = CACHE / release.commit
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = home / "installed"
        if not done.exists():
            shutil.rmtree(home, ignore_errors=True)
            _build(release, home)
            done.write_text(release.version + "\n")
    return Installed(release, home / "venv" / "bin")


def _build(release: Release, home: Path) -> None:
    source, venv = home / "src", home / "venv"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", release.commit],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    base = (
        Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    )
    subprocess.run([str(base), "-m", "venv", "--without-pip", str(venv)], check=True)
    # Its dependencies (and the build's: setuptools, cffi) from this checkout's venv.
    purelib = Path(sysconfig.get_paths()["purelib"])
    site = venv / purelib.relative_to(sys.prefix)
    site.mkdir(parents=True, exist_ok=True)
    (site / "_berth_dependencies.pth").write_text(f"{purelib}\n")
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(source),
        ],
        check=True,
        env=env,
    )
