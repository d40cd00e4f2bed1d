"""containerd 1.6's API types, and conversions between them and berth's own objects.

The message classes come from stubs that scripts/gen-containerd-api generates at install
time from the .proto files Debian ships (nothing of containerd is in this repository);
they live in a directory of their own that only the gRPC front end puts on sys.path.

Conversions are pure functions (messages in, berth dicts out, and back), so they are unit
tested without a daemon. containerd's encodings that matter to real clients:
- the OCI spec, process and resources travel as JSON inside an Any whose type_url names
  the runtime-spec type (not as protobuf);
- runc's options are `containerd.runc.v1.Options`;
- times are Timestamps, and "never" is Go's zero time, 0001-01-01 (seconds -62135596800),
  not the Unix epoch: dockerd compares exited_at with the zero time;
- events are Anys of their message's full name (`containerd.events.TaskExit`; image events
  are `containerd.services.images.v1.ImageCreate`, as in containerd's api/events).
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import re
import sys
import sysconfig
from typing import Any

from berth.daemon.documents import load_json_object
from berth.daemon.filters import map_field
from berth.shim.wire.errors import InvalidArgument
from berth.shim.wire.names import IDENTIFIER, IDENTIFIER_MAX, is_identifier

STUBS_ENV = "BERTH_CONTAINERD_API"
STUBS_DIR = "berth_containerd_api"

SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"
RESOURCES_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
RUNC_V1_OPTIONS_TYPE = "containerd.linux.runc.RuncOptions"
CGROUPS_V1_METRICS = "io.containerd.cgroups.v1.Metrics"
CGROUPS_V2_METRICS = "io.containerd.cgroups.v2.Metrics"
PROCESS_DETAILS_TYPE = "containerd.runc.v1.ProcessDetails"

ZERO_TIME_SECONDS = -62135596800  # Go's time.Time{} as a protobuf Timestamp
MAX_SPEC_JSON = 4 * 1024 * 1024


def stubs_path() -> str:
    explicit = os.environ.get(STUBS_ENV)
    if explicit:
        return explicit
    return os.path.join(sysconfig.get_paths()["purelib"], STUBS_DIR)


class _Types:
    """The generated modules, imported on first use (they are the front end's alone)."""

    def __init__(self) -> None:
        path = stubs_path()
        if not os.path.isfile(os.path.join(path, ".generated")):
            raise RuntimeError(
                f"containerd API stubs not found in {path}: run scripts/gen-containerd-api"
            )
        if path not in sys.path:
            sys.path.append(path)  # appended: never shadows an installed package
        m = importlib.import_module
        svc = "containerd.api.services"
        self.tasks = m(f"{svc}.tasks.v1.tasks_pb2")
        self.containers = m(f"{svc}.containers.v1.containers_pb2")
        self.content = m(f"{svc}.content.v1.content_pb2")
        self.diff = m(f"{svc}.diff.v1.diff_pb2")
        self.events = m(f"{svc}.events.v1.events_pb2")
        self.images = m(f"{svc}.images.v1.images_pb2")
        self.introspection = m(f"{svc}.introspection.v1.introspection_pb2")
        self.leases = m(f"{svc}.leases.v1.leases_pb2")
        self.namespaces = m(f"{svc}.namespaces.v1.namespace_pb2")
        self.snapshots = m(f"{svc}.snapshots.v1.snapshots_pb2")
        self.version = m(f"{svc}.version.v1.version_pb2")
        self.mount = m("containerd.api.types.mount_pb2")
        self.descriptor = m("containerd.api.types.descriptor_pb2")
        self.metrics = m("containerd.api.types.metrics_pb2")
        self.platform = m("containerd.api.types.platform_pb2")
        self.task = m("containerd.api.types.task.task_pb2")
        self.runc = m("containerd.runtime.v2.runc.options.oci_pb2")
        self.runc_v1 = m("containerd.runtime.linux.runctypes.runc_pb2")
        self.cgroups_v1 = m("cgroups.stats.v1.metrics_pb2")
        self.cgroups_v2 = m("cgroups.v2.stats.metrics_pb2")
        self.event_modules = [
            m(f"containerd.api.events.{name}_pb2")
            for name in ("task", "container", "content", "image", "namespace", "snapshot")
        ]
        from google.protobuf import any_pb2, empty_pb2, timestamp_pb2

        self.Any = any_pb2.Any
        self.Empty = empty_pb2.Empty
        self.Timestamp = timestamp_pb2.Timestamp
        self.event_types: dict[str, Any] = {}
        for module in self.event_modules:
            for name in module.DESCRIPTOR.message_types_by_name:
                cls = getattr(module, name)
                self.event_types[cls.DESCRIPTOR.full_name] = cls


_types: _Types | None = None


def types() -> _Types:
    global _types
    if _types is None:
        _types = _Types()
    return _types


# -- times ------------------------------------------------------------------------------


def timestamp(ns: int | None) -> Any:
    """berth's nanoseconds since the epoch; 0 (never) is Go's zero time, as containerd
    sends it."""
    if not ns:
        return types().Timestamp(seconds=ZERO_TIME_SECONDS, nanos=0)
    return types().Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def from_timestamp(ts: Any) -> int:
    if ts is None or ts.seconds <= 0:
        return 0
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


# -- Any with JSON payloads -------------------------------------------------------------


def json_any(type_url: str, doc: Any) -> Any:
    return types().Any(type_url=type_url, value=json.dumps(doc).encode())


def from_json_any(value: Any, expected: str, what: str) -> dict[str, Any]:
    """The JSON document in an Any of an OCI type; InvalidArgument for anything else."""
    if value is None or not value.type_url:
        raise InvalidArgument(f"{what} is required")
    type_url = value.type_url
    if type_url.rpartition("/")[2] != expected.rpartition("/")[2] or "runtime-spec" not in (
        type_url
    ):
        raise InvalidArgument(f"{what}: unsupported type {type_url!r}, expected {expected!r}")
    return load_json_object(value.value, what, max_size=MAX_SPEC_JSON)


# -- runtime options --------------------------------------------------------------------

_RUNC_FIELDS = (
    "binary_name",
    "root",
    "systemd_cgroup",
    "no_pivot_root",
    "no_new_keyring",
    "shim_cgroup",
)
# The v1 runtime's (io.containerd.runtime.v1.linux) options: its field -> the v2 field
_RUNC_V1_FIELDS = {
    "runtime": "binary_name",
    "runtime_root": "root",
    "systemd_cgroup": "systemd_cgroup",
}


def runtime_options_from_any(value: Any) -> dict[str, Any]:
    """containerd.runc.v1.Options as berth's runtime options (binary_name and root are
    honoured by the task service); the Any itself is kept to be returned unchanged."""
    if value is None or not value.type_url:
        return {}
    options: dict[str, Any] = {
        "type_url": value.type_url,
        "value": bytes(value.value).hex(),
    }
    kind = value.type_url.rpartition("/")[2]
    if kind == RUNC_OPTIONS_TYPE:
        fields = {name: name for name in _RUNC_FIELDS}
        parsed = _parse_options(types().runc.Options(), value.value, kind)
    elif kind == RUNC_V1_OPTIONS_TYPE:
        fields = _RUNC_V1_FIELDS
        parsed = _parse_options(types().runc_v1.RuncOptions(), value.value, kind)
    else:
        return options
    for theirs, ours in fields.items():
        field_value = getattr(parsed, theirs)
        if field_value:
            options[ours] = field_value
    for name in ("root", "shim_cgroup"):
        if options.get(name) and not os.path.isabs(options[name]):
            raise InvalidArgument(f"runc options: {name} must be an absolute path")
    return options


def _parse_options(message: Any, raw: bytes, kind: str) -> Any:
    try:
        message.ParseFromString(raw)
    except Exception as exc:  # google.protobuf.message.DecodeError
        raise InvalidArgument(f"bad {kind}: {exc}") from None
    return message


def runtime_options_to_any(options: dict[str, Any]) -> Any:
    if not options:
        return None
    type_url, raw = options.get("type_url"), options.get("value")
    if isinstance(type_url, str) and isinstance(raw, str):
        try:
            return types().Any(type_url=type_url, value=bytes.fromhex(raw))
        except ValueError:
            pass
    # berth-native options (a dict written through berth's own API): the fields of
    # containerd.runc.v1.Options that have the right type, nothing else
    fields = {}
    for name in _RUNC_FIELDS:
        value = options.get(name)
        kind = bool if name in ("systemd_cgroup", "no_pivot_root", "no_new_keyring") else str
        if value and isinstance(value, kind):
            fields[name] = value
    parsed = types().runc.Options(**fields)
    return types().Any(type_url=RUNC_OPTIONS_TYPE, value=parsed.SerializeToString())


# -- generic message <-> dict -----------------------------------------------------------

TIMESTAMP = "google.protobuf.Timestamp"


def fill(message: Any, doc: dict[str, Any]) -> Any:
    """Set the fields of `message` that `doc` names (others ignored): nested messages
    from dicts, maps from dicts, Timestamps from nanoseconds, repeated fields from
    lists. Values of the wrong type are an InvalidArgument."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in doc.items():
        field = fields.get(key)
        if field is None or value is None:
            continue
        try:
            _set_field(message, field, value)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"field {key}: {exc}") from None
    return message


def _set_field(message: Any, field: Any, value: Any) -> None:
    name = field.name
    kind = field.message_type
    if kind is not None and kind.GetOptions().map_entry:
        target = getattr(message, name)
        value_field = kind.fields_by_name["value"]
        for k, v in dict(value).items():
            if value_field.message_type is None:
                target[k] = v
            else:
                fill(target[k], v)
        return
    if _is_repeated(field):
        target = getattr(message, name)
        for item in value:
            if kind is None:
                target.append(item)
            else:
                fill(target.add(), item)
        return
    if kind is not None:
        if kind.full_name == TIMESTAMP:
            getattr(message, name).CopyFrom(timestamp(int(value)))
        elif isinstance(value, dict):
            fill(getattr(message, name), value)
        else:
            getattr(message, name).CopyFrom(value)
        return
    setattr(message, name, value)


def _is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    if flag is not None:
        return bool(flag)
    return bool(field.label == 3)  # older protobuf: LABEL_REPEATED


def mounts_to_wire(mounts: Any) -> list[dict[str, Any]]:
    return [
        {"type": m.type, "source": m.source, "target": m.target, "options": list(m.options)}
        for m in mounts
    ]


def mounts_from_wire(mounts: list[dict[str, Any]]) -> list[Any]:
    out = []
    for m in mounts:
        out.append(
            types().mount.Mount(
                type=m.get("type", ""),
                source=m.get("source", ""),
                target=m.get("target", "") or "",
                options=list(m.get("options") or []),
            )
        )
    return out


def descriptor_to_wire(desc: Any) -> dict[str, Any]:
    return {
        "media_type": desc.media_type,
        "digest": desc.digest,
        "size": desc.size,
        "annotations": dict(desc.annotations),
    }


_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")


def is_digest(text: str) -> bool:
    """A digest containerd parses (go-digest: a known algorithm, its hex in lower case)."""
    return _DIGEST.fullmatch(text) is not None


def check_identifier(value: str, what: str) -> None:
    """InvalidArgument, worded as containerd's, unless `value` is one of its identifiers."""
    if not value:
        raise InvalidArgument(f"{what}: identifier must not be empty")
    if len(value) > IDENTIFIER_MAX:
        raise InvalidArgument(
            f"{what}: identifier {value[:80]!r} greater than maximum length "
            f"({IDENTIFIER_MAX} characters)"
        )
    if not is_identifier(value):
        raise InvalidArgument(f"{what}: identifier {value!r} must match {IDENTIFIER.pattern}")


def check_target(desc: Any) -> None:
    """What containerd requires of an image's target before it looks anything up."""
    if not is_digest(desc.digest):
        raise InvalidArgument(f"Target.Digest {desc.digest!r} invalid")
    if desc.size <= 0:
        raise InvalidArgument("Target.Size must be greater than zero")
    if not desc.media_type:
        raise InvalidArgument("Target.MediaType must be set")


def descriptor_from_wire(doc: dict[str, Any]) -> Any:
    return fill(types().descriptor.Descriptor(), doc)


# -- labels and field masks -------------------------------------------------------------


def label_paths(paths: list[str], what: str, others: tuple[str, ...] = ()) -> list[str]:
    """The label paths of an update mask (`labels`, `labels.<key>`); any path that is
    neither a label nor one of `others` is refused, never silently ignored."""
    labels = [p for p in paths if p == "labels" or p.startswith("labels.")]
    unsupported = [p for p in paths if p not in labels and p not in others]
    if unsupported:
        allowed = ", ".join(("labels", *others))
        raise InvalidArgument(f"cannot update {what} field(s) {unsupported}: only {allowed}")
    return labels


def apply_label_mask(
    current: dict[str, str], update: dict[str, str], paths: list[str]
) -> dict[str, str]:
    """containerd's update masks for labels: `labels` replaces them all; `labels.<key>`
    sets (or, absent from the update, removes) one. No paths: replace."""
    if not paths or "labels" in paths:
        return dict(update)
    result = dict(current)
    for path in paths:
        if not path.startswith("labels."):
            continue
        key = path[len("labels.") :]
        if key in update:
            result[key] = update[key]
        else:
            result.pop(key, None)
    return result


# -- objects ----------------------------------------------------------------------------

STATUS = {"created": 1, "running": 2, "stopped": 3, "paused": 4, "pausing": 5}


def container_from_message(c: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": c.id,
        "labels": dict(c.labels),
        "image": c.image,
        "snapshotter": c.snapshotter,
        "snapshot_key": c.snapshot_key,
        "spec": from_json_any(c.spec, SPEC_TYPE, "spec"),
        "extensions": extensions_to_wire(c.extensions),
    }
    if c.HasField("runtime"):
        doc["runtime"] = {
            "name": c.runtime.name,
            "options": runtime_options_from_any(
                c.runtime.options if c.runtime.HasField("options") else None
            ),
        }
    return doc


def extensions_to_wire(extensions: Any) -> dict[str, dict[str, str]]:
    """A container's map of Any as berthd keeps it (the bytes base64-encoded)."""
    return {
        name: {"type_url": ext.type_url, "value": base64.b64encode(ext.value).decode()}
        for name, ext in extensions.items()
    }


def container_to_message(doc: dict[str, Any]) -> Any:
    t = types()
    msg = t.containers.Container(
        id=doc["id"],
        labels=doc.get("labels") or {},
        image=doc.get("image") or "",
        snapshotter=doc.get("snapshotter") or "",
        snapshot_key=doc.get("snapshot_key") or "",
    )
    runtime = doc.get("runtime") or {}
    msg.runtime.name = runtime.get("name") or ""
    options = runtime_options_to_any(runtime.get("options") or {})
    if options is not None:
        msg.runtime.options.CopyFrom(options)
    msg.spec.CopyFrom(json_any(SPEC_TYPE, doc.get("spec") or {}))
    for name, ext in (doc.get("extensions") or {}).items():
        msg.extensions[name].CopyFrom(
            t.Any(
                type_url=ext.get("type_url") or "", value=base64.b64decode(ext.get("value") or "")
            )
        )
    msg.created_at.CopyFrom(timestamp(doc.get("created_at")))
    msg.updated_at.CopyFrom(timestamp(doc.get("updated_at")))
    return msg


def process_to_message(container_id: str, doc: dict[str, Any], status: str = "") -> Any:
    """A berth process view as containerd.v1.types.Process. `id` is the process's own ID:
    the container's for the init process, the exec ID for an exec. `container_id` is
    left unset, as containerd 1.6's Tasks/Get and List leave it. `status`, if given,
    replaces the process's own (its exit is reported all the same)."""
    exited = doc.get("status") == "stopped"
    return types().task.Process(
        id=doc.get("exec_id") or container_id,
        pid=int(doc.get("pid") or 0),
        status=STATUS.get(status or str(doc.get("status")), 0),
        exit_status=int(doc.get("exit_status") or 0) if exited else 0,
        exited_at=timestamp(doc.get("exited_at") if exited else 0),
        stdin=doc.get("stdin") or "",
        stdout=doc.get("stdout") or "",
        stderr=doc.get("stderr") or "",
        terminal=bool(doc.get("terminal")),
    )


def content_info_to_message(doc: dict[str, Any]) -> Any:
    return types().content.Info(
        digest=doc["digest"],
        size=int(doc.get("size") or 0),
        created_at=timestamp(doc.get("created_at")),
        updated_at=timestamp(doc.get("updated_at")),
        labels=doc.get("labels") or {},
    )


def image_to_message(doc: dict[str, Any]) -> Any:
    return types().images.Image(
        name=doc["name"],
        labels=doc.get("labels") or {},
        target=descriptor_from_wire(doc["target"]),
        created_at=timestamp(doc.get("created_at")),
        updated_at=timestamp(doc.get("updated_at")),
    )


def image_from_message(image: Any) -> dict[str, Any]:
    return {
        "name": image.name,
        "labels": dict(image.labels),
        "target": descriptor_to_wire(image.target),
    }


SNAPSHOT_KINDS = {"view": 1, "active": 2, "committed": 3}


def snapshot_info_to_message(doc: dict[str, Any]) -> Any:
    return types().snapshots.Info(
        name=doc["name"],
        parent=doc.get("parent") or "",
        kind=SNAPSHOT_KINDS.get(str(doc.get("kind")), 0),
        created_at=timestamp(doc.get("created_at")),
        updated_at=timestamp(doc.get("updated_at")),
        labels=doc.get("labels") or {},
    )


def lease_to_message(doc: dict[str, Any]) -> Any:
    return types().leases.Lease(
        id=doc["id"], created_at=timestamp(doc.get("created_at")), labels=doc.get("labels") or {}
    )


# -- events -----------------------------------------------------------------------------

# topic -> the full name of containerd's event message, which is also its Any's type URL
# (containerd's image events live in the images service's package, the others in
# containerd.events: api/events/*.proto)
EVENT_TYPES = {
    "/tasks/create": "containerd.events.TaskCreate",
    "/tasks/start": "containerd.events.TaskStart",
    "/tasks/exit": "containerd.events.TaskExit",
    "/tasks/delete": "containerd.events.TaskDelete",
    "/tasks/oom": "containerd.events.TaskOOM",
    "/tasks/exec-added": "containerd.events.TaskExecAdded",
    "/tasks/exec-started": "containerd.events.TaskExecStarted",
    "/tasks/paused": "containerd.events.TaskPaused",
    "/tasks/resumed": "containerd.events.TaskResumed",
    "/tasks/checkpointed": "containerd.events.TaskCheckpointed",
    "/containers/create": "containerd.events.ContainerCreate",
    "/containers/update": "containerd.events.ContainerUpdate",
    "/containers/delete": "containerd.events.ContainerDelete",
    "/images/create": "containerd.services.images.v1.ImageCreate",
    "/images/update": "containerd.services.images.v1.ImageUpdate",
    "/images/delete": "containerd.services.images.v1.ImageDelete",
    "/namespaces/create": "containerd.events.NamespaceCreate",
    "/namespaces/update": "containerd.events.NamespaceUpdate",
    "/namespaces/delete": "containerd.events.NamespaceDelete",
    "/snapshot/prepare": "containerd.events.SnapshotPrepare",
    "/snapshot/commit": "containerd.events.SnapshotCommit",
    "/snapshot/remove": "containerd.events.SnapshotRemove",
    "/content/delete": "containerd.events.ContentDelete",
}


def envelope_to_message(envelope: dict[str, Any]) -> Any | None:
    """A berth event envelope as containerd's Envelope; None for a topic containerd has
    no type for (it is not forwarded)."""
    topic = envelope.get("topic")
    if envelope.get("published"):
        return _published_envelope(envelope)
    name = EVENT_TYPES.get(str(topic))
    if name is None:
        return None
    t = types()
    cls = t.event_types.get(name)
    if cls is None:
        return None
    payload = envelope.get("event") or {}
    payload = payload if isinstance(payload, dict) else {}
    if topic == "/tasks/delete" and payload.get("id") == payload.get("container_id"):
        # containerd's TaskDelete of a task names no process: berthd's events have no id
        # since 2026-12-02; one a berthd before that published (a history handed on in
        # an upgrade, an older berthd behind this berth-grpc) still carries it
        payload = {k: v for k, v in payload.items() if k != "id"}
    options = None
    runtime = payload.get("runtime")
    if topic == "/containers/create" and isinstance(runtime, dict):
        # ContainerCreate's runtime options: the Any the container was created with
        options = runtime_options_to_any(runtime.get("options") or {})
        payload = {**payload, "runtime": {"name": runtime.get("name") or ""}}
    event = fill(cls(), payload)
    if options is not None:
        event.runtime.options.CopyFrom(options)
    return t.events.Envelope(
        timestamp=timestamp(envelope.get("timestamp")),
        namespace=envelope.get("namespace") or "",
        topic=str(topic),
        event=t.Any(type_url=name, value=event.SerializeToString()),
    )


def _published_envelope(envelope: dict[str, Any]) -> Any:
    """A client's own event: its Any as it was published (Events/Publish, Forward)."""
    payload = envelope.get("event") or {}
    t = types()
    return t.events.Envelope(
        timestamp=timestamp(envelope.get("timestamp")),
        namespace=envelope.get("namespace") or "",
        topic=str(envelope.get("topic")),
        event=t.Any(
            type_url=str(payload.get("type_url") or ""),
            value=base64.b64decode(payload.get("value") or ""),
        ),
    )


# -- metrics ----------------------------------------------------------------------------

_V1_MEMORY_FIELDS = (
    "cache",
    "rss",
    "rss_huge",
    "mapped_file",
    "dirty",
    "writeback",
    "inactive_anon",
    "active_anon",
    "inactive_file",
    "active_file",
    "unevictable",
    "hierarchical_memory_limit",
    "hierarchical_swap_limit",
    "total_cache",
    "total_rss",
    "total_rss_huge",
    "total_mapped_file",
    "total_dirty",
    "total_writeback",
    "total_inactive_anon",
    "total_active_anon",
    "total_inactive_file",
    "total_active_file",
    "total_unevictable",
)
_V1_MEMORY_RENAMES = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault",
    "total_pgmajfault": "total_pg_maj_fault",
}
_U64 = (1 << 64) - 1


