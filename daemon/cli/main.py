"""`berth`: the command-line client for development and debugging (like containerd's ctr).

Trio-free and import-light, so it starts fast. Container IO never passes through berthd:
`run` and `attach` make FIFOs that the container's shim reads and writes directly, so a
daemon restart does not cut a running `berth run`; it reconnects and keeps waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import select
import signal
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

from berth.daemon.paging import all_pages
from berth.shim.wire.client import Client
from berth.shim.wire.errors import BerthError, Unavailable

DEFAULT_ADDRESS = "/run/berth/berthd.sock"
RECONNECT_INTERVAL = 0.1
DEFAULT_TIMEOUT = 30.0


class CliError(Exception):
    pass


# --- connection -----------------------------------------------------------------------


class Session:
    """Connection settings; opens clients on demand (a signal handler needs its own)."""

    def __init__(self, address: str, namespace: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.namespace = namespace
        self.timeout = timeout
        self._client: Client | None = None

    def client(self) -> Client:
        if self._client is None:
            self._client = self.connect()
        return self._client

    def connect(self) -> Client:
        try:
            return Client(
                self.address, namespace=self.namespace, timeout=self.timeout, peer_name="berth"
            )
        except Unavailable as exc:
            hint = " (is berthd running?)" if str(exc).startswith("cannot connect") else ""
            raise CliError(f"cannot reach berthd at {self.address}: {exc}{hint}") from None

    def call(self, method: str, params: dict[str, Any] | None = None, **meta: Any) -> Any:
        return self.client().call(method, params or {}, **meta)

    def call_retrying(self, method: str, params: dict[str, Any]) -> Any:
        """Call, reconnecting while the daemon is down (it is restarted, say): the
        container is unaffected, so waiting for it must be too."""
        noted = False
        while True:
            try:
                return self.call(method, params)
            except (Unavailable, CliError):
                if self._client is not None:
                    self._client.close()
                    self._client = None
                if not noted and sys.stderr.isatty():
                    print("berth: lost berthd; reconnecting...", file=sys.stderr)
                    noted = True
                time.sleep(RECONNECT_INTERVAL)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# --- output helpers -------------------------------------------------------------------


def _print_table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for row in rows:
        print(fmt.format(*row).rstrip())


def _json(doc: Any) -> None:
    import json  # lazily: most commands never print JSON, and every import costs start-up

    print(json.dumps(doc, indent=2, sort_keys=True))


def _ts(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


# --- IO plumbing ----------------------------------------------------------------------


def _splice_safe(dst: int) -> bool:
    """Whether splice(FIFO -> dst) is safe: only into a pipe or /dev/null.

    Kernel facts that bite here:
    - splice into a file that can block (a tty, a socket) takes the source pipe's mutex
      and keeps it while the write blocks; the shim then sleeps uninterruptibly (D state)
      on that mutex in its own read, write or close of the FIFO.
    - splice into a regular file reads the file offset when it starts and writes it back
      when it returns, without the lock write(2) takes. With `> log 2>&1` the stdout and
      stderr copies share one offset: the stderr copy, asleep in splice since the attach,
      wrote back the old offset at EOF, and the shell's next line overwrote the
      container's output (found by a run of scripts/demo with its output in a file).
    Pipe-to-pipe splice waits without the lock and has no offset; /dev/null keeps none."""
    st = os.fstat(dst)
    if stat.S_ISFIFO(st.st_mode):
        return True
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev


def _copy(src: int, dst: int) -> None:
    """Copy until EOF: splice(2) where that is safe (see _splice_safe), else read/write.
    Never splice *into* a FIFO from a source that can block (stdin may be a terminal)."""
    use_splice = _splice_safe(dst) and stat.S_ISFIFO(os.fstat(src).st_mode)
    while True:
        if use_splice:
            try:
                n = os.splice(src, dst, 1 << 20)
            except OSError:
                use_splice = False
                continue
            if n == 0:
                return
            continue
        _copy_plain(src, dst)
        return


def _copy_plain(src: int, dst: int) -> None:
    """read/write only: used for stdin, whose source (a terminal) may block for ever, and
    for regular files. A destination that is full (EAGAIN: someone else made our stdout
    non-blocking) is waited for; one that fails is reported, and the rest read and
    dropped so the container never blocks on us."""
    failed = False
    while True:
        try:
            data = os.read(src, 1 << 20)
        except OSError:
            return
        if not data:
            return
        if failed:
            continue
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(dst, view) :]
            except BlockingIOError:
                select.select([], [dst], [])
            except OSError as exc:
                if exc.errno != errno.EPIPE:  # a reader that left is not an error
                    with contextlib.suppress(OSError):
                        os.write(2, f"berth: output lost: {exc.strerror}\n".encode())
                failed = True
                break


def _private_dir() -> str:
    """A fresh 0700 directory under $TMPDIR (what tempfile.mkdtemp does, without importing
    tempfile and its dependencies into every CLI start)."""
    base = os.environ.get("TMPDIR", "/tmp")
    for _ in range(100):
        path = os.path.join(base, "berth-io-" + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue
    raise CliError(f"cannot create a private directory in {base}")


class Fifos:
    """FIFOs for one process's stdio, in a private temp dir, removed on close."""

    def __init__(self, stdin: bool, stdout: bool, stderr: bool) -> None:
        self.dir = _private_dir()
        self.paths: dict[str, str] = {}
        for name, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr)):
            if wanted:
                path = os.path.join(self.dir, name)
                os.mkfifo(path, 0o600)
                self.paths[name] = path
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []

    def params(self) -> dict[str, Any]:
        return dict(self.paths)

    def attach(self) -> None:
        """Open our ends (after the shim opened its own) and start copying."""
        for name, target in (("stdout", 1), ("stderr", 2)):
            if name in self.paths:
                fd = os.open(self.paths[name], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                os.set_blocking(fd, True)
                self._fds.append(fd)
                self._start(_copy, fd, target, name)
        if "stdin" in self.paths:
            fd = os.open(self.paths["stdin"], os.O_WRONLY | os.O_CLOEXEC)

            def pump(dst: int = fd) -> None:
                _copy_plain(0, dst)
                os.close(dst)  # the container sees EOF on its stdin

            thread = threading.Thread(target=pump, name="stdin", daemon=True)
            thread.start()

    def _start(self, fn: Any, *args: Any) -> None:
        thread = threading.Thread(target=fn, args=args[:2], name=args[2], daemon=True)
        thread.start()
        self._threads.append(thread)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until the shim closed the output FIFOs (all output delivered)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    if not enabled or not os.isatty(0):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int] | None:
    for fd in (0, 1, 2):
        try:
            size = os.get_terminal_size(fd)
            return size.columns, size.lines
        except OSError:
            continue
    return None


