"""`berth tasks` (alias t): start, list, signal, inspect and remove tasks (the processes
of containers) and their execs. The IO of attached runs is imported only by the sub-verbs
that attach (start, exec), so `tasks ls` does not load it."""

from __future__ import annotations

import os
import sys

from berth.daemon.cli.fastargs import MAX_INT64, REMAINDER
from berth.daemon.cli.output import add_format, add_listing, print_json, print_listing, print_table
from berth.daemon.cli.session import CliError, suppress
from berth.daemon.cli.subverbs import SubVerbs
from berth.daemon.paging import all_pages
from berth.shim.wire.errors import BerthError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse

    from berth.daemon.cli.session import Session

TASKS = SubVerbs("t_cmd")


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    add = TASKS.parsers(parser, wanted)
    p = add("start")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("id")
    add_listing(add("ls"))
    p = add("kill")
    p.add_argument("-s", "--signal", default="SIGTERM")
    p.add_argument("--all", "-a", action="store_true", help="signal every process")
    p.add_argument("--exec-id")
    p.add_argument("id")
    p = add("ps")
    add_listing(p)
    p.add_argument("id")
    p = add("exec")
    p.add_argument("--exec-id", required=True)
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-d", "--detach", action="store_true")
    p.add_argument("--env", action="append", default=[])
    p.add_argument("--cwd")
    p.add_argument("id")
    p.add_argument("command", nargs=REMAINDER)
    add("attach").add_argument("id")
    add("pause").add_argument("id")
    add("resume").add_argument("id")
    p = add("metrics")
    add_format(p)
    p.add_argument("id")
    p = add("wait")
    p.add_argument("--exec-id")
    p.add_argument("id")
    p = add("rm")
    p.add_argument("-f", "--force", action="store_true", help="kill the task first")
    p.add_argument("ids", nargs="+")
    p = add("update")
    p.add_argument("--resources", required=True, help="OCI LinuxResources as JSON")
    p.add_argument("id")
    p = add("info")
    p.add_argument("--exec-id")
    p.add_argument("id")
    p = add("shim-log", help="the task's shim's own log (not the container's output)")
    p.add_argument("--tail", type=int, default=0, metavar="N", help="only the last N lines")
    p.add_argument("id")


def run(session: Session, args: argparse.Namespace) -> int:
    return TASKS.run(session, args)


@TASKS("start")
def start(session: Session, args: argparse.Namespace) -> int:
    container = session.call("containers.get", {"id": args.id})
    terminal = bool(container["spec"].get("process", {}).get("terminal"))
    if args.detach:
        session.call("tasks.create", {"container_id": args.id, "terminal": terminal, "log": True})
        session.call("tasks.start", {"container_id": args.id})
        return 0
    from berth.daemon.cli.io import run_attached

    return run_attached(session, args.id, terminal=terminal, exec_id=None, create_params={})


@TASKS("ls", "list")
def ls(session: Session, args: argparse.Namespace) -> int:
    tasks = list(all_pages(session.call, "tasks.list", "tasks", {}))
    print_listing(
        args,
        tasks,
        "id",
        ["TASK", "PID", "STATUS"],
        lambda t: [t["id"], str(t["pid"]), t["status"].upper()],
    )
    return 0


@TASKS("kill")
def kill(session: Session, args: argparse.Namespace) -> int:
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


@TASKS("ps")
def ps(session: Session, args: argparse.Namespace) -> int:
    procs = session.call("tasks.pids", {"container_id": args.id})["processes"]
    print_listing(
        args, procs, "pid", ["PID", "EXEC"], lambda p: [str(p["pid"]), p["exec_id"] or "-"]
    )
    return 0


@TASKS("exec")
def exec_(session: Session, args: argparse.Namespace) -> int:
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
    from berth.daemon.cli.io import run_attached

    return run_attached(
        session, args.id, terminal=args.tty, exec_id=args.exec_id, create_params={"spec": process}
    )


