"""containerd's own Go client against berth's containerd API in the task and runtime area:
process I/O (FIFOs, terminals, log URIs), execs, signals, pause/resume, resource updates,
metrics, events, attaching again, checkpoint, and the spec options clients build containers
with. One flow of the probe (tests/support/goclient/flows_runtime.go) per test, each
checked against Debian's containerd 1.6 where the host lets it run."""

from __future__ import annotations

import pytest

from tests.support import goclient
from tests.support.helpers import Daemon

pytestmark = pytest.mark.container


_flow = goclient.flow


def test_fifo_io_carries_stdin_stdout_and_stderr(goclient_served: tuple[Daemon, str]) -> None:
    """cio.NewCreator(WithStreams) FIFOs as ctr sets them up: 100 kB of stdin back on
    stdout, stderr apart, CloseIO(WithStdinCloser) at the input's end (ctr's stdinCloser),
    the output FIFOs closed at the exit; Status, a second Wait and Delete report the exit."""
    _flow(goclient_served, "io")


def test_close_io_ends_the_input(goclient_served: tuple[Daemon, str]) -> None:
    """A stdin pipe written, then closed, and CloseIO(WithStdinCloser): `cat` sees its end."""
    _flow(goclient_served, "io-close-stdin")


def test_exec_output_status_and_ids(goclient_served: tuple[Daemon, str]) -> None:
    """task.Exec with FIFO output: Status created then stopped, Wait before Start, exit 3
    and "hi"; Delete; the exec ID used again; a live exec's ID refused (AlreadyExists);
    Delete(WithProcessKill) of a running exec."""
    _flow(goclient_served, "exec")


def test_exec_of_a_missing_binary_fails_at_start(goclient_served: tuple[Daemon, str]) -> None:
    """Exec of a path the rootfs lacks: an error (at Exec or Start, as runc's at Start),
    the task unharmed, the exec ID free again."""
    out = _flow(goclient_served, "exec-missing-binary")
    assert "error:" in out


def test_a_terminal_task_is_resized(goclient_served: tuple[Daemon, str]) -> None:
    """cio.WithTerminal and oci.WithTTY: task.Resize(100, 40) shows in `stty size`."""
    _flow(goclient_served, "tty")


def test_a_terminal_exec_is_resized(goclient_served: tuple[Daemon, str]) -> None:
    """A terminal exec in a task without one: process.Resize(80, 30) shows in `stty size`."""
    _flow(goclient_served, "tty-exec")


def test_pids_and_metrics_as_ctr_reads_them(goclient_served: tuple[Daemon, str]) -> None:
    """task.Pids: the init's pid and an exec's with its runc ProcessDetails; task.Metrics:
    an Any typeurl unmarshals to cgroups' Metrics, memory, pids and CPU non-zero."""
    _flow(goclient_served, "pids-metrics")


def test_pause_and_resume_show_in_status(goclient_served: tuple[Daemon, str]) -> None:
    """Pause, Status Paused, Resume, Status Running; Delete of a running task refused
    (FailedPrecondition); Delete(WithProcessKill) of a paused one."""
    _flow(goclient_served, "pause-resume")


def test_a_memory_limit_update_reaches_the_cgroup(goclient_served: tuple[Daemon, str]) -> None:
    """task.Update(WithResources(memory limit)), read back through Metrics. (The flow
    notes what the container's own /sys/fs/cgroup shows; on hosts where runc finds no
    cgroup mount, under containerd too, that is nothing, so it is not asserted.)"""
    _flow(goclient_served, "update-resources")


def test_container_records_round_trip(goclient_served: tuple[Daemon, str]) -> None:
    """SetLabels (merged by field paths), Labels, Update(WithContainerLabels) replacing
    them, a spec Update, Spec, Info, LoadContainer, Task of a container without one
    (NotFound), Containers with a label filter."""
    _flow(goclient_served, "container-records")


def test_task_events_come_in_order(goclient_served: tuple[Daemon, str]) -> None:
    """client.Subscribe(topic~="/tasks/"): create, start, exit (status 5), delete for a
    run, each typeurl-unmarshalled to containerd's event types, in the namespace."""
    _flow(goclient_served, "events")