# --- process running (shared by run, tasks start, tasks exec) ---------------------------


def _run_attached(
    session: Session,
    container_id: str,
    *,
    terminal: bool,
    exec_id: str | None,
    create_params: dict[str, Any],
) -> int:
    """Create (task or exec) with FIFOs, start, forward signals/resizes, wait, drain."""
    fifos = Fifos(stdin=True, stdout=True, stderr=not terminal)
    size = terminal_size() if terminal else None
    params = {"container_id": container_id, "terminal": terminal, **fifos.params(), **create_params}
    if size:
        params.update(width=size[0], height=size[1])
    try:
        if exec_id:
            session.call("tasks.exec", {**params, "exec_id": exec_id})
        else:
            session.call("tasks.create", params)
        fifos.attach()
        target = {"container_id": container_id, "exec_id": exec_id or ""}

        def forward(signo: int, _frame: Any) -> None:
            try:
                with session.connect() as c:
                    c.call("tasks.kill", {**target, "signal": signo})
            except (BerthError, CliError):
                pass

        def resize(_signo: int, _frame: Any) -> None:
            new = terminal_size()
            if new:
                try:
                    with session.connect() as c:
                        c.call("tasks.resize", {**target, "width": new[0], "height": new[1]})
                except (BerthError, CliError):
                    pass

        with raw_terminal(terminal):
            if terminal:
                signal.signal(signal.SIGWINCH, resize)
            else:
                for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signo, forward)
            session.call("tasks.start", target)
            result = session.call_retrying("tasks.wait", target)
            fifos.drain()
        if exec_id:
            session.call_retrying("tasks.delete_process", target)
        return int(result["exit_status"])
    finally:
        fifos.close()