def _u64(value: Any) -> int:
    try:
        return max(0, min(int(value), _U64))
    except (TypeError, ValueError):
        return 0


def metrics_any(stats: dict[str, Any]) -> Any:
    """The shim's cgroup statistics as containerd reports them: an Any of
    io.containerd.cgroups.v1.Metrics or .v2.Metrics, by the host's cgroup version."""
    t = types()
    cpu = stats.get("cpu") or {}
    memory = stats.get("memory") or {}
    pids = stats.get("pids") or {}
    mstat = memory.get("stat") or {}
    throttling = cpu.get("throttling") or {}
    if stats.get("cgroup_version") == 2:
        m2 = t.cgroups_v2.Metrics()
        m2.pids.current = _u64(pids.get("current"))
        m2.pids.limit = _u64(pids.get("limit"))
        m2.cpu.usage_usec = _u64(cpu.get("usage_ns", 0)) // 1000
        m2.cpu.user_usec = _u64(cpu.get("user_ns", 0)) // 1000
        m2.cpu.system_usec = _u64(cpu.get("system_ns", 0)) // 1000
        m2.cpu.nr_periods = _u64(throttling.get("nr_periods"))
        m2.cpu.nr_throttled = _u64(throttling.get("nr_throttled"))
        m2.cpu.throttled_usec = _u64(throttling.get("throttled_usec"))
        fields = m2.memory.DESCRIPTOR.fields_by_name
        for key, value in mstat.items():
            if key in fields:
                setattr(m2.memory, key, _u64(value))
        m2.memory.usage = _u64(memory.get("usage"))
        m2.memory.usage_limit = _u64(memory.get("limit"))
        m2.memory_events.oom_kill = _u64(memory.get("failcnt"))
        return t.Any(type_url=CGROUPS_V2_METRICS, value=m2.SerializeToString())
    m1 = t.cgroups_v1.Metrics()
    m1.pids.current = _u64(pids.get("current"))
    m1.pids.limit = _u64(pids.get("limit"))
    m1.cpu.usage.total = _u64(cpu.get("usage_ns"))
    m1.cpu.usage.kernel = _u64(cpu.get("system_ns"))
    m1.cpu.usage.user = _u64(cpu.get("user_ns"))
    m1.cpu.usage.per_cpu.extend(_u64(v) for v in cpu.get("percpu_ns") or [])
    m1.cpu.throttling.periods = _u64(throttling.get("nr_periods"))
    m1.cpu.throttling.throttled_periods = _u64(throttling.get("nr_throttled"))
    m1.cpu.throttling.throttled_time = _u64(throttling.get("throttled_time"))
    for key in _V1_MEMORY_FIELDS:
        if key in mstat:
            setattr(m1.memory, key, _u64(mstat[key]))
    for key, field_name in _V1_MEMORY_RENAMES.items():
        if key in mstat:
            setattr(m1.memory, field_name, _u64(mstat[key]))
    m1.memory.usage.usage = _u64(memory.get("usage"))
    m1.memory.usage.max = _u64(memory.get("max_usage"))
    m1.memory.usage.limit = _u64(memory.get("limit"))
    m1.memory.usage.failcnt = _u64(memory.get("failcnt"))
    return t.Any(type_url=CGROUPS_V1_METRICS, value=m1.SerializeToString())


