"""Unit tests of the small pieces: native bindings, names, filters, store, files, loop."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from berth.daemon.events import (
    PUBLISHED_SHARE,
    QUEUE_SIZE,
    Exchange,
    check_topic,
    parse_event_filters,
)
from berth.daemon.metadata import SCHEMA_VERSION, Container, Store
from berth.native import SignalFD, tee
from berth.shim.exit import CorruptExitFile, ExitRecord, read_exit_file, write_exit_file
from berth.shim.loop import Future, Lock, Loop
from berth.shim.reaper import Reaper, exit_code
from berth.shim.state import CorruptState, ShimRecord, process_start_time, read_state, write_state
from berth.shim.wire.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from berth.shim.wire.names import validate
from berth.shim.wire.protocol import (
    ErrorReply,
    LocalProtocolError,
    RemoteProtocolError,
    Request,
    Response,
)
from tests.test_protocol import pair, raw_frame


def run_single_threaded(check: Any) -> None:
    """Run `check` in a forked child, which has one thread.

    SIGCHLD blocked in this thread only is not blocked in the threads an earlier
    test may have left in the pytest process; the kernel may deliver the signal
    there (default action: discard) and the signalfd never sees it."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        code = 0
        try:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            check()
        except BaseException:  # reported to the parent
            import traceback

            os.write(writer, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(writer)
    with os.fdopen(reader, "rb") as report:
        failure = report.read().decode()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, failure


def test_signalfd_reports_child_exit_and_reaper_dispatches_by_pid() -> None:
    def check() -> None:
        loop = Loop()
        reaper = Reaper(loop)
        pids = []
        for code in (0, 3, 7):
            pid = os.fork()
            if pid == 0:
                os._exit(code)
            pids.append(pid)
        futures = [reaper.watch(p) for p in pids]
        while not all(f.done() for f in futures):
            loop.run_once()
        assert [f.result() for f in futures] == [0, 3, 7]
        reaper.close()
        loop.close()

    run_single_threaded(check)


def test_signalfd_record_fields() -> None:
    def check() -> None:
        with SignalFD([signal.SIGCHLD]) as sfd:
            pid = os.fork()
            if pid == 0:
                os._exit(9)
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            records = sfd.read()
            os.waitpid(pid, 0)
        assert records and records[0].signo == signal.SIGCHLD
        assert records[0].pid == pid and records[0].status == 9

    run_single_threaded(check)


def test_early_exit_is_kept_until_claimed() -> None:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        loop = Loop()
        reaper = Reaper(loop)
        pid = os.fork()
        if pid == 0:
            os._exit(5)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        reaper.reap()  # nobody asked yet: goes to the early-exit cache
        fut = reaper.watch(pid)
        assert fut.done() and fut.result() == 5
        reaper.close()
        loop.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_an_exit_is_kept_while_its_spawn_is_held() -> None:
    """A container orphaning thousands of children (host pid namespace) must not push a
    short exec's exit out of the cache before `runc exec` returns its pid."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        loop = Loop()
        reaper = Reaper(loop)
        began = time.monotonic()
        reaper.hold(began)
        reaper._remember(100_000, 0, began + 1)  # the exec's exit, before its pid is known
        for pid in range(1, 10_000):  # then a flood of orphans
            reaper._remember(200_000 + pid, 0, began + 2)
        fut = reaper.watch(100_000, not_before=began)
        assert fut.done() and fut.result() == 0
        reaper.release(began)
        reaper._remember(300_000, 0, began + 3)  # released: the capacity holds again
        assert len(reaper._early) <= 4096
        reaper.close()
        loop.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_exit_code_mapping() -> None:
    assert exit_code(3 << 8) == 3
    assert exit_code(signal.SIGKILL) == 137
    assert exit_code(signal.SIGTERM) == 143


def test_tee_duplicates_without_consuming() -> None:
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    os.write(w1, b"hello")
    assert tee(r1, w2, 100) == 5
    assert os.read(r2, 100) == b"hello"
    assert os.read(r1, 100) == b"hello"
    for fd in (r1, w1, r2, w2):
        os.close(fd)


def test_loop_tasks_timers_and_lock() -> None:
    loop = Loop()
    order: list[str] = []
    lock = Lock()

    async def worker(name: str, delay: float) -> str:
        async with lock:
            order.append(f"{name}-in")
            await loop.sleep(delay)
            order.append(f"{name}-out")
        return name

    a = loop.create_task(worker("a", 0.02))
    b = loop.create_task(worker("b", 0.0))
    never: Future[None] = Future()
    timed = loop.timeout(never, 0.01)
    while not (a.done() and b.done() and timed.done()):
        loop.run_once()
    assert order == ["a-in", "a-out", "b-in", "b-out"]
    assert isinstance(timed.exception(), TimeoutError)
    loop.close()


@pytest.mark.parametrize(
    "bad", ["", "../x", "..", ".hidden", "a/b", "a\0b", "-x", "x" * 77, 5, None]
)
def test_identifier_validation_refuses_path_tricks(bad: object) -> None:
    with pytest.raises(InvalidArgument):
        validate(bad)


def test_identifier_validation_accepts_containerd_names() -> None:
    for good in ("a", "c1", "A.b-c_d", "x" * 76, "0abc"):
        assert validate(good) == good


def test_event_filters_containerd_syntax() -> None:
    """Event filters in containerd's grammar and with its matching (one parser for every
    service), except that a bad regular expression is refused at subscribe."""

    def match(text: str, envelope: dict[str, Any]) -> bool:
        return parse_event_filters([text])(envelope)

    env = {
        "topic": "/tasks/exit",
        "namespace": "moby",
        "event": {"container_id": "c1", "exit_status": 3},
    }
    assert match("namespace==moby,topic~=|^/tasks/|", env)
    assert match('topic=="/tasks/exit"', env)
    assert not match('topic!="/tasks/exit"', env)
    assert match("event.container_id==c1", env)
    assert not match("event.container_id==c2", env)
    # containerd's events answer only for non-empty strings (their generated Field)
    assert not match("event.exit_status", env)
    assert not match("event.exit_status==3", env)
    assert not match("event", env)  # a whole message is no value either
    assert match("event.exit_status!=3", env)  # absent reads as ""
    assert match("event.nothing~=^$", env)  # and `~=` matches that "", as containerd's
    assert not match("timestamp", {**env, "timestamp": 5})  # not a field of an Envelope
    delete = {"topic": "/tasks/delete", "event": {"container_id": "c1"}}  # a task's: no id
    assert not match("event.id==c1", delete)  # (test_daemon: berthd's have none)
    assert match("event.container_id==c1", delete)
    exec_delete = {"topic": "/tasks/delete", "event": {"container_id": "c1", "id": "e1"}}
    assert match("event.id==e1", exec_delete)
    assert parse_event_filters(["namespace==x", "namespace==moby"])(env)
    assert parse_event_filters([])(env) and parse_event_filters([""])(env)
    # what containerd's parser refuses (berth's own took some: `topic==/tasks/exit`
    # unquoted, `topic~=/(a|b)/x`), and a regular expression that does not compile
    for bad in (
        "topic~=|[|",
        "==x",
        'topic=="unterminated',
        "a b",
        "topic==/tasks/exit",
        "topic~=/(containers|tasks)/create",
    ):
        with pytest.raises(InvalidArgument):
            parse_event_filters([bad])


async def test_exchange_drops_a_subscriber_that_falls_behind() -> None:
    exchange = Exchange()
    slow = exchange.subscribe([])
    fast = exchange.subscribe(['topic=="/x"'])
    for i in range(5000):
        exchange.publish("ns", "/y", {"i": i})
    assert slow.overflowed and exchange.subscriber_count == 1
    exchange.publish("ns", "/x", {})
    envelope = fast.receive.receive_nowait()
    assert envelope["topic"] == "/x"
    with pytest.raises(trio.WouldBlock):
        fast.receive.receive_nowait()


async def test_a_clients_event_reaches_only_who_asks_and_is_never_numbered() -> None:
    """Events/Publish: subscribers that ask (with_published) get a client's event, marked;
    berthd's own consumers (who do not ask) and the history (replays, a successor) never
    see it, and it takes no number: a successor's next event cannot repeat one a
    resuming subscriber has already seen (which made it skip a real exit)."""
    exchange = Exchange()
    everyone = exchange.subscribe([], with_published=True)
    own = exchange.subscribe(['topic=="/tasks/exit"'])
    exchange.publish("ns", "/tasks/exit", {"id": "c0", "container_id": "c0"})
    exchange.publish_for_client("ns", "/tasks/exit", {"type_url": "x", "value": ""})
    real, forged = everyone.receive.receive_nowait(), everyone.receive.receive_nowait()
    assert forged["published"] is True and "seq" not in forged and "epoch" not in forged
    assert "published" not in real
    assert own.receive.receive_nowait()["event"]["id"] == "c0"
    with pytest.raises(trio.WouldBlock):
        own.receive.receive_nowait()
    assert [e["seq"] for e in exchange.history()] == [real["seq"]]
    successor = Exchange()
    successor.inherit(exchange.history())
    after = successor.publish("ns", "/tasks/exit", {"id": "c1", "container_id": "c1"})
    assert after["seq"] == real["seq"] + 1 and after["epoch"] == real["epoch"]
    resumed = successor.subscribe([], after_seq=real["seq"], epoch=real["epoch"])
    assert resumed.receive.receive_nowait()["event"]["id"] == "c1"


async def test_a_burst_of_clients_events_never_drops_a_subscriber() -> None:
    """A client's events fill at most PUBLISHED_SHARE of a subscriber's queue: the rest
    are not sent to it (counted), and berthd's own events still fit, so the subscriber
    (dockerd's, say) keeps its stream."""
    exchange = Exchange()
    slow = exchange.subscribe([], with_published=True)
    for _ in range(QUEUE_SIZE + 10):
        exchange.publish_for_client("ns", "/probe/x", {"type_url": "x", "value": ""})
    assert exchange.published_not_sent == QUEUE_SIZE + 10 - PUBLISHED_SHARE
    for i in range(QUEUE_SIZE - PUBLISHED_SHARE):
        exchange.publish("ns", "/tasks/exit", {"i": i})
    assert not slow.overflowed and exchange.subscriber_count == 1
    exchange.publish("ns", "/tasks/exit", {})  # and one more of berthd's overflows it
    assert slow.overflowed


def test_filters_are_bounded_in_number_size_and_regex_cost() -> None:
    """Each `~=` is compiled on berthd's (and berth-grpc's) loop: 40 patterns of \\p{L}
    classes took 7.8 s and 263 MiB. Counts, total size, pattern length and RE2's memory
    are bounded, and a refusal is quick."""
    heavy = "x~=|" + r"[\p{L}\p{N}]{20}" * 10 + "|"
    began = time.monotonic()
    with pytest.raises(InvalidArgument):
        parse_event_filters([heavy])
    with pytest.raises(InvalidArgument, match="more than"):
        parse_event_filters(['topic=="/a"'] * 65)
    with pytest.raises(InvalidArgument, match="together"):
        parse_event_filters(["topic~=|" + "a" * 1000 + "|"] * 20)
    with pytest.raises(InvalidArgument):
        parse_event_filters(["topic~=|" + "a" * 2000 + "|"])
    assert time.monotonic() - began < 1
    assert parse_event_filters(["topic~=|^/tasks/|", "namespace==moby"])({"topic": "/tasks/exit"})


@pytest.mark.parametrize(
    "topic", ["", "x", "/", "/a/", "//a", "/a b", "/-a", "/a..b", "/a_", "/" + "x" * 77]
)
def test_a_topic_containerd_refuses_is_refused(topic: str) -> None:
    with pytest.raises(InvalidArgument):
        check_topic(topic)


def test_topics_containerd_takes_are_taken() -> None:
    for topic in ("/a", "/tasks/exit", "/probe/custom.v1", "/a-b/c_d/e.f", "/" + "x" * 76):
        check_topic(topic)


def test_store_namespaces_and_containers(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "meta.db")
    store = Store(path)
    spec = {"process": {"args": ["true"]}}
    store.create_container(Container("ns1", "c1", "runc", spec, labels={"a": "b"}))
    with pytest.raises(AlreadyExists):
        store.create_container(Container("ns1", "c1", "runc", spec))
    with pytest.raises(FailedPrecondition):
        store.delete_namespace("ns1")
    assert store.get_container("ns1", "c1").labels == {"a": "b"}
    with pytest.raises(NotFound):
        store.get_container("ns2", "c1")
    store.update_container("ns1", "c1", labels={"x": "y"})
    store.close()
    reopened = Store(path)  # persisted, schema version recognised
    assert reopened.get_container("ns1", "c1").labels == {"x": "y"}
    reopened.delete_container("ns1", "c1")
    reopened.delete_namespace("ns1")
    assert [n["name"] for n in reopened.list_namespaces()] == []
    reopened.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_store_refuses_a_newer_schema(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "meta.db")
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(FailedPrecondition, match="newer berth"):
        Store(path)


def test_exit_files_are_atomic_and_validated(tmp_path: object) -> None:
    directory = os.path.join(str(tmp_path), "exit")
    write_exit_file(directory, "init", ExitRecord(pid=10, status=137, exited_at=123))
    assert read_exit_file(directory, "init") == ExitRecord(10, 137, 123)
    assert read_exit_file(directory, "exec-x") is None
    assert os.listdir(directory) == ["init.json"]  # no temporary left behind
    with open(os.path.join(directory, "bad.json"), "w") as f:
        f.write('{"version": 1, "pid": "x"}')
    with pytest.raises(CorruptExitFile):
        read_exit_file(directory, "bad")
    with open(os.path.join(directory, "future.json"), "w") as f:
        f.write('{"version": 7, "pid": 1, "status": 2, "exited_at": 3, "new_field": true}')
    assert read_exit_file(directory, "future") == ExitRecord(1, 2, 3)


def test_shim_state_file_versioning(tmp_path: object) -> None:
    bundle = str(tmp_path)
    record = ShimRecord(
        1,
        os.getpid(),
        process_start_time(os.getpid()) or 0,
        "/s",
        1,
        "c",
        "ns",
        bundle,
        {"binary": "runc"},
    )
    write_state(bundle, record)
    assert read_state(bundle) == record
    with open(os.path.join(bundle, "shim.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CorruptState):
        read_state(bundle)
    with open(os.path.join(bundle, "shim.json"), "w") as f:
        f.write('{"version": 0}')
    with pytest.raises(CorruptState):
        read_state(bundle)


def test_a_newer_shim_state_file_is_still_readable(tmp_path: object) -> None:
    # A newer writer only adds fields: an older reader accepts the version and ignores them.
    bundle = str(tmp_path)
    with open(os.path.join(bundle, "shim.json"), "w") as f:
        f.write(
            '{"version": 2, "pid": 10, "start_time": 5, "address": "/s", "protocol": 2, '
            '"id": "c", "namespace": "ns", "bundle": "/b", "runtime": {}, "cgroup": "/x"}'
        )
    record = read_state(bundle)
    assert record is not None and (record.version, record.pid, record.protocol) == (2, 10, 2)


async def test_since_replays_the_whole_history() -> None:
    exchange = Exchange()
    for i in range(3000):
        exchange.publish("ns", "/y", {"i": i}, timestamp=i + 1)
    sub = exchange.subscribe([], since=0)
    got = []
    while True:
        try:
            got.append(sub.receive.receive_nowait()["event"]["i"])
        except trio.WouldBlock:
            break
    assert got == list(range(3000)) and not sub.overflowed


def test_a_stale_early_exit_is_not_given_to_a_new_process_with_the_same_pid() -> None:
    import time as _time

    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        loop = Loop()
        reaper = Reaper(loop)
        pid = os.fork()
        if pid == 0:
            os._exit(3)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        reaper.reap()  # cached: nobody claimed it
        later = _time.monotonic() + 1  # "a new process with this pid was spawned later"
        fut = reaper.watch(pid, not_before=later)
        assert not fut.done()
        reaper.forget(pid)
        reaper.close()
        loop.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_log_sink_survives_its_file_vanishing_during_rotation(tmp_path: object) -> None:
    from berth.shim.io import LogConfig, LogSink

    path = os.path.join(str(tmp_path), "stdout.log")
    sink = LogSink(path, LogConfig(max_size=4096, max_files=1))
    sink.write(b"a" * 3000)
    os.unlink(path)  # removed behind the shim's back: rotation's unlink now fails
    sink.write(b"b" * 2000)  # crosses max_size: must not raise, must not keep a dead fd
    sink.write(b"c" * 10)
    sink.close()
    with open(path, "rb") as f:  # 1096 b's filled the vanished file to 4096; the rest here
        assert f.read() == b"b" * 904 + b"c" * 10
    assert sink.written == 5010


def test_log_sink_rotates_before_a_write_would_cross_its_limit(tmp_path: object) -> None:
    """Files never exceed max_size (they reached 1.25x: a write or splice landed whole
    and rotation came after it)."""
    from berth.shim.io import LogConfig, LogSink

    path = os.path.join(str(tmp_path), "out.log")
    sink = LogSink(path, LogConfig(max_size=4096, max_files=3))
    for size in (1000, 5000, 3000, 4096, 1, 6000):
        sink.write(b"x" * size)
    sink.close()
    sizes = [os.path.getsize(p) for p in (path, f"{path}.1", f"{path}.2")]
    assert all(size <= 4096 for size in sizes), sizes
    assert sink.written == 19097
    assert sizes == [19097 % 4096, 4096, 4096]


def test_a_malformed_request_with_an_id_can_be_answered() -> None:
    _client, server = pair()
    server.receive_data(raw_frame([2, 9, "m", "params-not-a-map", {}]))
    with pytest.raises(RemoteProtocolError) as err:
        server.next_event()
    assert err.value.request_id == 9
    # No LocalProtocolError: the id was opened, so the answer can close it.
    assert server.send(ErrorReply(9, "invalid_argument", "bad"))
    assert 9 not in server.open_requests


def test_an_unsendable_reply_changes_nothing() -> None:
    client, server = pair(max_frame=1024)
    server.receive_data(client.send(Request(1, "m", {}, {})))
    server.next_event()
    with pytest.raises(LocalProtocolError):
        server.send(Response(1, {"blob": b"x" * 5000}))
    assert 1 in server.open_requests  # still answerable
    client.receive_data(server.send(ErrorReply(1, "internal", "too big")))
    assert isinstance(client.next_event(), ErrorReply)


def test_a_client_refuses_replies_with_non_integer_ids() -> None:
    client, _ = pair()
    for bad in ([3, [1], None], [5, {"x": 1}, None], [6, [1]]):
        client.receive_data(raw_frame(bad))
        with pytest.raises(RemoteProtocolError):
            client.next_event()


def test_paged_lists() -> None:
    from berth.daemon.api import schema
    from berth.daemon.paging import PAGE_BYTES, all_pages, paged

    def page(params: dict[str, Any]) -> Any:  # as the API's edge hands it to a handler
        return schema.convert_params(schema.METHODS["containers.list"], params).page  # type: ignore[attr-defined]

    items = [{"id": f"c{i:03d}", "blob": "x" * (PAGE_BYTES // 5)} for i in range(12)]
    assert paged("c", items, "id", page({})) == {"c": items}  # no page asked: the whole list
    pages = []
    after = None
    while True:
        asked = {"page": {} if after is None else {"after": after}}
        reply = paged("c", items[::-1], "id", page(asked))
        pages.append([x["id"] for x in reply["c"]])
        after = reply["next"]
        if after is None:
            break
    assert len(pages) > 2 and [i for p in pages for i in p] == [x["id"] for x in items]

    def call(method: str, params: dict[str, Any]) -> Any:
        return paged("c", items, "id", page(params))

    assert list(all_pages(call, "x.list", "c", {})) == items
    huge = [{"id": "a", "blob": "x" * (PAGE_BYTES + 1)}, {"id": "b"}]
    assert paged("c", huge, "id", page({"page": {}})) == {"c": huge[:1], "next": "a"}  # alone
    assert paged("c", [], "id", page({"page": {}})) == {"c": [], "next": None}
    for bad in ({"page": []}, {"page": {"after": 3}}):
        with pytest.raises(schema.ValidationError):
            page(bad)
    # paged by a field its items lack (snapshots were: by "key", named "name"): a bug,
    # failed loudly instead of a list cut after its first page
    with pytest.raises(KeyError):
        paged("c", [{"name": "a"}], "key", page({"page": {}}))


def test_two_cli_copies_into_one_file_keep_its_offset(tmp_path: object) -> None:
    """`berth run ... > log 2>&1`: the stdout and stderr copies share one file offset.
    splice(2) into a regular file writes back the offset it started with, so the stderr
    copy (asleep in splice since the attach) rewound what the stdout copy wrote, and the
    next line of the shell overwrote the container's output."""
    import threading

    from berth.daemon.cli import io as cli

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fd1 = os.open(os.path.join(str(tmp_path), "log"), os.O_WRONLY | os.O_CREAT, 0o600)
    fd2 = os.dup(fd1)
    copies = [
        threading.Thread(target=cli._copy, args=(out_r, fd1)),
        threading.Thread(target=cli._copy, args=(err_r, fd2)),
    ]
    for thread in copies:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while _syscall(copies[1].native_id) not in ("0", "275"):  # read or splice (x86_64)
            assert time.monotonic() < deadline, "the stderr copy never blocked"
            time.sleep(0.005)
        os.write(out_w, b"out\n")
    finally:
        os.close(out_w)
        copies[0].join(5)
        os.close(err_w)
        copies[1].join(5)
    assert os.lseek(fd1, 0, os.SEEK_CUR) == 4
    for fd in (fd1, fd2, out_r, err_r):
        os.close(fd)


def _syscall(tid: int | None) -> str:
    try:
        with open(f"/proc/self/task/{tid}/syscall") as f:
            return f.read().split()[0]
    except (OSError, IndexError):
        return ""


def _leave_many(state_dir: str, keys: list[str]) -> None:
    from berth.daemon.grpc.handoff import Cursor, Handoff

    handoff = Handoff(state_dir)
    for n, key in enumerate(keys):
        handoff.leave(key, Cursor("epoch", n))
    os._exit(0)


def test_subscription_handoff_loses_nothing_between_processes(tmp_path: Any) -> None:
    """A replaced berth-grpc leaves cursors while its successor takes others from the same
    file: no entry may be lost to the other process's read-modify-write (a lost cursor is
    a lost exit for dockerd)."""
    from berth.daemon.grpc.handoff import Cursor, Handoff

    state = str(tmp_path)
    taker = Handoff(state)
    for n in range(100):
        taker.leave(f"taken-{n}", Cursor())  # entries this process takes back below
    children = []
    for name in ("a", "b"):
        pid = os.fork()
        if pid == 0:
            try:
                _leave_many(state, [f"{name}-{n}" for n in range(60)])
            finally:
                os._exit(1)
        children.append(pid)
    taken = 0
    try:
        for n in range(100):  # meanwhile, this process takes its own
            cursor = taker.take(f"taken-{n}")
            taken += cursor.since is not None
    finally:
        statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert statuses == [0, 0]
    assert taken == 100
    left = {entry["key"] for entry in taker._read()}
    assert left == {f"{name}-{n}" for name in "ab" for n in range(60)}


def test_the_embedded_rootfs_is_rebuilt_when_busybox_changes(tmp_path: Any) -> None:
    """The busybox digest is remembered per file (device, inode, size, mtime): a start
    does not hash the binary again, and a changed or replaced binary is seen."""
    import shutil

    from berth.daemon.tasks import rootfs

    busybox = rootfs.find_busybox()
    assert busybox is not None, "busybox-static is installed by scripts/setup"
    copy = str(tmp_path / "busybox")
    shutil.copy2(busybox, copy)
    dest = str(tmp_path / "rootfs")
    marker = os.path.join(dest, rootfs.MARKER)
    rootfs.build_busybox_rootfs(dest, copy)
    first = Path(marker).read_text()
    rootfs.build_busybox_rootfs(dest, copy)
    assert Path(marker).read_text() == first  # unchanged: not rebuilt
    with open(copy, "ab") as f:
        f.write(b"\0")  # an upgraded busybox (a binary that runs the same)
    rootfs.build_busybox_rootfs(dest, copy)
    assert Path(marker).read_text() != first


def test_an_exec_process_shares_nothing_with_the_container_spec() -> None:
    """exec_process copies the container's process (deeply, without the copy module): the
    exec's changes never reach the container's spec, nor one exec's another's."""
    from berth.daemon.oci import default_spec, exec_process

    spec = default_spec("c1", "default", ["sleep", "1"])
    before = repr(spec)
    one = exec_process(spec, ["sh"], env=["A=1"], cwd="/tmp")
    one["env"].append("B=2")
    one["capabilities"]["bounding"].append("CAP_SYS_ADMIN")
    one["rlimits"].clear()
    assert repr(spec) == before
    two = exec_process(spec, ["true"])
    assert two["env"] == spec["process"]["env"] and "B=2" not in two["env"]
    assert two["args"] == ["true"] and spec["process"]["args"] == ["sleep", "1"]


def test_berth_grpc_leaves_the_oom_protection_it_inherits(tmp_path: Path) -> None:
    """berthd's unit sets OOMScoreAdjust=-999; berth-grpc, which holds clients' requests,
    must not keep it (the kernel would kill a container instead); a score set higher by
    the operator stays. (A file stands for /proc/self/oom_score_adj: lowering the real one
    needs CAP_SYS_RESOURCE, which these sandboxes withhold even from root.)"""
    from berth.daemon.grpc.main import _leave_oom_protection

    score = tmp_path / "oom_score_adj"
    for before, after in (("-999\n", "0"), ("300\n", "300\n"), ("0\n", "0\n")):
        score.write_text(before)
        _leave_oom_protection(str(score))
        assert score.read_text() == after, before


def test_removing_a_wide_and_deep_tree_takes_memory_bounded_by_neither(tmp_path: Path) -> None:
    """What a container leaves in its writable layer decides the tree: one directory of
    30,000 entries and a chain 2,000 levels deep took ~6 MB to remove when every name
    of a directory, and every level's path, were held at once."""
    import tracemalloc

    from berth.shim.fs import remove_tree, tree_usage

    top = tmp_path / "layer"
    (top / "wide").mkdir(parents=True)
    (top / "wide" / "f").touch()
    for i in range(30_000):  # names, not inodes: links are quicker to make
        os.link(top / "wide" / "f", top / "wide" / f"f{i:06d}")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(2_000):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.close(os.open("leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    assert tree_usage(str(top))[1] == 1 + 30_001 + 2_000 + 1
    tracemalloc.start()
    try:
        remove_tree(str(top))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not top.exists()
    assert peak < 2 << 20, f"removal peaked at {peak} bytes"


# --- the metadata database on a full disk, and start-up errors in one line ---------------


def test_opening_an_up_to_date_database_writes_nothing(tmp_path: Path) -> None:
    """berthd must start on a full disk (reads need no space): it wrote its version on
    every open, and died of `database or disk is full`."""
    path = str(tmp_path / "meta.db")
    Store(path).close()  # created, migrated, version recorded; the WAL checkpointed away
    store = Store(path)
    try:
        wal = tmp_path / "meta.db-wal"
        assert not wal.exists() or wal.stat().st_size == 0, "opening wrote to the database"
        store.ensure_namespace("default")  # main.py's, at every start: exists already
        store.ensure_namespace("default")
    finally:
        store.close()
    with sqlite3.connect(path) as db:  # another berth's version is recorded over
        db.execute("UPDATE berth SET value = '0.0.1' WHERE key = 'version'")
    Store(path).close()
    from berth.daemon import __version__

    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM berth").fetchall() == [(__version__,)]


def test_a_migration_on_a_full_disk_spends_the_reserve_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A schema migration is the one write berthd cannot start without: a full disk
    releases the root's reserve (beside the database) and migrates again; without a
    reserve, one line says what to do."""
    full = sqlite3.OperationalError("database or disk is full")
    original = Store._migrate_to
    failures = {"left": 1}

    def migrate_to(self: Store, target: int) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise full
        original(self, target)

    monkeypatch.setattr(Store, "_migrate_to", migrate_to)
    reserve = tmp_path / "reserve"
    reserve.write_bytes(b"\0" * 4096)
    Store(str(tmp_path / "meta.db")).close()
    assert not reserve.exists()
    with sqlite3.connect(tmp_path / "meta.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    failures["left"] = 1  # no reserve left: a one-line error, typed `unavailable`
    from berth.shim.wire.errors import Unavailable

    with pytest.raises(Unavailable, match="no space left on device") as caught:
        Store(str(tmp_path / "other.db"))
    assert "\n" not in str(caught.value)


def test_a_database_that_cannot_be_opened_is_one_typed_error(tmp_path: Path) -> None:
    (tmp_path / "meta.db").mkdir()  # not a file: sqlite3 and the OS refuse it
    with pytest.raises(FailedPrecondition, match="cannot open the metadata database"):
        Store(str(tmp_path / "meta.db"))


def test_what_the_os_refuses_at_start_up_is_one_line(tmp_path: Path) -> None:
    """An OSError in a start-up step (here the root is a file) was a traceback."""
    from berth.daemon import startup
    from berth.daemon.config import Config

    (tmp_path / "root").write_text("not a directory")
    config = Config(root=str(tmp_path / "root"), state=str(tmp_path / "state"))
    with pytest.raises(startup.CannotStart, match="cannot prepare berthd's directories"):
        startup.prepare_dirs(config)


# --- berthd's configuration ----------------------------------------------------------------


def _load_config(tmp_path: Path, text: str) -> Any:
    from berth.daemon import config

    path = tmp_path / "berthd.toml"
    path.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n{text}')
    return config.load(["--config", str(path)])


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[container_log]\nmax_size = [1]\n", "[container_log] max_size must be an integer"),
        ("[container_log]\nmax_size = inf\n", "[container_log] max_size must be an integer"),
        ("[container_log]\nmax_size = 100\n", "[container_log] max_size must be an integer"),
        ("[container_log]\nmax_files = 0\n", "[container_log] max_files must be an integer"),
        ("socket_group = [1]\n", "socket_group must be an integer"),
        ("socket_group = -1\n", "socket_group must be an integer"),
        ("[grpc]\ngid = 99999999999\n", "[grpc] gid must be an integer"),
        ("[runtimes.runc]\nroot = 5\n", "[runtimes.runc] root must be a str"),
        ('[runtimes.runc]\nroot = "rel"\n', "[runtimes.runc] root must be an absolute path"),
        ('[runtimes.runc]\nbinary = "bin/runc"\n', "binary must be a command name or an"),
        ('[runtimes.runc]\nsystemd_cgroup = "false"\n', "systemd_cgroup must be a bool"),
        ("[runtimes]\nrunc = 1\n", "[runtimes.runc] must be a table"),
        ('log_level = "bogus"\n', "log_level must be one of"),
        ('default_snapshotter = "zfs"\n', "default_snapshotter must be one of"),
        ("[content]\ningest_expiry = inf\n", "[content] ingest_expiry must be a positive"),
        ("[content]\ningest_expiry = nan\n", "[content] ingest_expiry must be a positive"),
        ("[content]\ningest_expiry = 1e300\n", "[content] ingest_expiry must be a positive"),
        ('[network]\nconf_dir = "net.d"\n', "[network] conf_dir must be an absolute path"),
        ('[network]\ndefault_subnet = "x"\n', "[network] default_subnet must be a subnet"),
        ('[network]\ndefault_bridge = "a b"\n', "[network] default_bridge must be an"),
        ('log_levle = "debug"\n', "unknown key(s) in the config's top level: log_levle"),
        ("[container_log]\nmax_sise = 4096\n", "unknown key(s) in [container_log]: max_sise"),
        ('[runtimes.runc]\nbinray = "runc"\n', "unknown key(s) in [runtimes.runc]: binray"),
        ("[grpc]\nadress = 1\n", "unknown key(s) in [grpc]: adress"),
        ("root = \n", "berthd.toml: Invalid value"),
        ('address = "/tmp/a\\u0000b"\n', "address must be an absolute path"),
        (f'address = "/tmp/{"n" * 90}"\n', "address: the socket's name may be 85 bytes"),
    ],
)
def test_a_bad_config_value_is_refused_in_one_line(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        _load_config(tmp_path, text)
    assert error in str(caught.value) and "\n" not in str(caught.value), caught.value


def test_berthd_says_a_bad_config_in_one_line_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """As for every bad config (main.py): `berthd: bad configuration: ...`, exit 2,
    before anything starts; a TypeError or OverflowError was a traceback."""
    from berth.daemon import main

    for text in ("[container_log]\nmax_size = [1]\n", "socket_group = [1]\n", "[x]\n"):
        path = tmp_path / "berthd.toml"
        path.write_text(f'root = "{tmp_path}/root"\nstate = "{tmp_path}/state"\n{text}')
        assert main.main(["--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("berthd: bad configuration:") and err.count("\n") == 1, err
    assert not (tmp_path / "state").exists()


def test_the_configs_berth_documents_and_writes_still_load(tmp_path: Path) -> None:
    """Unknown keys are refused: config.py's documented example, the tests' daemons'
    configs and a permissive operator's load."""
    from berth.daemon import config

    documented = config.__doc__ or ""
    path = tmp_path / "documented.toml"
    path.write_text(documented[documented.index('root = "/var/lib/berth"') :])
    loaded = config.load(["--config", str(path)])
    assert loaded.ttrpc_address == "/run/berth/containerd.sock.ttrpc"
    assert loaded.log_max_size == 16777216 and loaded.grpc_gid == 0
    helpers = (
        'log_level = "debug"\nlog_format = "json"\nstandby = true\nsocket_group = 0\n'
        '[runtimes.runc]\nbinary = "runc"\n[runtimes.crun]\nbinary = "crun"\n'
        '[runtimes.missing]\nbinary = "/nonexistent/runtime"\nroot = "/run/x"\n'
        "systemd_cgroup = true\nargs = []\n"
        '[content]\ningest_expiry = 2\n[grpc]\naddress = "/tmp/g.sock"\n'
        '[metrics]\naddress = "127.0.0.1:1338"\n[network]\nconf_dir = "/tmp/cni"\n'
        'default_subnet = "10.200.1.0/24"\ndefault_bridge = "bb123456"\n'
        '[container_log]\nmax_size = 4096\nmax_files = 1000\n[shim]\npython = ""\n'
        '[ttrpc]\naddress = ""\n'
    )
    loaded = _load_config(tmp_path, helpers)
    assert loaded.runtimes["missing"].root == "/run/x" and loaded.standby


def test_a_berthd_resuming_after_a_failed_handover_only_warns_of_unknown_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The successor's config may hold keys only it knows; the predecessor re-executing
    itself (main.py's _resume) must serve again all the same."""
    from berth.daemon import config, main

    assert config.RESUMING_ENV == main.RESUME_FD_ENV
    monkeypatch.setenv(config.RESUMING_ENV, str(tmp_path / "history"))
    _load_config(tmp_path, "future_key = 1\n")
    assert "unknown key(s) in the config's top level: future_key" in capsys.readouterr().err


@pytest.mark.parametrize("reader_pause", [0.001, 0.15])
def test_following_a_rotated_log_misses_and_repeats_nothing(
    tmp_path: object, reader_pause: float
) -> None:
    """`berth tasks attach` follows the shim's log as the shim rotates it (its LogSink,
    the real one): every line once, in order, whether the reader keeps up or falls
    several rotations behind. It used to read on in the file it opened first after that
    was renamed to stdout.log.1: with an 8 KiB limit, 8,192 of ~25 KB arrived."""
    import threading

    from berth.daemon.cli.io import follow_log, open_log
    from berth.shim.io import LogConfig, LogSink

    path = os.path.join(str(tmp_path), "stdout.log")
    sink = LogSink(path, LogConfig(max_size=4096, max_files=200))
    out_path = os.path.join(str(tmp_path), "out")
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT, 0o600)
    done = threading.Event()
    follower = threading.Thread(
        target=follow_log, args=(path, open_log(path), out, done.is_set, reader_pause), daemon=True
    )
    follower.start()
    lines = [b"line %d\n" % n for n in range(20000)]  # ~190 KB: ~45 rotations
    try:
        for start in range(0, len(lines), 500):
            sink.write(b"".join(lines[start : start + 500]))
            time.sleep(0.01)
    finally:
        sink.close()
        done.set()
        follower.join(30)
        os.close(out)
    assert not follower.is_alive()
    with open(out_path, "rb") as f:
        assert f.read() == b"".join(lines)
    assert os.path.exists(path + ".40")  # it did rotate, many times


def test_half_utf16_pairs_in_outside_json_read_as_go_reads_them() -> None:
    """A lone surrogate escape becomes U+FFFD (keys too, at any depth), a whole pair its
    character, an escaped backslash stays text; a document without one is returned as
    json.loads made it. Invalid UTF-8 in a string reads as U+FFFD too; outside one it is
    still not JSON."""
    from berth.daemon.documents import load_json

    doc = load_json(
        rb'{"k\ud800": [{"v": "a\udfffb"}, "\ud83d\ude00", "\\ud800", "\uDBFF"]}',
        "doc",
        max_size=1024,
    )
    assert doc == {"k\ufffd": [{"v": "a\ufffdb"}, "\U0001f600", "\\ud800", "\ufffd"]}
    for value in doc["k\ufffd"][1:]:
        value.encode("utf-8")  # every string is sendable
    assert load_json('{"a": "\ud800"}', "doc", max_size=64) == {"a": "\ufffd"}
    plain = load_json(b'{"a": ["\\u00e9"]}', "doc", max_size=64)
    assert plain == {"a": ["\u00e9"]}
    latin1 = load_json(b'{"label": "caf\xe9", "k\xff": 1}', "doc", max_size=64)
    assert latin1 == {"label": "caf\ufffd", "k\ufffd": 1}
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        load_json(b'{"a": 1}\xff', "doc", max_size=64)


def test_a_zygote_whose_state_dir_is_gone_makes_nothing(tmp_path: Path) -> None:
    """A zygote that outlived its berthd (killed, its state dir removed) made the state dir
    again, and its parent, to rehearse in, and left both behind: the empty `/tmp/bt-*/state`
    of full test runs. It rehearses only in a state dir that exists."""
    from berth.shim.rehearsal import rehearse

    gone = tmp_path / "base"
    rehearse(rounds=1, directory=str(gone / "state" / "zygote"))
    assert not gone.exists()


def test_a_listing_never_fails_on_a_record_deleted_while_it_lists(tmp_path: Path) -> None:
    """A listing selected the keys, then read each record apart: a collection deleting one
    in between (GC runs in a worker thread) made content.list fail NOT_FOUND for a record
    it had just listed (seen in a full test run). Each listing is one query now: it sees
    a record whole or not at all."""
    import threading

    store = Store(str(tmp_path / "meta.db"))
    digests = [f"sha256:{i:064x}" for i in range(40)]
    for digest in digests:
        store.add_content("ns", digest, 1)
        store.create_lease("ns", digest[-12:], None)
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            for digest in digests[::3]:
                store.delete_content("ns", digest)
                store.add_content("ns", digest, 1)
                store.delete_lease("ns", digest[-12:])
                store.create_lease("ns", digest[-12:], None)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(300):
            assert len(store.list_content("ns")) >= len(digests) - len(digests[::3])
            assert len(store.list_leases("ns")) >= len(digests) - len(digests[::3])
    finally:
        stop.set()
        thread.join()
        store.close()


async def test_rpc_client_never_writes_to_a_descriptor_its_socket_gave_up() -> None:
    """berthd's RPC reads and writes its sockets' descriptors directly (rpc.receive,
    rpc.send_now); once a connection is closed its number may already name another
    socket. A call on the closed client must fail, and the new socket get nothing."""
    import socket

    from berth.daemon.rpc import RpcClient
    from berth.shim.wire.errors import Unavailable
    from berth.shim.wire.protocol import Connection as WireConnection
    from berth.shim.wire.protocol import Hello, NeedData, Role

    ours, peer = trio.socket.socketpair()
    client = RpcClient(trio.SocketStream(ours), label="test")
    number = ours.fileno()
    server = WireConnection(Role.SERVER)

    async def welcome() -> None:
        while not isinstance(event := server.next_event(), Hello):
            assert isinstance(event, NeedData)
            server.receive_data(await peer.recv(65536))
        await peer.send(server.send(server.server_handshake(event)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(welcome)
        await client.handshake()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        await trio.sleep(0.05)  # run() waits for the socket to be readable
        ours.close()  # no checkpoint: run() has not seen it when the call below is made
        reused, other = socket.socketpair()  # takes the lowest free numbers: ours
        try:
            assert number in (reused.fileno(), other.fileno())
            with pytest.raises(Unavailable):
                await client.call("version", {})
            for sock in (reused, other):
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(100)  # nothing was written to the socket that took its number
        finally:
            reused.close()
            other.close()
    peer.close()


async def test_rpc_send_now_sends_nothing_for_a_cancelled_caller() -> None:
    """rpc.send_now writes without trio's send_all, but like it: a caller whose scope is
    cancelled sends nothing (a request it believes unsent must not be carried out)."""
    from berth.daemon.rpc import send_now

    ours, peer = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    with trio.CancelScope() as scope:
        scope.cancel()
        await send_now(stream, trio.Lock(), b"request")
    assert scope.cancelled_caught
    await send_now(stream, trio.Lock(), b"after")
    assert await peer.recv(100) == b"after"
    await stream.aclose()
    peer.close()


async def test_rpc_receive_reads_what_is_waiting_and_still_yields() -> None:
    """rpc.receive returns bytes already waiting without waiting for readiness, but
    after a checkpoint (a flooding peer shares the loop); a cancelled reader reads
    nothing (no byte taken from the socket and dropped)."""
    from trio.testing import assert_checkpoints

    from berth.daemon.rpc import receive

    ours, peer = trio.socket.socketpair()
    stream = trio.SocketStream(ours)
    await peer.send(b"waiting")
    with assert_checkpoints():  # it yielded, though the bytes were there
        assert await receive(stream) == b"waiting"
    await peer.send(b"kept")
    with trio.CancelScope() as scope:
        scope.cancel()
        await receive(stream)
    assert scope.cancelled_caught
    assert await receive(stream) == b"kept"
    await stream.aclose()
    peer.close()


def test_content_generation_moves_with_every_bump_and_every_new_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from berth.daemon.storage import generation

    state = str(tmp_path)
    ours = generation.ContentGeneration(state)

    def inode_and_size() -> tuple[int, int] | None:
        now = generation.current(state)
        return None if now is None else (now[1], now[2])

    first = inode_and_size()
    assert first is not None and first[1] == 0
    before = generation.current(state)
    ours.bump()
    assert inode_and_size() == (first[0], 1) and generation.current(state) != before
    successor = generation.ContentGeneration(state)  # a new berthd: a new file
    fresh = inode_and_size()
    assert fresh is not None and fresh[0] != first[0] and fresh[1] == 0
    ours.bump()  # the predecessor, finishing its calls, bumps the file berth-grpc sees
    assert inode_and_size() == (fresh[0], 1)
    monkeypatch.setattr(generation, "ROLL_AT", 3)
    successor.bump()
    successor.bump()
    rolled = inode_and_size()
    assert rolled is not None and rolled[0] != fresh[0]
    # a file that cannot take the byte is removed (nothing is kept without it) ...
    os.unlink(successor.path)
    os.mkdir(successor.path)  # ... and if it cannot be removed either, the change is refused
    with pytest.raises(OSError):
        successor.bump()
    os.rmdir(successor.path)
    assert generation.current(state) is None
    successor.bump()  # made again: from then on, kept answers are given again
    assert generation.current(state) is not None


def test_content_cache_gives_back_only_what_the_generation_allows(tmp_path: Path) -> None:
    from berth.daemon.grpc.services.content import KEPT_BLOB, KEPT_BYTES, ContentCache
    from berth.daemon.storage import generation

    assert ContentCache("").generation() is None  # no state dir: nothing kept
    counter = generation.ContentGeneration(str(tmp_path))
    cache = ContentCache(str(tmp_path))
    now = cache.generation()
    assert now is not None
    cache.keep("ns", "sha256:a", now, info={"size": 3})
    cache.keep("ns", "sha256:a", now, blob=b"abc")
    assert cache.info("ns", "sha256:a", now) == {"size": 3}
    assert cache.blob("ns", "sha256:a", now) == b"abc"
    assert cache.info("other", "sha256:a", now) is None  # per namespace
    counter.bump()
    later = cache.generation()
    assert later is not None and later != now
    assert (
        cache.info("ns", "sha256:a", later) is None and cache.blob("ns", "sha256:a", later) is None
    )
    # an answer asked before a change is not given after it
    cache.keep("ns", "sha256:b", now, info={"size": 1})
    assert cache.info("ns", "sha256:b", later) is None
    # bounds: no blob above KEPT_BLOB, no more than KEPT_BYTES in all
    cache.keep("ns", "sha256:big", later, blob=b"x" * (KEPT_BLOB + 1))
    assert cache.blob("ns", "sha256:big", later) is None
    for i in range(2 * KEPT_BYTES // KEPT_BLOB):
        cache.keep("ns", f"sha256:{i}", later, blob=b"y" * KEPT_BLOB)
    kept = [i for i in range(2 * KEPT_BYTES // KEPT_BLOB) if cache.blob("ns", f"sha256:{i}", later)]
    assert len(kept) * KEPT_BLOB <= KEPT_BYTES and kept[-1] == 2 * KEPT_BYTES // KEPT_BLOB - 1


def test_a_content_record_change_is_announced_first_with_the_database_held_until_made(
    tmp_path: Path,
) -> None:
    import threading

    seen: list[tuple[object, bool]] = []
    waiting: list[threading.Thread] = []
    store: Store

    def announced() -> None:
        try:
            labels: object = store.get_content("ns", "sha256:" + "a" * 64)["labels"]
        except NotFound:
            labels = None
        # another thread's statement waits for the announcement to end
        other = threading.Thread(target=store.list_content, args=("ns",))
        other.start()
        other.join(timeout=0.2)
        seen.append((labels, other.is_alive()))
        waiting.append(other)  # it goes on once the change is over

    store = Store(str(tmp_path / "meta.db"), announced)
    digest = "sha256:" + "a" * 64
    store.add_content("ns", digest, 3, {"a": "1"})
    store.update_content("ns", digest, {"b": "2"})
    store.delete_content("ns", digest)
    for thread in waiting:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert seen == [({"a": "1"}, True), ({"b": "2"}, True)]
    with pytest.raises(NotFound):
        store.delete_content("ns", digest)  # announced as well: harmless
    for thread in waiting:
        thread.join(timeout=10)