def _positionals(args: argparse.Namespace) -> None:
    """ctr's grammar: `IMAGE ID [CMD...]`, or `ID [CMD...]` with --rootfs or --busybox."""
    words = list(args.args)
    if words and words[0] == "--":
        words = words[1:]
    if args.rootfs or args.busybox:
        if not words:
            raise CliError("a container ID is required")
        args.image, args.id, args.command = None, words[0], words[1:]
    else:
        if len(words) < 2:
            raise CliError("IMAGE and ID are required (or --rootfs DIR / --busybox, then ID)")
        args.image, args.id, args.command = words[0], words[1], words[2:]


def _parse_mount(text: str) -> dict[str, Any]:
    """ctr's --mount: type=bind,src=/host,dst=/path,options=rbind:ro"""
    fields = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    dst = fields.get("dst") or fields.get("destination") or fields.get("target")
    src = fields.get("src") or fields.get("source", "")
    if not dst or not dst.startswith("/"):
        raise CliError(f"--mount {text!r}: needs dst=/absolute/path")
    kind = fields.get("type", "bind")
    options = [o for o in fields.get("options", "rbind" if kind == "bind" else "").split(":") if o]
    return {
        "destination": dst,
        "type": kind,
        "source": os.path.abspath(src) if src else kind,
        "options": options,
    }


def _spec_for(args: argparse.Namespace, container_id: str, namespace: str) -> dict[str, Any]:
    from berth.daemon.oci import default_spec

    rootfs = os.path.abspath(args.rootfs) if args.rootfs else ""
    if rootfs and not os.path.isdir(rootfs):
        raise CliError(f"rootfs {rootfs} is not a directory")
    command = args.command or ["sh"]
    spec = default_spec(
        container_id,
        namespace,
        command,
        root=rootfs,
        readonly_root=not rootfs or args.read_only,
        terminal=args.tty,
        env=args.env,
        cwd=args.cwd or "/",
    )
    return spec


def _create_container(session: Session, args: argparse.Namespace, container_id: str) -> None:
    labels = dict(item.split("=", 1) for item in args.label) if args.label else {}
    doc: dict[str, Any] = {"id": container_id, "runtime": args.runtime or "", "labels": labels}
    if args.image:
        from berth.daemon.reference import normalize

        image = normalize(args.image)
        snapshotter = args.snapshotter or ""
        session.call("images.unpack", {"name": image, "snapshotter": snapshotter})
        generated = session.call(
            "images.spec",
            {
                "image": image,
                "id": container_id,
                "args": args.command or None,
                "env": args.env,
                "cwd": args.cwd,
                "user": args.user,
                "terminal": args.tty,
                "snapshotter": snapshotter,
            },
        )
        spec = generated["spec"]
        # A lease holds the new snapshot until the container record references it.
        lease = session.call("leases.create", {"expire_seconds": 60})["id"]
        try:
            session.call(
                "snapshots.prepare",
                {"key": container_id, "parent": generated["chain_id"], "snapshotter": snapshotter},
                lease=lease,
            )
            doc.update(image=image, snapshotter=snapshotter, snapshot_key=container_id)
            spec["mounts"] += [_parse_mount(m) for m in args.mount]
            doc["spec"] = spec
            session.call("containers.create", doc)
        finally:
            with contextlib.suppress(BerthError):
                session.call("leases.delete", {"id": lease})
        return
    spec = _spec_for(args, container_id, session.namespace)
    if args.user:
        uid, _, gid = args.user.partition(":")
        if not uid.isdigit() or (gid and not gid.isdigit()):
            raise CliError("--user with --rootfs/--busybox takes numeric uid[:gid]")
        spec["process"]["user"] = {"uid": int(uid), "gid": int(gid or uid)}
    spec["mounts"] += [_parse_mount(m) for m in args.mount]
    doc["spec"] = spec
    session.call("containers.create", doc)


# --- commands -------------------------------------------------------------------------


def cmd_version(session: Session, args: argparse.Namespace) -> int:
    from berth.daemon import __version__

    print(f"Client:\n  Version: {__version__}")
    info = session.call("version")
    server = session.call("introspection.server")
    print(
        f"Server:\n  Version: {info['version']}\n  Protocol: {info['protocol']}\n"
        f"  UUID: {server['uuid']}"
    )
    return 0


