"""What containerd's Go client relies on in the Namespaces, Containers and Tasks services,
checked through berth's containerd socket with grpcio stubs: each test is a behaviour
containerd 1.6 shows for the same calls (issue 12)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.support.wire import C, T, Wire, container_message, served_wire

pytestmark = pytest.mark.container

N = "/containerd.services.namespaces.v1.Namespaces/"


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with served_wire() as w:
        yield w


def _create(w: Wire, cid: str, args: list[str], **runtime: Any) -> Any:
    t = w.t
    container = container_message(w, cid, args)
    for key, value in runtime.items():
        setattr(
            container.runtime, key, value
        ) if key == "name" else container.runtime.options.CopyFrom(value)
    return w.unary(
        C + "Create",
        t.containers.CreateContainerRequest(container=container),
        t.containers.CreateContainerResponse,
    ).container


def _status(w: Wire, cid: str) -> int:
    t = w.t
    return int(
        w.unary(T + "Get", t.tasks.GetRequest(container_id=cid), t.tasks.GetResponse).process.status
    )


def _remove(w: Wire, cid: str) -> None:
    """Task and container gone, whatever state they were left in."""
    t = w.t
    for path, request, reply in (
        (T + "Kill", t.tasks.KillRequest(container_id=cid, signal=9, all=True), t.Empty),
        (T + "Delete", t.tasks.DeleteTaskRequest(container_id=cid), t.tasks.DeleteResponse),
        (C + "Delete", t.containers.DeleteContainerRequest(id=cid), t.Empty),
    ):
        try:
            w.unary(path, request, reply)
        except grpc.RpcError:
            pass


# -- namespaces ---------------------------------------------------------------------------


def test_updating_a_namespace_that_does_not_exist_creates_it(wire: Wire) -> None:
    t = wire.t
    key = "containerd.io/defaults/snapshotter"
    update = t.namespaces.UpdateNamespaceRequest(
        namespace=t.namespaces.Namespace(name="fresh-compat", labels={key: "overlayfs"}),
    )
    update.update_mask.paths.append(f"labels.{key}")
    got = wire.unary(N + "Update", update, t.namespaces.UpdateNamespaceResponse, namespace=None)
    assert got.namespace.name == "fresh-compat" and dict(got.namespace.labels) == {key: "overlayfs"}
    listed = wire.unary(
        N + "List",
        t.namespaces.ListNamespacesRequest(),
        t.namespaces.ListNamespacesResponse,
        namespace=None,
    )
    assert {key: "overlayfs"} in [
        dict(n.labels) for n in listed.namespaces if n.name == "fresh-compat"
    ]
    # and an update of an existing one still merges by mask
    update = t.namespaces.UpdateNamespaceRequest(
        namespace=t.namespaces.Namespace(name="fresh-compat", labels={"other": "1"}),
    )
    update.update_mask.paths.append("labels.other")
    got = wire.unary(N + "Update", update, t.namespaces.UpdateNamespaceResponse, namespace=None)
    assert dict(got.namespace.labels) == {key: "overlayfs", "other": "1"}
    wire.unary(
        N + "Delete",
        t.namespaces.DeleteNamespaceRequest(name="fresh-compat"),
        t.Empty,
        namespace=None,
    )


# -- tasks --------------------------------------------------------------------------------


def test_a_created_task_that_never_started_is_deleted(wire: Wire) -> None:
    """Directly, and the Go client's way (Wait, Kill SIGKILL all, then Delete)."""
    t = wire.t
    try:
        _create(wire, "never-started", ["sleep", "1000"])
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(container_id="never-started"),
            t.tasks.CreateTaskResponse,
        )
        assert _status(wire, "never-started") == 1  # CREATED
        deleted = wire.unary(
            T + "Delete",
            t.tasks.DeleteTaskRequest(container_id="never-started"),
            t.tasks.DeleteResponse,
        )
        assert deleted.id == "never-started"
        assert (
            wire.code(
                T + "Get", t.tasks.GetRequest(container_id="never-started"), t.tasks.GetResponse
            )
            == grpc.StatusCode.NOT_FOUND
        )

        # The Go client: Wait first, then Kill(SIGKILL, all), the wait returns, Status is
        # STOPPED, Delete succeeds.
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(container_id="never-started"),
            t.tasks.CreateTaskResponse,
        )
        waited: list[Any] = []
        waiter = threading.Thread(
            target=lambda: waited.append(
                wire.unary(
                    T + "Wait",
                    t.tasks.WaitRequest(container_id="never-started"),
                    t.tasks.WaitResponse,
                )
            ),
            daemon=True,
        )
        waiter.start()
        wire.unary(
            T + "Kill",
            t.tasks.KillRequest(container_id="never-started", signal=9, all=True),
            t.Empty,
        )
        waiter.join(30)
        assert waited and waited[0].exit_status == 137
        assert _status(wire, "never-started") == 3  # STOPPED
        wire.unary(
            T + "Delete",
            t.tasks.DeleteTaskRequest(container_id="never-started"),
            t.tasks.DeleteResponse,
        )
    finally:
        _remove(wire, "never-started")