@TASKS("attach")
def attach(session: Session, args: argparse.Namespace) -> int:
    """Attach to a running task's recorded FIFOs, or follow its log when it has none."""
    container_id = args.id
    task = session.call("tasks.get", {"container_id": container_id})
    if task["status"] not in ("running", "paused", "created"):
        raise CliError(f"task {container_id} is {task['status']}")
    state_dir = session.call("introspection.server")["state"]
    log_dir = os.path.join(state_dir, "tasks", session.namespace, container_id, "log")
    if not os.path.exists(os.path.join(log_dir, "stdout.log")):
        raise CliError(f"task {container_id} has no log to follow (it was started with FIFOs)")
    import threading  # lazily: only attach needs a thread here

    from berth.daemon.cli.io import follow_log, open_log

    done = threading.Event()
    logs = [
        (os.path.join(log_dir, name), fd)
        for name, fd in (("stdout.log", 1), ("stderr.log", 2))
        if os.path.exists(os.path.join(log_dir, name))
    ]
    followers = [
        threading.Thread(
            target=follow_log, args=(path, open_log(path), fd, done.is_set), daemon=True
        )
        for path, fd in logs
    ]
    for thread in followers:
        thread.start()
    result = session.call_retrying("tasks.wait", {"container_id": container_id})
    done.set()
    for thread in followers:
        thread.join()  # the logs to their end (one pass after the exit), however slow our reader
    return int(result["exit_status"])


@TASKS("pause")
@TASKS("resume")
def pause_or_resume(session: Session, args: argparse.Namespace) -> int:
    session.call(f"tasks.{args.t_cmd}", {"container_id": args.id})
    return 0


@TASKS("metrics")
def metrics(session: Session, args: argparse.Namespace) -> int:
    stats = session.call("tasks.metrics", {"container_id": args.id})
    if args.format == "json":
        print_json(stats)
        return 0
    mem, cpu, pids = stats.get("memory", {}), stats.get("cpu", {}), stats.get("pids", {})
    print_table(
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


@TASKS("wait")
def wait(session: Session, args: argparse.Namespace) -> int:
    result = session.call_retrying(
        "tasks.wait", {"container_id": args.id, "exec_id": args.exec_id or ""}
    )
    print(result["exit_status"])
    return 0


@TASKS("rm", "delete")
def rm(session: Session, args: argparse.Namespace) -> int:
    for cid in args.ids:
        if args.force:
            with suppress(BerthError):
                session.call("tasks.kill", {"container_id": cid, "signal": 9, "all": True})
        result = session.call("tasks.delete", {"container_id": cid, "force": args.force})
        print(f"{cid} {result['exit_status']}")
    return 0


@TASKS("update")
def update(session: Session, args: argparse.Namespace) -> int:
    import json

    try:
        resources = json.loads(args.resources)
    except ValueError as exc:
        raise CliError(f"--resources is not JSON: {exc}") from None
    session.call("tasks.update", {"container_id": args.id, "resources": resources})
    return 0


@TASKS("info")
def info(session: Session, args: argparse.Namespace) -> int:
    task = session.call("tasks.get", {"container_id": args.id, "exec_id": args.exec_id or ""})
    if not args.exec_id:  # the task's network attachments (interfaces, addresses, ports)
        try:
            attached = session.call("attachments.get", {"container_id": args.id})
            task["networks"] = attached["networks"]
        except BerthError as exc:
            if exc.code != "not_found":
                raise
    print_json(task)
    return 0


@TASKS("shim-log")
def shim_log(session: Session, args: argparse.Namespace) -> int:
    if not 0 <= args.tail <= MAX_INT64:  # (beyond int64 the wire cannot carry it)
        raise CliError("--tail takes a number of lines >= 0")
    reply = session.call("tasks.shim_log", {"container_id": args.id, "tail": args.tail})
    sys.stdout.buffer.write(reply["data"])
    return 0