def cmd_namespaces(session: Session, args: argparse.Namespace) -> int:
    if args.ns_cmd in ("ls", "list"):
        spaces = list(all_pages(session.call, "namespaces.list", "namespaces", {}))
        if args.format == "json":
            _json(spaces)
        else:
            _print_table(
                [[n["name"], ",".join(f"{k}={v}" for k, v in n["labels"].items())] for n in spaces],
                ["NAME", "LABELS"],
            )
    elif args.ns_cmd == "create":
        session.call("namespaces.create", {"name": args.name})
    elif args.ns_cmd in ("rm", "remove"):
        for name in args.names:
            session.call("namespaces.delete", {"name": name})
            print(name)
    return 0


def cmd_containers(session: Session, args: argparse.Namespace) -> int:
    if args.c_cmd == "create":
        _positionals(args)
        _create_container(session, args, args.id)
    elif args.c_cmd in ("ls", "list"):
        items = list(all_pages(session.call, "containers.list", "containers", {}))
        if args.format == "json":
            _json(items)
        else:
            _print_table(
                [[c["id"], c["image"] or "-", c["runtime"]["name"]] for c in items],
                ["CONTAINER", "IMAGE", "RUNTIME"],
            )
    elif args.c_cmd == "info":
        _json(session.call("containers.get", {"id": args.id}))
    elif args.c_cmd in ("rm", "delete"):
        for cid in args.ids:
            session.call("containers.delete", {"id": cid})
    return 0


def cmd_tasks(session: Session, args: argparse.Namespace) -> int:
    sub = args.t_cmd
    if sub == "start":
        container = session.call("containers.get", {"id": args.id})
        terminal = bool(container["spec"].get("process", {}).get("terminal"))
        if args.detach:
            session.call(
                "tasks.create", {"container_id": args.id, "terminal": terminal, "log": True}
            )
            session.call("tasks.start", {"container_id": args.id})
            return 0
        return _run_attached(session, args.id, terminal=terminal, exec_id=None, create_params={})
    if sub in ("ls", "list"):
        tasks = list(all_pages(session.call, "tasks.list", "tasks", {}))
        if args.format == "json":
            _json(tasks)
        else:
            _print_table(
                [[t["id"], str(t["pid"]), t["status"].upper()] for t in tasks],
                ["TASK", "PID", "STATUS"],
            )
        return 0
    if sub == "kill":
        session.call(
            "tasks.kill",
            {
                "container_id": args.id,
                "signal": args.signal,
                "all": args.all,
                "exec_id": args.exec_id or "",
            },
        )
        return 0
    if sub == "ps":
        procs = session.call("tasks.pids", {"container_id": args.id})["processes"]
        if args.format == "json":
            _json(procs)
        else:
            _print_table([[str(p["pid"]), p["exec_id"] or "-"] for p in procs], ["PID", "EXEC"])
        return 0
    if sub == "exec":
        container = session.call("containers.get", {"id": args.id})
        from berth.daemon.oci import exec_process

        process = exec_process(
            container["spec"], args.command, terminal=args.tty, env=args.env, cwd=args.cwd
        )
        if args.detach:
            session.call(
                "tasks.exec",
                {
                    "container_id": args.id,
                    "exec_id": args.exec_id,
                    "spec": process,
                    "terminal": args.tty,
                    "log": True,
                },
            )
            session.call("tasks.start", {"container_id": args.id, "exec_id": args.exec_id})
            return 0
        return _run_attached(
            session,
            args.id,
            terminal=args.tty,
            exec_id=args.exec_id,
            create_params={"spec": process},
        )
    if sub == "attach":
        return _attach(session, args.id)
    if sub in ("pause", "resume"):
        session.call(f"tasks.{sub}", {"container_id": args.id})
        return 0
    if sub == "metrics":
        stats = session.call("tasks.metrics", {"container_id": args.id})
        if args.format == "json":
            _json(stats)
        else:
            mem, cpu, pids = stats.get("memory", {}), stats.get("cpu", {}), stats.get("pids", {})
            _print_table(
                [
                    [
                        args.id,
                        str(mem.get("usage", 0)),
                        str(mem.get("limit", 0)),
                        str(cpu.get("usage_ns", 0)),
                        str(pids.get("current", 0)),
                    ]
                ],
                ["ID", "MEMORY", "LIMIT", "CPU_NS", "PIDS"],
            )
        return 0
    if sub == "wait":
        result = session.call_retrying(
            "tasks.wait", {"container_id": args.id, "exec_id": args.exec_id or ""}
        )
        print(result["exit_status"])
        return 0
    if sub in ("rm", "delete"):
        for cid in args.ids:
            if args.force:
                with contextlib.suppress(BerthError):
                    session.call("tasks.kill", {"container_id": cid, "signal": 9, "all": True})
            result = session.call("tasks.delete", {"container_id": cid, "force": args.force})
            print(f"{cid} {result['exit_status']}")
        return 0
    if sub == "update":
        import json

        resources = json.loads(args.resources)
        session.call("tasks.update", {"container_id": args.id, "resources": resources})
        return 0
    if sub == "info":
        _json(session.call("tasks.get", {"container_id": args.id, "exec_id": args.exec_id or ""}))
        return 0
    raise CliError(f"unknown tasks command {sub}")