def test_resizing_the_pty_of_a_process_without_a_terminal_is_a_no_op(wire: Wire) -> None:
    t = wire.t
    try:
        _create(wire, "no-tty", ["sleep", "1000"])
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(container_id="no-tty"),
            t.tasks.CreateTaskResponse,
        )
        wire.unary(T + "Start", t.tasks.StartRequest(container_id="no-tty"), t.tasks.StartResponse)
        wire.unary(
            T + "ResizePty",
            t.tasks.ResizePtyRequest(container_id="no-tty", width=80, height=24),
            t.Empty,
        )
        assert _status(wire, "no-tty") == 2
    finally:
        _remove(wire, "no-tty")


# -- containers ---------------------------------------------------------------------------


def test_container_extensions_round_trip(wire: Wire) -> None:
    t = wire.t
    first = t.Any(type_url="example.com/berth/First", value=b"\x00\x01\xffbinary")
    second = t.Any(type_url="example.com/berth/Second", value=b"two")
    try:
        container = container_message(wire, "with-ext", ["true"])
        container.extensions["first"].CopyFrom(first)
        created = wire.unary(
            C + "Create",
            t.containers.CreateContainerRequest(container=container),
            t.containers.CreateContainerResponse,
        ).container
        assert dict(created.extensions) == {"first": first}
        got = wire.unary(
            C + "Get",
            t.containers.GetContainerRequest(id="with-ext"),
            t.containers.GetContainerResponse,
        )
        assert dict(got.container.extensions) == {"first": first}
        listed = wire.unary(
            C + "List", t.containers.ListContainersRequest(), t.containers.ListContainersResponse
        )
        assert [dict(c.extensions) for c in listed.containers if c.id == "with-ext"] == [
            {"first": first}
        ]

        # extensions.<name> adds one, keeping the others
        update = t.containers.UpdateContainerRequest(
            container=t.containers.Container(id="with-ext")
        )
        update.container.extensions["second"].CopyFrom(second)
        update.update_mask.paths.append("extensions.second")
        updated = wire.unary(C + "Update", update, t.containers.UpdateContainerResponse).container
        assert dict(updated.extensions) == {"first": first, "second": second}
        # `extensions` replaces them all
        update = t.containers.UpdateContainerRequest(
            container=t.containers.Container(id="with-ext")
        )
        update.container.extensions["second"].CopyFrom(second)
        update.update_mask.paths.append("extensions")
        updated = wire.unary(C + "Update", update, t.containers.UpdateContainerResponse).container
        assert dict(updated.extensions) == {"second": second}
        got = wire.unary(
            C + "Get",
            t.containers.GetContainerRequest(id="with-ext"),
            t.containers.GetContainerResponse,
        )
        assert dict(got.container.extensions) == {"second": second}
        assert got.container.spec.value  # the rest untouched
    finally:
        _remove(wire, "with-ext")


# -- runtime options ----------------------------------------------------------------------


def _run_to_exit(w: Wire, cid: str) -> int:
    t = w.t
    w.unary(T + "Create", t.tasks.CreateTaskRequest(container_id=cid), t.tasks.CreateTaskResponse)
    w.unary(T + "Start", t.tasks.StartRequest(container_id=cid), t.tasks.StartResponse)
    waited = w.unary(T + "Wait", t.tasks.WaitRequest(container_id=cid), t.tasks.WaitResponse)
    return int(waited.exit_status)


