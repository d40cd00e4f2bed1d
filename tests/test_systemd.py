"""berthd under systemd: the units (scripts/systemd) checked by `systemd-analyze verify`,
socket activation through `systemd-socket-activate`, the notify protocol on a socket of
the test's own, and `berthd --takeover --detach`, the units' ExecReload.

No systemd runs as pid 1 here. `systemd-analyze verify` loads unit files offline (it
starts a private manager on the installed units, without running anything), and
`systemd-socket-activate` binds a socket as berthd.socket does and, at the first
connection, execs berthd in its own place with the socket as fd 3 (LISTEN_FDS), as
systemd starts berthd.service. A SOCK_DGRAM socket bound by the test is NOTIFY_SOCKET.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from berth.daemon import config as config_module
from berth.daemon import listeners, startup
from berth.shim.wire.client import Client
from tests.support.helpers import BERTHD, Daemon, is_gone, kill, spawn_reaped, wait_until

pytestmark = pytest.mark.container

UNITS = Path(__file__).resolve().parent.parent / "scripts" / "systemd"
INSTALLED_BERTHD = "/usr/local/bin/berthd"  # the units' paths, rewritten for the tests
INSTALLED_CONFIG = "/etc/berth/berthd.toml"
ACTIVATE = "systemd-socket-activate"
OOM_SCORE_ADJ = 500


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (scripts/setup installs Debian's systemd)")


# --- the unit files -------------------------------------------------------------------


def install_units(directory: Path, config_path: str) -> list[Path]:
    """Copies of the units, run from this tree: ExecStart/ExecReload name the venv's
    berthd and `config_path` (verify checks that the binary exists and is executable)."""
    copies = []
    for unit in ("berthd.service", "berthd.socket"):
        lines = (UNITS / unit).read_text().splitlines(keepends=True)
        for n, line in enumerate(lines):
            if line.startswith(("ExecStart=", "ExecReload=")):
                assert INSTALLED_BERTHD in line and INSTALLED_CONFIG in line, line
                lines[n] = line.replace(INSTALLED_BERTHD, BERTHD).replace(
                    INSTALLED_CONFIG, config_path
                )
        (directory / unit).write_text("".join(lines))
        copies.append(directory / unit)
    return copies


def verify(units: list[Path]) -> tuple[int, str]:
    """`systemd-analyze verify` of `units`: its status, and everything it printed. A
    warning (an unknown key, a value it cannot parse: "ignoring") leaves the status 0,
    so a clean verification is status 0 *and* no output."""
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        # warnings must be shown whatever the environment says
        env=dict(os.environ, SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_COLOR="0"),
        cwd=units[0].parent,
    )
    return result.returncode, (result.stdout + result.stderr).strip()


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    _require("systemd-analyze")
    config_path = tmp_path / "berthd.toml"
    config_path.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n')
    install_units(tmp_path, str(config_path))
    return tmp_path


def test_the_units_verify_clean(unit_dir: Path) -> None:
    status, output = verify([unit_dir / "berthd.service", unit_dir / "berthd.socket"])
    assert (status, output) == (0, "")


@pytest.mark.parametrize(
    ("unit", "old", "new", "expected"),
    [
        ("berthd.service", "KillMode=process", "KilMode=process", "Unknown key 'KilMode'"),
        ("berthd.service", "KillMode=process", "KillMode=proces", "kill mode"),
        ("berthd.service", "Type=notify", "Type=notifyy", "service type"),
        ("berthd.socket", "SocketMode=0660", "SocketMod=0660", "Unknown key 'SocketMod'"),
        ("berthd.service", f"ExecStart={BERTHD}", "ExecStart=/nonexistent/berthd", "not exec"),
        ("berthd.service", "Requires=berthd.socket", "Requires=berthd-x.socket", "not found"),
    ],
)
def test_a_broken_unit_fails_the_verification(
    unit_dir: Path, unit: str, old: str, new: str, expected: str
) -> None:
    path = unit_dir / unit
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    status, output = verify([unit_dir / "berthd.service", unit_dir / "berthd.socket"])
    assert status != 0 or output, "the verification cannot fail"
    assert expected in output


def unit_keys(path: Path) -> dict[str, list[str]]:
    """`Section.Key` -> its values, in order (comments and blank lines skipped)."""
    keys: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        keys.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return keys


def test_the_units_say_what_berthd_expects() -> None:
    service = unit_keys(UNITS / "berthd.service")
    sock = unit_keys(UNITS / "berthd.socket")
    for key, value in {
        "Service.Type": "notify",
        "Service.NotifyAccess": "all",
        "Service.KillMode": "process",
        "Service.Delegate": "yes",
        "Service.Restart": "always",
        "Service.TasksMax": "infinity",
        "Service.OOMScoreAdjust": "-999",
    }.items():
        assert service[key] == [value], key
    assert "berthd.socket" in service["Unit.Requires"][0].split()
    assert "berthd.socket" in service["Unit.After"][0].split()
    [start], [reload] = service["Service.ExecStart"], service["Service.ExecReload"]
    assert reload == f"{start} --takeover --detach"
    # the socket is where berthd's default config looks, with the name berthd takes
    default = config_module.from_mapping({})
    assert sock["Socket.ListenStream"] == [default.address]
    assert sock["Socket.FileDescriptorName"] == [listeners.API]
    assert sock["Socket.SocketMode"] == ["0660"]
    assert sock["Socket.DirectoryMode"] == [f"0{startup.STATE_DIR:o}"]
    assert sock["Socket.Backlog"] == ["4096"]
    assert sock["Socket.Service"] == ["berthd.service"]


# --- socket activation ----------------------------------------------------------------


class Activated(Daemon):
    """berthd as systemd starts it from berthd.socket: systemd-socket-activate binds the
    socket and, at the first connection, execs berthd (same pid) with the socket as fd 3,
    LISTEN_FDNAMES=berthd. Under `choom`, as OOMScoreAdjust= does (with OOM_SCORE_ADJ:
    lowering it needs CAP_SYS_RESOURCE, which these sandboxes do not grant)."""

    def start(self) -> None:
        os.makedirs(self.state, mode=0o711, exist_ok=True)
        log_path = os.path.join(self.dir, f"berthd-{len(self.logs)}.log")
        self.logs.append(log_path)
        command = ["choom", "-n", str(OOM_SCORE_ADJ), "--", ACTIVATE, "-l", self.address]
        command += ["--fdname=berthd", self.berthd, "--config", self.config_path]
        try:
            reaper, pid = spawn_reaped(command, log_path)
            self.reapers.append(reaper)
            self.remember(pid)
            wait_until(
                lambda: "Listening on" in self.log_text() or reaper.poll() is not None,
                what="systemd-socket-activate to listen",
            )
            assert reaper.poll() is None, self.log_text()
        except BaseException:
            self.cleanup()
            raise


@pytest.fixture
def activated() -> Iterator[Activated]:
    _require(ACTIVATE)
    _require("choom")
    d = Activated()
    try:
        yield d
    finally:
        d.cleanup()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if item)


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


def test_socket_activation(activated: Activated) -> None:
    d = activated
    # berthd is not even started: its socket is systemd's (here systemd-socket-activate's)
    assert Path(f"/proc/{d.pid}/comm").read_text().startswith("systemd-socket")
    assert "serving on" not in d.log_text()
    # a client connecting now is queued in that socket's backlog, never refused (Client
    # does not retry a refused connect), and answered once berthd serves
    with Client(d.address, timeout=60) as client:
        assert client.call("version", {})["version"]
        assert client.call("introspection.server", {})["pid"] == d.pid  # exec'd in place
    assert f"listening socket {d.address}: systemd" in d.log_text()
    inode = os.stat(d.address).st_ino
    assert d.cli("run", "--busybox", "-d", "c1", "sleep", "600").returncode == 0
    [shim] = d.shim_pids().values()
    [init] = d.container_pids()
    # LISTEN_* were for berthd alone: nothing it starts (zygote, shims, containers) sees them
    below = [pid for pid in d.descendants() if pid != d.pid and not is_gone(pid)]
    assert shim in below and init in below and len(below) >= 3  # the zygote too
    for pid in below:
        assert not [k for k in environ(pid) if k.startswith("LISTEN_")], (pid, environ(pid))
    # OOMScoreAdjust= applies to berthd and its shims; a container gets its spec's 0
    scores = (oom_score_adj(d.pid), oom_score_adj(shim), oom_score_adj(init))
    assert scores == (OOM_SCORE_ADJ, OOM_SCORE_ADJ, 0)
    # `systemctl reload berthd`: the successor gets systemd's socket (the same one) over
    # the handover, and serves on it
    old = d.pid
    status, out, err = detached(d, "--takeover")
    assert status == 0, err
    new = int(out)
    wait_until(lambda: is_gone(old), what="the old berthd to exit")
    assert os.stat(d.address).st_ino == inode
    assert f"listening socket {d.address}: predecessor" in d.log_text()
    assert d.call("tasks.get", {"container_id": "c1"})["status"] == "running"
    # `systemctl stop berthd` (KillMode=process): SIGTERM to berthd alone; the container
    # runs on, and systemd's socket is left where it is, for the next berthd
    kill(new, signal.SIGTERM)
    wait_until(lambda: is_gone(new), what="berthd to stop")
    assert not is_gone(shim) and not is_gone(init)
    assert os.stat(d.address).st_ino == inode


# --- the notify protocol --------------------------------------------------------------


class Notifications:
    """systemd's end of the notify protocol: a SOCK_DGRAM socket at NOTIFY_SOCKET."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(path)

    def _receive(self, timeout: float) -> dict[str, str] | None:
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return None
        return dict(line.partition("=")[::2] for line in data.decode().splitlines())

    def until(self, done: Callable[[dict[str, str]], bool], timeout: float = 30) -> list[dict]:
        """The messages received up to the first that is `done` (included)."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(0.5)
            if message is not None:
                got.append(message)
                if done(message):
                    return got
        raise AssertionError(f"no such message within {timeout}s; got {got}")

    def queued(self) -> list[dict[str, str]]:
        """What has already arrived, without waiting."""
        got = []
        while (message := self._receive(0)) is not None:
            got.append(message)
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notified(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Daemon, Notifications]]:
    """A berthd (started by the Daemon helper) with NOTIFY_SOCKET set, and that socket."""
    base = tempfile.mkdtemp(prefix="bt-", dir="/tmp")
    notifications = Notifications(os.path.join(base, "notify.sock"))
    monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(base, "notify.sock"))
    try:
        d = Daemon(base_dir=base)
    except BaseException:
        notifications.close()
        shutil.rmtree(base, ignore_errors=True)
        raise
    try:
        yield d, notifications
    finally:
        notifications.close()
        d.cleanup()


def ready(message: dict[str, str]) -> bool:
    return message.get("READY") == "1"


def test_berthd_notifies_ready_mainpid_and_stopping(
    notified: tuple[Daemon, Notifications],
) -> None:
    d, notifications = notified
    first = notifications.until(ready)[-1]
    assert first["MAINPID"] == str(d.pid)
    old = d.pid
    new = d.take_over()
    # the successor names itself the main process; the old one, handing over, never says
    # STOPPING (systemd would take the whole service for stopping)
    got = notifications.until(lambda m: ready(m) and m.get("MAINPID") == str(new))
    wait_until(lambda: is_gone(old), what="the old berthd to exit")
    got += notifications.queued()
    assert not [m for m in got if "STOPPING" in m], got
    d.terminate()
    assert notifications.until(lambda m: m.get("STOPPING") == "1")[-1] == {"STOPPING": "1"}


# --- berthd --detach ------------------------------------------------------------------


def detached(d: Daemon, *flags: str, env: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """`berthd --config ... FLAGS --detach`, as ExecReload= runs it, its stdout and stderr
    in files; the detached daemon ends up under the test's reaper (a subreaper, as
    systemd is), which the cleanup stops. Its exit status, stdout and stderr."""
    base = os.path.join(d.dir, f"detach-{len(d.logs)}")
    d.logs.append(f"{base}.err")  # the detached daemon keeps a regular file as its stderr
    script = 'out=$1; shift; "$@" >"$out.out" 2>"$out.err"; echo $? >"$out.rc"'
    command = ["sh", "-c", script, "sh", base, "env", *env, BERTHD, "--config", d.config_path]
    reaper, _ = spawn_reaped([*command, *flags, "--detach"], f"{base}.log")
    d.reapers.append(reaper)

    def status() -> str:
        text = Path(f"{base}.rc").read_text() if os.path.exists(f"{base}.rc") else ""
        return text.strip() if text.endswith("\n") else ""

    code = int(wait_until(status, timeout=120, what="berthd --detach to return"))
    out, err = Path(f"{base}.out").read_text(), Path(f"{base}.err").read_text()
    if out.strip().isdigit():
        d.remember(int(out))
    return code, out, err


def test_takeover_detach_returns_once_the_successor_serves(
    notified: tuple[Daemon, Notifications],
) -> None:
    d, notifications = notified
    notifications.until(ready)
    # a shim (and so the runtime) never sees NOTIFY_SOCKET: `runc start` would wait for
    # the container itself to notify
    assert d.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    assert not [p for p in d.shim_pids().values() if "NOTIFY_SOCKET" in environ(p)]
    old = d.pid
    err_path = os.path.join(d.dir, f"detach-{len(d.logs)}.err")
    status, out, err = detached(d, "--takeover")
    assert status == 0, err
    new = int(out)
    # by the time the command returns, systemd knows the new main pid (the reload's
    # process is gone then: a later MAINPID= would come too late)
    assert {"READY": "1", "MAINPID": str(new), "STATUS": "serving"} in notifications.queued()
    assert new != old and d.active_pid() == new
    with Client(d.address, namespace=d.namespace) as client:
        assert client.call("introspection.server", {})["pid"] == new
        assert client.call("tasks.get", {"container_id": "kept"})["status"] == "running"
    wait_until(lambda: is_gone(old), what="the old berthd to exit")
    # it is detached: a session of its own; stdout /dev/null, stderr kept (a regular file)
    assert os.getsid(new) == new
    assert os.readlink(f"/proc/{new}/fd/1") == "/dev/null"
    assert os.readlink(f"/proc/{new}/fd/2") == err_path
    assert "handed over to this one" in Path(err_path).read_text()
    # --detach alone: a stopped berthd started again, detached
    kill(new, signal.SIGTERM)
    wait_until(lambda: is_gone(new), what="berthd to stop")
    status, out, err = detached(d)
    assert status == 0, err
    assert d.call("introspection.server")["pid"] == int(out)
    assert d.call("tasks.get", {"container_id": "kept"})["status"] == "running"


def test_a_failed_takeover_detach_says_why_and_the_old_daemon_resumes(daemon: Daemon) -> None:
    assert daemon.cli("run", "--busybox", "-d", "kept", "sleep", "600").returncode == 0
    # the active daemon was itself started with --takeover --detach: resuming, it must
    # not fork again (same pid: systemd's main pid)
    status, out, err = detached(daemon, "--takeover")
    assert status == 0, err
    active = int(out)
    wait_until(lambda: daemon.active_pid() == active, what="the detached daemon to serve")
    fault = ("BERTH_TAKEOVER_FAULT=after-handover",)  # the successor exits 70 half-way
    status, out, err = detached(daemon, "--takeover", env=fault)
    assert (status, out) == (1, "")
    assert "exited with status 70 before serving" in err
    wait_until(lambda: daemon.active_pid() == active, timeout=30, what="the old one to resume")
    with Client(daemon.address, namespace=daemon.namespace) as client:
        assert client.call("introspection.server", {})["pid"] == active
        assert client.call("tasks.get", {"container_id": "kept"})["status"] == "running"
    assert not is_gone(active)


def test_a_detached_daemon_that_cannot_start_reports_its_error(daemon: Daemon) -> None:
    # a second active daemon on the same state dir: the forked one fails on the lock; the
    # command's stderr is a pipe, so the forked daemon's stderr is /dev/null and its log
    # and error come over the pipe, printed by the command
    result = subprocess.run(
        [BERTHD, "--config", daemon.config_path, "--detach"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert "is in use by another berthd" in result.stderr
    assert "exited with status 1 before serving" in result.stderr
    assert daemon.active_pid() == daemon.pid
    assert daemon.call("version")


def test_detach_refuses_a_bad_configuration_before_forking(tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.toml", tmp_path / "good.toml"
    bad.write_text(f'root = "{tmp_path}/root"\nstate = "relative/state"\n')
    good.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n')
    # no berthd runs: an invalid config, or --detach with --standby, is refused at once
    for config, flags in (
        (bad, ["--takeover", "--detach"]),
        (bad, ["--detach"]),
        (good, ["--standby", "--detach"]),
    ):
        result = subprocess.run(
            [BERTHD, "--config", str(config), *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result
        assert result.stderr.startswith("berthd: bad configuration:"), result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "state").exists()  # nothing started
