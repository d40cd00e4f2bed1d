"""`berth`: the command-line client for development and debugging (like containerd's ctr).

Trio-free and import-light, so it starts fast: this module knows every verb by name and
imports only the module of the verb being run (`berth --help` imports none of them).
Container IO never passes through berthd: `run` and `attach` make FIFOs that the
container's shim reads and writes directly, so a daemon restart does not cut a running
`berth run`; it reconnects and keeps waiting.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (`berth --help` never does)
if TYPE_CHECKING:
    import argparse
    from typing import NoReturn, Protocol

    from berth.daemon.cli.session import Session
    from berth.daemon.cli.subverbs import Arguments

    class Verb(Protocol):
        """What a verb's module provides (berth.daemon.cli.VERB)."""

        def add_arguments(self, parser: argparse.ArgumentParser, wanted: str | None) -> None:
            """Fill the verb's parser; with its sub-verbs, only `wanted` unless None."""

        def run(self, session: Session, args: argparse.Namespace) -> int:
            """Run the parsed command; the exit code."""


DEFAULT_ADDRESS = "/run/berth/berthd.sock"
DEFAULT_TIMEOUT = 30.0

# verb -> (its aliases, its line in `berth --help`, the module of berth.daemon.cli that
# implements it), in the order of that help
VERBS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "images": (("i",), "manage images", "images"),
    "content": ((), "the content store (blobs)", "content"),
    "snapshots": ((), "snapshots and their mounts", "snapshots"),
    "leases": ((), "leases protect objects being built from GC", "leases"),
    "gc": ((), "remove unreferenced content and snapshots now", "gc"),
    "version": ((), "client and server versions", "version"),
    "namespaces": (("ns",), "manage namespaces", "namespaces"),
    "containers": (("c",), "manage containers", "containers"),
    "tasks": (("t",), "manage tasks", "tasks"),
    "events": ((), "stream events", "events"),
    "network": (("net",), "CNI networks and containers' attachments", "network"),
    "run": ((), "create and run a container", "run"),
    "completion": ((), "print a shell completion script (bash)", "completion"),
}
# verb or alias -> verb
NAMES = {name: verb for verb, entry in VERBS.items() for name in (verb, *entry[0])}


def _module(verb: str) -> Verb:
    """The module that implements `verb`, imported now (and only now)."""
    name = f"berth.daemon.cli.{VERBS[verb][2]}"
    __import__(name)  # not importlib: the import statement's machinery, as -X importtime sees
    module: Verb = sys.modules[name]
    return module


EXIT_STATUS = """\
exit status:
  0    success
  1    an error, said on stderr as `berth: ...` (berthd refused the call or cannot be
       reached, a file cannot be read, ...)
  2    a usage error (bad options or arguments): nothing was asked of berthd
  130  interrupted (Ctrl-C)
  run, tasks start, tasks exec and tasks attach, attached, exit with the status of the
  container's process (or the exec's): 128+N if signal N killed it (137: SIGKILL); with
  -d they exit 0 once it started. tasks wait prints that status and exits 0 (as docker
  wait), tasks rm prints it beside the ID."""


def _formatter() -> type[argparse.HelpFormatter]:
    """argparse's help formatter, sized as argparse sizes it but without importing
    `shutil` for that (shutil brings bz2, lzma and fnmatch: 1.7 ms of every start, since
    argparse makes a formatter for each argument it adds). Descriptions and epilogs are
    printed as written (the exit status table). Made on use: argparse is imported only
    when a parser is built."""
    import argparse

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def __init__(self, prog: str) -> None:
            try:
                columns = int(os.environ.get("COLUMNS", "0"))
            except ValueError:
                columns = 0
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
                except (AttributeError, OSError, ValueError):
                    columns = 80
            super().__init__(prog, width=columns - 2)

    return Formatter


# The options before the verb, by name (_words skips their values).
GLOBAL_OPTIONS = frozenset({"--address", "-a", "--namespace", "-n", "--timeout"})


class BadEnvironment(Exception):
    """A BERTH_* variable berth cannot use: `berth: MESSAGE`, exit 1 (not a usage error:
    the command line is fine)."""


class Defaults:
    """The global options' defaults, from the environment."""

    def __init__(self) -> None:
        self.address = os.environ.get("BERTH_ADDRESS", DEFAULT_ADDRESS)
        self.namespace = os.environ.get("BERTH_NAMESPACE", "default")
        self.timeout = DEFAULT_TIMEOUT
        text = os.environ.get("BERTH_TIMEOUT", "")
        if text:  # (set but empty: as if unset, as a shell's `BERTH_TIMEOUT= berth ...`)
            from berth.daemon.cli.fastargs import timeout_seconds

            try:
                self.timeout = timeout_seconds(text)
            except Exception as exc:  # argparse.ArgumentTypeError, not imported here
                raise BadEnvironment(f"BERTH_TIMEOUT: {exc}") from None