def test_a_published_event_reaches_a_subscriber(goclient_served: tuple[Daemon, str]) -> None:
    """EventService().Publish of a custom topic and Forward of an envelope with its own
    namespace and time, each received unchanged by Subscribe; bad topics and a Forward
    without a time are InvalidArgument."""
    _flow(goclient_served, "events-publish")


def test_signals_reach_tasks_and_execs(goclient_served: tuple[Daemon, str]) -> None:
    """Kill(SIGTERM) to a trapping shell: exit 9; an exec's own Kill: 137;
    Kill(SIGKILL, WithKillAll): 137, no pids left."""
    _flow(goclient_served, "kill-signals")


def test_a_task_is_attached_to_again(goclient_served: tuple[Daemon, str]) -> None:
    """A task whose first client closed its FIFO ends (ctr run -d) keeps running and keeps
    its stdin; LoadContainer, Task(cio.NewAttach) (ctr tasks attach) writes its stdin and
    reads its output through the FIFOs Tasks/Get reports."""
    _flow(goclient_served, "reattach")


def test_output_is_heard_again_after_attach(goclient_served: tuple[Daemon, str]) -> None:
    """Output only: a task printing on after its first client went away; Tasks/Get names
    the FIFOs it was created with, and Task(cio.NewAttach) hears new lines."""
    _flow(goclient_served, "reattach-output")


def test_checkpoint_is_refused_cleanly(goclient_served: tuple[Daemon, str]) -> None:
    """task.Checkpoint: Unimplemented (berth has no CRIU) at once, and the task the
    client paused first is running again."""
    out = _flow(goclient_served, "checkpoint")
    assert "(errdefs.NotImplemented)" in out


def test_spec_options_take_effect(goclient_served: tuple[Daemon, str]) -> None:
    """oci.WithHostNamespace(network), WithUser("1000:1000"), WithEnv, WithMounts (a
    read-only bind mount), WithCapabilities, WithProcessCwd, WithHostname."""
    _flow(goclient_served, "spec-opts")


def test_a_log_file_uri_gets_both_streams(goclient_served: tuple[Daemon, str]) -> None:
    """cio.LogFile: file:// stdout and stderr (ctr run --log-uri)."""
    _flow(goclient_served, "log-file")


def test_a_logging_binary_gets_both_streams(goclient_served: tuple[Daemon, str]) -> None:
    """cio.BinaryIO (nerdctl's logging): the runtime starts the logger with the streams on
    fds 3 and 4, readiness on fd 5, CONTAINER_ID, CONTAINER_NAMESPACE and the URI's args."""
    _flow(goclient_served, "log-binary")


def test_rootfs_mounts_come_with_the_task(goclient_served: tuple[Daemon, str]) -> None:
    """NewTask(WithRootFS(bind mount)) with the spec's default root "rootfs" (BuildKit's
    and nerdctl's way, from a snapshotter's mounts)."""
    _flow(goclient_served, "rootfs-mounts")


def test_tasks_are_listed(goclient_served: tuple[Daemon, str]) -> None:
    """TaskService().List as `ctr tasks ls`: the running task with its pid and status."""
    _flow(goclient_served, "task-list")


def test_exec_and_pause_events(goclient_served: tuple[Daemon, str]) -> None:
    """An exec's /tasks/exec-added, /tasks/exec-started (its pid), /tasks/exit with the
    exec's ID and status 2 (what dockerd learns an exec's end from); /tasks/paused and
    /tasks/resumed."""
    _flow(goclient_served, "events-exec")


def test_an_oom_kill_is_reported(goclient_served: tuple[Daemon, str]) -> None:
    """oci.WithMemoryLimit(16 MiB) and a shell holding 100 MB: /tasks/oom before the exit
    (dockerd's OOMKilled)."""
    out = _flow(goclient_served, "events-oom")
    assert "exit 137" in out


def test_runc_options_are_kept_and_accepted(goclient_served: tuple[Daemon, str]) -> None:
    """WithRuntime("io.containerd.runc.v2", &options.Options{NoNewKeyring}) comes back from
    Info as runc's Options; NewTask(WithNoNewKeyring) runs."""
    _flow(goclient_served, "runtime-options")