def _attach(session: Session, container_id: str) -> int:
    """Attach to a running task's recorded FIFOs, or follow its log when it has none."""
    task = session.call("tasks.get", {"container_id": container_id})
    if task["status"] not in ("running", "paused", "created"):
        raise CliError(f"task {container_id} is {task['status']}")
    state_dir = session.call("introspection.server")["state"]
    log_path = os.path.join(
        state_dir, "tasks", session.namespace, container_id, "log", "stdout.log"
    )
    if not os.path.exists(log_path):
        raise CliError(f"task {container_id} has no log to follow (it was started with FIFOs)")
    done = threading.Event()

    def follow() -> None:
        with open(log_path, "rb") as f:
            while True:
                data = f.read(1 << 16)
                if data:
                    sys.stdout.buffer.write(data)
                    sys.stdout.buffer.flush()
                elif done.is_set():
                    return
                else:
                    time.sleep(0.05)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    result = session.call_retrying("tasks.wait", {"container_id": container_id})
    done.set()
    thread.join(5)
    return int(result["exit_status"])


def cmd_events(session: Session, args: argparse.Namespace) -> int:
    import json

    client = session.client()
    try:
        params: dict[str, Any] = {"filters": args.filter or []}
        if args.since is not None:
            params["since"] = args.since
        for envelope in client.stream("events.subscribe", params):
            print(
                f"{_ts(envelope['timestamp'])} {envelope['namespace']} {envelope['topic']} "
                f"{json.dumps(envelope['event'], sort_keys=True)}",
                flush=True,
            )
    except KeyboardInterrupt:
        pass
    return 0


def cmd_run(session: Session, args: argparse.Namespace) -> int:
    _positionals(args)
    container_id = args.id
    _create_container(session, args, container_id)
    try:
        log: Any = True
        if args.log_max_size or args.log_max_files:
            log = {
                k: v
                for k, v in (("max_size", args.log_max_size), ("max_files", args.log_max_files))
                if v
            }
        if args.detach:
            params = {"container_id": container_id, "terminal": args.tty, "log": log}
            size = terminal_size() if args.tty else None
            if size:
                params.update(width=size[0], height=size[1])
            session.call("tasks.create", params)
            session.call("tasks.start", {"container_id": container_id})
            return 0
        code = _run_attached(
            session,
            container_id,
            terminal=args.tty,
            exec_id=None,
            create_params={"log": log} if args.log else {},
        )
    except BaseException:
        if args.rm:
            _remove(session, container_id)
        raise
    if args.rm:
        _remove(session, container_id)
    return code


def _remove(session: Session, container_id: str) -> None:
    with contextlib.suppress(BerthError, CliError):
        session.call_retrying("tasks.delete", {"container_id": container_id, "force": True})
    with contextlib.suppress(BerthError, CliError):
        session.call("containers.delete", {"id": container_id})


# --- argument parsing -----------------------------------------------------------------


def _container_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runtime", help="runtime name from berthd's config (default: its default)")
    p.add_argument(
        "--rootfs", help="a root filesystem directory instead of an image (then: ID CMD)"
    )
    p.add_argument(
        "--busybox",
        action="store_true",
        help="the embedded busybox rootfs instead of an image (then: ID CMD)",
    )
    p.add_argument("--snapshotter", default="", help="overlayfs (default) or native")
    p.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--cwd", default=None)
    p.add_argument("--user", "-u", default=None, help="user[:group] (names from the image)")
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="type=bind,src=/host,dst=/path,options=rbind:ro",
    )
    p.add_argument("--label", action="append", default=[], metavar="K=V")