def test_the_v1_runtime_options_are_honoured(wire: Wire, tmp_path: Path) -> None:
    """io.containerd.runtime.v1.linux with containerd.linux.runc.RuncOptions: Runtime and
    RuntimeRoot pick the binary and its state dir, like the v2 Options."""
    from berth.daemon.grpc import convert as capi

    t = wire.t
    root = tmp_path / "crun-root"
    options = t.Any(
        type_url=capi.RUNC_V1_OPTIONS_TYPE,
        value=capi.types()
        .runc_v1.RuncOptions(runtime="crun", runtime_root=str(root))
        .SerializeToString(),
    )
    try:
        created = _create(
            wire,
            "v1-opts",
            ["sleep", "1000"],
            name="io.containerd.runtime.v1.linux",
            options=options,
        )
        assert created.runtime.options == options  # returned as given
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(container_id="v1-opts"),
            t.tasks.CreateTaskResponse,
        )
        # crun's state for it is under RuntimeRoot/<namespace>/<id>, as containerd's shim puts it
        state = root / wire.namespace / "v1-opts"
        assert state.is_dir(), sorted(str(p) for p in root.rglob("*"))
        listed = subprocess.run(
            ["crun", "--root", str(root / wire.namespace), "list"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "v1-opts" in listed.stdout
    finally:
        _remove(wire, "v1-opts")


def _hierarchy_mounted(membership: str) -> bool:
    """Whether the hierarchy of a /proc/<pid>/cgroup line is mounted here (a process
    cannot be moved in one that is not: hugetlb, on some hosts)."""
    _, controllers, _ = membership.split(":", 2)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fstype, _, options = [*line.partition(" - ")[2].split(), "", "", ""][:3]
        if fstype == "cgroup2" and controllers == "":
            return True
        if fstype == "cgroup" and set(controllers.split(",")) <= set(options.split(",")):
            return True
    return False


def test_the_shim_goes_into_the_shim_cgroup_option(wire: Wire) -> None:
    from berth.daemon.grpc import convert as capi

    t = wire.t
    group = f"/berth-test-shims-{os.getpid()}"
    options = t.Any(
        type_url=capi.RUNC_OPTIONS_TYPE,
        value=capi.types().runc.Options(shim_cgroup=group).SerializeToString(),
    )
    try:
        _create(wire, "shim-cg", ["sleep", "1000"], name="io.containerd.runc.v2", options=options)
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(container_id="shim-cg"),
            t.tasks.CreateTaskResponse,
        )
        shim = wire.daemon.shim_pids()["shim-cg"]
        memberships = Path(f"/proc/{shim}/cgroup").read_text().splitlines()
        mounted = [line for line in memberships if _hierarchy_mounted(line)]
        assert mounted and all(line.endswith(":" + group) for line in mounted), memberships
    finally:
        _remove(wire, "shim-cg")
        for mount in {
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if " - cgroup" in line
        }:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(mount, group.lstrip("/")))


def test_a_missing_runtime_binary_is_named_as_go_names_it(wire: Wire) -> None:
    from berth.daemon.grpc import convert as capi

    t = wire.t
    options = t.Any(
        type_url=capi.RUNC_OPTIONS_TYPE,
        value=capi.types().runc.Options(binary_name="no-runc").SerializeToString(),
    )
    try:
        _create(wire, "no-runc", ["true"], name="io.containerd.runc.v2", options=options)
        with pytest.raises(grpc.RpcError) as failed:
            wire.unary(
                T + "Create",
                t.tasks.CreateTaskRequest(container_id="no-runc"),
                t.tasks.CreateTaskResponse,
            )
        assert 'exec: "no-runc": executable file not found in $PATH' in failed.value.details()
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        _remove(wire, "no-runc")


# -- user namespaces ----------------------------------------------------------------------


def test_a_spec_with_uid_and_gid_mappings_runs(wire: Wire, busybox_rootfs: str) -> None:
    """The remapped root must reach the rootfs through the bundle: containerd gives the
    bundle mode 0710 and the remapped root's gid. The rootfs comes as mounts, as from a
    containerd client; the way to the state dir is traversable, as /run is."""
    from berth.daemon.grpc import convert as capi
    from berth.daemon.oci import default_spec

    t = wire.t
    os.chmod(wire.daemon.dir, 0o711)  # a temp dir is 0700
    spec = default_spec("userns", wire.namespace, ["cat", "/proc/self/uid_map"], root="rootfs")
    linux = spec["linux"]
    linux["namespaces"] = [*linux["namespaces"], {"type": "user"}]
    linux["uidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    linux["gidMappings"] = [{"containerID": 0, "hostID": 200000, "size": 65536}]
    container = container_message(wire, "userns", [], spec_any=capi.json_any(capi.SPEC_TYPE, spec))
    log = Path(wire.daemon.root) / "userns.out"
    os.mkfifo(log)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.append(log.read_bytes()), daemon=True)
    reader.start()
    try:
        wire.unary(
            C + "Create",
            t.containers.CreateContainerRequest(container=container),
            t.containers.CreateContainerResponse,
        )
        wire.unary(
            T + "Create",
            t.tasks.CreateTaskRequest(
                container_id="userns",
                stdout=str(log),
                rootfs=[t.mount.Mount(type="bind", source=busybox_rootfs, options=["rbind", "ro"])],
            ),
            t.tasks.CreateTaskResponse,
        )
        wire.unary(T + "Start", t.tasks.StartRequest(container_id="userns"), t.tasks.StartResponse)
        waited = wire.unary(
            T + "Wait", t.tasks.WaitRequest(container_id="userns"), t.tasks.WaitResponse
        )
        assert waited.exit_status == 0
        reader.join(10)
        assert output and output[0].decode().split() == ["0", "200000", "65536"]
    finally:
        _remove(wire, "userns")


