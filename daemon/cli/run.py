"""`berth run`: create a container and run its task, attached (its IO on ours, its exit
status ours) or detached (-d: logged by its shim), and with --rm delete it after."""

from __future__ import annotations

from berth.daemon.cli.containers import container_options, create_container, positionals
from berth.daemon.cli.fastargs import REMAINDER, count
from berth.daemon.cli.io import run_attached, terminal_size
from berth.daemon.cli.session import CliError, suppress
from berth.shim.wire.errors import BerthError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: every start pays for it
if TYPE_CHECKING:
    import argparse
    from typing import Any

    from berth.daemon.cli.session import Session


def add_arguments(parser: argparse.ArgumentParser, wanted: str | None) -> None:
    container_options(parser)
    parser.add_argument("--rm", action="store_true", help="delete the container when it exits")
    parser.add_argument(
        "-d", "--detach", action="store_true", help="run in the background (logs on)"
    )
    parser.add_argument("--log", action="store_true", help="also log output in the shim")
    parser.add_argument(
        "--log-uri",
        default="",
        metavar="URI",
        help="send stdout and stderr to file:///path (appended) or binary:///path?k=v (a "
        "logging binary, containerd's protocol) instead of this terminal",
    )
    parser.add_argument(
        "--log-max-size",
        type=count,
        default=0,
        metavar="BYTES",
        help="rotate the shim's log at this size (default: berthd's config)",
    )
    parser.add_argument(
        "--log-max-files",
        type=count,
        default=0,
        metavar="N",
        help="rotated files to keep (default: berthd's config)",
    )
    parser.add_argument(
        "args",
        nargs=REMAINDER,
        help="IMAGE ID [CMD...] (ID [CMD...] with --rootfs or --busybox)",
    )


def run(session: Session, args: argparse.Namespace) -> int:
    positionals(args)
    container_id = args.id
    create_container(session, args, container_id)
    try:
        log: Any = True
        if args.log_max_size or args.log_max_files:
            log = {
                k: v
                for k, v in (("max_size", args.log_max_size), ("max_files", args.log_max_files))
                if v
            }
        uri = {"stdout": args.log_uri, "stderr": args.log_uri} if args.log_uri else {}
        if args.detach:
            params = {"container_id": container_id, "terminal": args.tty, "log": log, **uri}
            size = terminal_size() if args.tty else None
            if size:
                params.update(width=size[0], height=size[1])
            session.call("tasks.create", params)
            session.call("tasks.start", {"container_id": container_id})
            return 0
        code = run_attached(
            session,
            container_id,
            terminal=args.tty,
            exec_id=None,
            create_params={**({"log": log} if args.log else {}), **uri},
            output=not uri,
        )
    except BaseException:
        if args.rm:
            _remove(session, container_id)
        raise
    if args.rm:
        params = {"id": container_id, "with_task": True, "background": True}
        try:  # the exit status is known: berthd removes the rest behind (removals.py)
            session.call("containers.delete", params)
        except (BerthError, CliError):
            # The answer lost (a handover): a delete of a container being removed waits
            # for that removal; a berthd without removals refuses (it has a task).
            try:
                session.call("containers.delete", {**params, "background": False})
            except (BerthError, CliError):
                _remove(session, container_id)
    return code


def _remove(session: Session, container_id: str) -> None:
    """--rm: the task and the container go, whatever the run's outcome."""
    with suppress(BerthError, CliError):
        session.call_retrying("tasks.delete", {"container_id": container_id, "force": True})
    with suppress(BerthError, CliError):
        session.call("containers.delete", {"id": container_id})