class _Unused:
    """Stands in for a sub-parser this invocation does not need."""

    def add_argument(self, *args: Any, **kwargs: Any) -> None:
        return None


_built: list[str] = []  # sub-parsers built by the last _parser() call


def _only(group: Any, wanted: str | None) -> Any:
    """add_parser for `group` that builds only `wanted` (and its aliases), or all."""

    def add(name: str, **kwargs: Any) -> Any:
        if wanted is None or wanted == name or wanted in kwargs.get("aliases", ()):
            _built.append(name)
            return group.add_parser(name, **kwargs)
        return _Unused()

    return add


def _add_version(commands: Any, wanted: str | None = None) -> None:
    commands.add_parser("version", help="client and server versions")


def _add_namespaces(commands: Any, wanted: str | None = None) -> None:
    ns = commands.add_parser("namespaces", aliases=["ns"], help="manage namespaces")
    ns_sub = ns.add_subparsers(dest="ns_cmd", required=True)
    add = _only(ns_sub, wanted)
    p = add("ls", aliases=["list"])
    p.add_argument("--format", choices=["table", "json"], default="table")
    add("create").add_argument("name")
    add("rm", aliases=["remove"]).add_argument("names", nargs="+")


def _add_containers(commands: Any, wanted: str | None = None) -> None:
    c = commands.add_parser("containers", aliases=["c"], help="manage containers")
    c_sub = c.add_subparsers(dest="c_cmd", required=True)
    add = _only(c_sub, wanted)
    p = add("create")
    _container_options(p)
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="IMAGE ID [CMD...] (ID [CMD...] with --rootfs or --busybox)",
    )
    p = add("ls", aliases=["list"])
    p.add_argument("--format", choices=["table", "json"], default="table")
    add("info").add_argument("id")
    add("rm", aliases=["delete"]).add_argument("ids", nargs="+")


def _add_tasks(commands: Any, wanted: str | None = None) -> None:
    t = commands.add_parser("tasks", aliases=["t"], help="manage tasks")
    t_sub = t.add_subparsers(dest="t_cmd", required=True)
    add = _only(t_sub, wanted)
    p = add("start")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("id")
    p = add("ls", aliases=["list"])
    p.add_argument("--format", choices=["table", "json"], default="table")
    p = add("kill")
    p.add_argument("-s", "--signal", default="SIGTERM")
    p.add_argument("--all", "-a", action="store_true", help="signal every process")
    p.add_argument("--exec-id")
    p.add_argument("id")
    p = add("ps")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("id")
    p = add("exec")
    p.add_argument("--exec-id", required=True)
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--cwd")
    p.add_argument("id")
    p.add_argument("command", nargs=argparse.REMAINDER)
    add("attach").add_argument("id")
    add("pause").add_argument("id")
    add("resume").add_argument("id")
    p = add("metrics")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("id")
    p = add("wait")
    p.add_argument("--exec-id")
    p.add_argument("id")
    p = add("rm", aliases=["delete"])
    p.add_argument("-f", "--force", action="store_true", help="kill the task first")
    p.add_argument("ids", nargs="+")
    p = add("update")
    p.add_argument("--resources", required=True, help="OCI LinuxResources as JSON")
    p.add_argument("id")
    p = add("info")
    p.add_argument("--exec-id")
    p.add_argument("id")


def _add_events(commands: Any, wanted: str | None = None) -> None:
    p = commands.add_parser("events", help="stream events")
    p.add_argument("--filter", action="append", help='e.g. topic=="/tasks/exit"')
    p.add_argument("--since", type=int, help="first replay what was published after this ns")


def _add_run(commands: Any, wanted: str | None = None) -> None:
    p = commands.add_parser("run", help="create and run a container")
    _container_options(p)
    p.add_argument("--rm", action="store_true", help="delete the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background (logs on)")
    p.add_argument("--log", action="store_true", help="also log output in the shim")
    p.add_argument(
        "--log-max-size",
        type=int,
        default=0,
        metavar="BYTES",
        help="rotate the shim's log at this size (default: berthd's config)",
    )
    p.add_argument(
        "--log-max-files",
        type=int,
        default=0,
        metavar="N",
        help="rotated files to keep (default: berthd's config)",
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        help="IMAGE ID [CMD...] (ID [CMD...] with --rootfs or --busybox)",
    )