# -- ttrpc --------------------------------------------------------------------------------


def test_the_same_services_answer_over_ttrpc(wire: Wire) -> None:
    """`<grpc address>.ttrpc`: unary calls of every service with containerd's status
    codes; requests on one connection answered independently; streams refused; a broken
    frame ends that connection only."""
    from tests.support.clients import grpc_address
    from tests.support.ttrpc import HEADER, TtrpcClient, TtrpcError

    t = wire.t
    path = grpc_address(wire.daemon) + ".ttrpc"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    client = TtrpcClient(path, namespace=wire.namespace)
    svc = "containerd.services."
    try:
        version = client.call(
            svc + "version.v1.Version", "Version", t.Empty(), t.version.VersionResponse
        )
        assert version.version
        container = container_message(wire, "over-ttrpc", ["sh", "-c", "exit 3"])
        client.call(
            svc + "containers.v1.Containers",
            "Create",
            t.containers.CreateContainerRequest(container=container),
            t.containers.CreateContainerResponse,
        )
        got = client.call(
            svc + "containers.v1.Containers",
            "Get",
            t.containers.GetContainerRequest(id="over-ttrpc"),
            t.containers.GetContainerResponse,
        )
        assert got.container.id == "over-ttrpc"
        tasks = svc + "tasks.v1.Tasks"
        client.call(
            tasks,
            "Create",
            t.tasks.CreateTaskRequest(container_id="over-ttrpc"),
            t.tasks.CreateTaskResponse,
        )
        # Wait (long) and Start on one connection: the Start is answered while Wait waits
        waiting = client.send(tasks, "Wait", t.tasks.WaitRequest(container_id="over-ttrpc"))
        starting = client.send(tasks, "Start", t.tasks.StartRequest(container_id="over-ttrpc"))
        answers = {}
        for _ in range(2):
            stream, code, message, payload = client.receive()
            assert code == 0, message
            answers[stream] = payload
        assert list(answers) == [starting, waiting]  # in the order they finished
        assert t.tasks.WaitResponse.FromString(answers[waiting]).exit_status == 3
        # errors keep their gRPC codes; namespaces come from the ttrpc header
        with pytest.raises(TtrpcError) as missing:
            client.call(
                tasks, "Get", t.tasks.GetRequest(container_id="nobody"), t.tasks.GetResponse
            )
        assert missing.value.code == grpc.StatusCode.NOT_FOUND.value[0]
        bare = TtrpcClient(path)
        try:
            with pytest.raises(TtrpcError) as no_namespace:
                bare.call(tasks, "List", t.tasks.ListTasksRequest(), t.tasks.ListTasksResponse)
            assert no_namespace.value.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        finally:
            bare.close()
        with pytest.raises(TtrpcError) as streaming:
            client.call(
                svc + "events.v1.Events",
                "Subscribe",
                t.events.SubscribeRequest(),
                t.events.Envelope,
            )
        assert streaming.value.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        with pytest.raises(TtrpcError) as unknown:
            client.call("no.such.Service", "Do", t.Empty(), t.Empty)
        assert unknown.value.code == grpc.StatusCode.UNIMPLEMENTED.value[0]
        # a frame larger than ttrpc allows: that connection ends, the socket serves on
        client.sock.sendall(HEADER.pack(5 << 20, 99, 1, 0))
        with pytest.raises(ConnectionError):
            client.receive()
        again = TtrpcClient(path, namespace=wire.namespace)
        try:
            listed = again.call(
                tasks, "List", t.tasks.ListTasksRequest(), t.tasks.ListTasksResponse
            )
            assert "over-ttrpc" in [p.id for p in listed.tasks]
        finally:
            again.close()
    finally:
        client.close()
        _remove(wire, "over-ttrpc")