# -- filters: what each object answers for, as containerd's adaptors do -------------------


def _present(value: Any) -> tuple[str, bool]:
    text = "" if value is None else str(value)
    return text, bool(text)


def adapt_container(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    head, rest = path[0], path[1:]
    if head in ("id", "image"):
        return _present(doc.get(head))
    if head == "runtime" and rest[:1] == ("name",):
        return _present((doc.get("runtime") or {}).get("name"))
    if head == "labels":
        return map_field(doc.get("labels"), rest)
    return "", False


def adapt_image(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    head, rest = path[0], path[1:]
    target = doc.get("target") or {}
    if head == "name":
        return _present(doc.get("name"))
    if head == "target" and rest[:1] == ("digest",):
        return _present(target.get("digest"))
    if head == "target" and rest[:1] == ("mediatype",):
        return _present(target.get("media_type"))
    if head == "labels":
        return map_field(doc.get("labels"), rest)
    if head == "annotations":
        return map_field(target.get("annotations"), rest)
    return "", False


def adapt_content(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    if path[0] == "digest":
        return str(doc.get("digest") or ""), True
    if path[0] == "labels":
        return map_field(doc.get("labels"), path[1:])
    return "", False


def adapt_ingest(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    if path[0] == "ref":
        return str(doc.get("ref") or ""), True
    return "", False


def adapt_lease(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    if path[0] == "id":
        return _present(doc.get("id"))
    if path[0] == "labels":
        return map_field(doc.get("labels"), path[1:])
    return "", False


def adapt_snapshot(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    head = path[0]
    if head == "kind":
        kind = str(doc.get("kind") or "")
        return (kind, True) if kind in SNAPSHOT_KINDS else ("", False)
    if head in ("name", "parent"):
        return str(doc.get(head) or ""), True
    if head == "labels":
        return map_field(doc.get("labels"), path[1:])
    return "", False


def adapt_task(doc: dict[str, Any], path: tuple[str, ...]) -> tuple[str, bool]:
    """A task for Tasks/Metrics' filters: containerd's answers for `id` and `namespace`
    only (`runtime` is present nowhere)."""
    if path[0] in ("id", "namespace"):
        return str(doc.get(path[0]) or ""), True
    return "", False