def _lazy(name: str) -> Any:
    """A function of berth.daemon.cli.storage, imported only when its verb is used."""

    def call(*args: Any) -> Any:
        from berth.daemon.cli import storage as cli_images

        return getattr(cli_images, name)(*args)

    return call


_IMAGES = (_lazy("add_images"), _lazy("cmd_images"))

# verb (and alias) -> (the function that adds its parser, the command)
VERBS: dict[str, tuple[Any, Any]] = {
    "images": _IMAGES,
    "i": _IMAGES,
    "content": (_lazy("add_content"), _lazy("cmd_content")),
    "snapshots": (_lazy("add_snapshots"), _lazy("cmd_snapshots")),
    "leases": (_lazy("add_leases"), _lazy("cmd_leases")),
    "gc": (_lazy("add_gc"), _lazy("cmd_gc")),
    "version": (_add_version, cmd_version),
    "namespaces": (_add_namespaces, cmd_namespaces),
    "ns": (_add_namespaces, cmd_namespaces),
    "containers": (_add_containers, cmd_containers),
    "c": (_add_containers, cmd_containers),
    "tasks": (_add_tasks, cmd_tasks),
    "t": (_add_tasks, cmd_tasks),
    "events": (_add_events, cmd_events),
    "run": (_add_run, cmd_run),
}


GROUPED = (
    "namespaces",
    "ns",
    "containers",
    "c",
    "tasks",
    "t",
    "images",
    "i",
    "content",
    "snapshots",
    "leases",
)


def _words(argv: list[str]) -> list[str]:
    """The command words (verb, sub-verb), found without a parser (global options take
    one value; the first word after an option-like token ends the search)."""
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if not words and arg in ("--address", "-a", "--namespace", "-n", "--timeout"):
            i += 2
            continue
        if arg.startswith("-"):
            if words:
                break
            i += 1
            continue
        words.append(arg)
        i += 1
    return words


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser; with `argv`, only the sub-parsers its command needs (building
    all of them costs ~10 ms of every CLI start: 30 parsers and their gettext lookups)."""
    words = _words(argv) if argv is not None else []
    verb = words[0] if words else None
    sub = words[1] if len(words) > 1 else None
    _built.clear()
    parser = _parser(verb, sub)
    if sub is not None and verb in GROUPED and not _built:
        parser = _parser(verb, None)  # an unknown sub-verb: every choice, for the error
    return parser


def _parser(verb: str | None, sub: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="berth", description="berth's command-line client")
    parser.add_argument(
        "--address",
        "-a",
        default=os.environ.get("BERTH_ADDRESS", DEFAULT_ADDRESS),
        help=f"berthd socket (env BERTH_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default=os.environ.get("BERTH_NAMESPACE", "default"),
        help="namespace (env BERTH_NAMESPACE; default 'default')",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=float(os.environ.get("BERTH_TIMEOUT", DEFAULT_TIMEOUT)),
        metavar="SECONDS",
        help="how long a call may wait for berthd before it gives up (env BERTH_TIMEOUT; "
        f"default {DEFAULT_TIMEOUT:g}); waits, events and transfers have no deadline but "
        "notice a daemon that stops answering",
    )
    commands = parser.add_subparsers(dest="verb", required=True)
    if verb in VERBS:
        VERBS[verb][0](commands, sub)
    else:
        for add in dict.fromkeys(entry[0] for entry in VERBS.values()):
            add(commands)
    return parser


def _ensure_std_fds() -> None:
    """A CLI started with fd 0, 1 or 2 closed (`berth ... <&-`) would give that number to
    its daemon socket, and a copy thread or a print would then read or write the socket:
    each of them gets /dev/null instead."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def main(argv: list[str] | None = None) -> int:
    _ensure_std_fds()
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    session = Session(args.address, args.namespace, args.timeout)
    try:
        return int(VERBS[args.verb][1](session, args))
    except CliError as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return 1
    except BerthError as exc:
        print(f"berth: {exc.code.replace('_', ' ')}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    finally:
        session.close()


if __name__ == "__main__":
    sys.exit(main())