def _global_options(parser: Arguments) -> None:
    """The options before the verb (their defaults from the environment), declared once
    for argparse and for fastargs."""
    from berth.daemon.cli.fastargs import timeout_seconds

    defaults = Defaults()
    parser.add_argument(
        "--address",
        "-a",
        default=defaults.address,
        help=f"berthd socket (env BERTH_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default=defaults.namespace,
        help="namespace (env BERTH_NAMESPACE; default 'default')",
    )
    parser.add_argument(
        "--timeout",
        type=timeout_seconds,
        default=defaults.timeout,
        metavar="SECONDS",
        help="how long a call may wait for berthd before it gives up (env BERTH_TIMEOUT; "
        f"default {DEFAULT_TIMEOUT:g}); waits, events and transfers have no deadline but "
        "notice a daemon that stops answering",
    )


# Commands read without argparse (daemon/cli/fastargs.py): verb -> the one sub-verb of it
# that is (None: the verb has none). Those a benchmark measures: version and gc (argparse
# and a parser were ~7 ms of a ~25 ms `berth version`), run, and exec.
FAST_COMMANDS: dict[str, str | None] = {"version": None, "gc": None, "run": None, "tasks": "exec"}


def _fast(argv: list[str]) -> object | None:
    """The arguments of a hot command, read by fastargs from the same add_argument calls
    argparse would get; None for any other command or any line fastargs does not follow
    (argparse then parses it, and reports what is wrong)."""
    words = _words(argv)
    verb = NAMES.get(words[0]) if words else None
    if verb is None or verb not in FAST_COMMANDS:
        return None
    wanted = FAST_COMMANDS[verb]
    if wanted is not None and words[1:2] != [wanted]:
        return None
    from berth.daemon.cli import fastargs

    top = fastargs.Recorder()
    _global_options(top)  # (--version and --help are left to argparse)
    commands = top.add_subparsers(dest="verb", required=True)
    try:
        _module(verb).add_arguments(
            commands.add_parser(verb, aliases=list(VERBS[verb][0])),  # type: ignore[arg-type]
            wanted,
        )
    except fastargs.Unsupported:
        return None
    values: dict[str, object] = {}
    return fastargs.Namespace(values) if fastargs.parse(top, argv, values) else None


def _words(argv: list[str]) -> list[str]:
    """The command words (verb, sub-verb), found without a parser (global options take
    one value; the first word after an option-like token ends the search)."""
    words: list[str] = []
    i = 0
    while i < len(argv) and len(words) < 2:
        arg = argv[i]
        if not words and arg in GLOBAL_OPTIONS:
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
    """The argument parser; with `argv`, only the parsers its command needs. Building all
    of them costs every CLI start ~10 ms (30 parsers and their gettext lookups) and the
    import of every verb's module:
    - a known verb: only its parser, and of its sub-verbs only the one named (all of them
      if that is none or unknown, for the help or the error);
    - no verb at all (`berth`, `berth --help`, `berth -a`): every verb's name and help
      line, none of their arguments (argparse shows no more before it exits);
    - an unknown word where the verb should be (a typo, or an abbreviated global option
      such as `--addr X tasks ls`): everything, as argparse may yet find a verb."""
    import argparse

    formatter = _formatter()
    words = _words(argv) if argv is not None else []
    verb = NAMES.get(words[0]) if words else None
    sub = words[1] if len(words) > 1 else None
    parser = argparse.ArgumentParser(
        prog="berth",
        description="berth's command-line client",
        epilog=EXIT_STATUS,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"berth {_version()}")
    _global_options(parser)
    commands = parser.add_subparsers(dest="verb", required=True)
    for name, (aliases, help_line, _) in VERBS.items():
        if verb is not None and name != verb:
            continue
        p = commands.add_parser(
            name, aliases=list(aliases), help=help_line, formatter_class=formatter
        )
        if verb is not None:
            _module(name).add_arguments(p, sub)
        elif argv is None or words:
            _module(name).add_arguments(p, None)
    return parser


def _version() -> str:
    from berth.daemon import __version__  # imported already: this package's parent

    return __version__


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
    # fastargs' Namespace stands in for argparse's for the hot commands (no argparse)
    try:
        args: argparse.Namespace = _fast(argv) or build_parser(argv).parse_args(argv)  # type: ignore[assignment]
    except BadEnvironment as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return 1
    # Only now: the help and usage errors (argparse exits for them) need no connection.
    from berth.daemon.cli.session import CliError, Session
    from berth.shim.wire.errors import BerthError

    session = Session(args.address, args.namespace, args.timeout)
    try:
        return int(_module(NAMES[args.verb]).run(session, args))
    except CliError as exc:
        print(f"berth: {exc}", file=sys.stderr)
        return 1
    except BerthError as exc:
        print(f"berth: {exc.code.replace('_', ' ')}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except OSError as exc:  # a file named on the command line, say: no traceback
        print(f"berth: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        session.close()


def entry() -> NoReturn:
    """The `berth` command: main(), then an exit without the interpreter's finalization
    (tearing down every module and object it made: ~3-4 ms of each call, measured on
    2 vCPUs, where the whole of `berth version` is ~17 ms). Nothing of the CLI needs it:
    no atexit handler, no finalizer; the verbs close their own files and FIFO directories,
    and what they printed is flushed here. A flush that fails (a closed pipe) is an error,
    as Python's own exit would make it."""
    code = main()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with that descriptor closed: nothing was printed to it
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    entry()
