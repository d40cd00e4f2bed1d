"""Images: descriptors, manifests, indexes, configs, platforms, chain IDs, runtime specs.

Everything read from an archive or a registry is untrusted:
- every JSON document is size-capped before parsing (CVE-2023-25153: a sparse 2 GiB
  index.json must fail fast, in bounded memory);
- a document that is both an index and a manifest (`manifests` and `layers`/`config`), or
  whose declared mediaType contradicts the descriptor it was fetched by, is rejected
  (CVE-2021-41190);
- a user above 2^31-1 is refused, never wrapped to root (CVE-2024-40635), and
  supplementary groups come from the image's /etc/group (CVE-2023-25173), read through
  openat2 inside the root, with a cap on the file (CVE-2026-47262 class).
"""

from __future__ import annotations

import hashlib
import os
import platform as host_platform
from dataclasses import dataclass, field
from typing import Any

from berth.daemon.documents import load_json_object
from berth.daemon.oci import default_spec
from berth.daemon.storage.content import validate_digest
from berth.native import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS
from berth.shim.fs import NotRegularFile, open_regular
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument

MAX_DOCUMENT = 4 * 1024 * 1024
MAX_ETC_FILE = 1024 * 1024
MAX_UID = 2**31 - 1

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
LAYER_TYPES = {
    OCI_LAYER: "",
    DOCKER_LAYER: "",
    OCI_LAYER_GZIP: "gzip",
    DOCKER_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    # non-distributable ("foreign") layers: containerd applies them as it applies the others
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, doc: Any, what: str = "descriptor") -> Descriptor:
        if not isinstance(doc, dict):
            raise InvalidArgument(f"{what} must be an object")
        media_type, digest, size = doc.get("mediaType"), doc.get("digest"), doc.get("size")
        if not isinstance(media_type, str) or not media_type:
            raise InvalidArgument(f"{what} has no mediaType")
        validate_digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"{what} has an invalid size")
        annotations = doc.get("annotations") or {}
        if not isinstance(annotations, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
        ):
            raise InvalidArgument(f"{what} annotations must be strings")
        platform = doc.get("platform")
        if platform is not None and not isinstance(platform, dict):
            raise InvalidArgument(f"{what} platform must be an object")
        return cls(media_type, digest, size, dict(annotations), platform)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            doc["annotations"] = self.annotations
        if self.platform:
            doc["platform"] = self.platform
        return doc

    def to_wire(self) -> dict[str, Any]:
        return {
            "media_type": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": self.annotations,
        }

    @classmethod
    def from_wire(cls, doc: Any) -> Descriptor:
        if not isinstance(doc, dict):
            raise InvalidArgument("descriptor must be a map")
        return cls.from_json(
            {
                "mediaType": doc.get("media_type"),
                "digest": doc.get("digest"),
                "size": doc.get("size"),
                "annotations": doc.get("annotations") or {},
            }
        )


def parse_document(data: bytes, what: str) -> dict[str, Any]:
    """A size- and nesting-capped JSON object."""
    return load_json_object(data, what, max_size=MAX_DOCUMENT)


def check_kind(doc: dict[str, Any], expected_type: str, what: str) -> None:
    """Refuse ambiguous documents (CVE-2021-41190) and contradicting media types."""
    is_index = "manifests" in doc
    is_manifest = "layers" in doc or "config" in doc
    if is_index and is_manifest:
        raise InvalidArgument(f"{what} is ambiguous: it has both manifests and layers/config")
    declared = doc.get("mediaType")
    if declared is not None and declared != expected_type:
        raise InvalidArgument(
            f"{what} declares mediaType {declared!r} but was referenced as {expected_type!r}"
        )
    if expected_type in INDEX_TYPES and not is_index:
        raise InvalidArgument(f"{what} is referenced as an index but has no manifests")
    if expected_type in MANIFEST_TYPES and not is_manifest:
        raise InvalidArgument(f"{what} is referenced as a manifest but has no layers/config")


@dataclass(frozen=True)
class Manifest:
    config: Descriptor
    layers: list[Descriptor]


def parse_index(data: bytes, media_type: str = OCI_INDEX) -> list[Descriptor]:
    doc = parse_document(data, "index")
    check_kind(doc, media_type, "index")
    manifests = doc.get("manifests")
    if not isinstance(manifests, list) or len(manifests) > 1024:
        raise InvalidArgument("index manifests must be a list of at most 1024")
    return [Descriptor.from_json(m, "index entry") for m in manifests]


def parse_manifest(data: bytes, media_type: str = OCI_MANIFEST) -> Manifest:
    doc = parse_document(data, "manifest")
    check_kind(doc, media_type, "manifest")
    config = Descriptor.from_json(doc.get("config"), "manifest config")
    if config.media_type not in CONFIG_TYPES:
        raise InvalidArgument(f"unsupported config media type {config.media_type!r}")
    layers = doc.get("layers")
    if not isinstance(layers, list) or len(layers) > 512:
        raise InvalidArgument("manifest layers must be a list of at most 512")
    parsed = [Descriptor.from_json(layer, "layer") for layer in layers]
    for layer in parsed:
        if layer.media_type not in LAYER_TYPES:
            raise InvalidArgument(f"unsupported layer media type {layer.media_type!r}")
    return Manifest(config, parsed)


@dataclass(frozen=True)
class ImageConfig:
    diff_ids: list[str]
    entrypoint: list[str]
    cmd: list[str]
    env: list[str]
    working_dir: str
    user: str
    labels: dict[str, str]
    stop_signal: str
    os: str
    architecture: str


def parse_config(data: bytes) -> ImageConfig:
    doc = parse_document(data, "image config")
    rootfs = doc.get("rootfs") or {}
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise InvalidArgument("image config has no rootfs.diff_ids")
    for d in diff_ids:
        validate_digest(d)
    config = doc.get("config") or {}
    if not isinstance(config, dict):
        raise InvalidArgument("image config 'config' must be an object")

    def strings(key: str) -> list[str]:
        value = config.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"image config {key} must be a list of strings")
        return list(value)

    labels = config.get("Labels") or {}
    if not isinstance(labels, dict):
        raise InvalidArgument("image config Labels must be an object")
    return ImageConfig(
        diff_ids=list(diff_ids),
        entrypoint=strings("Entrypoint"),
        cmd=strings("Cmd"),
        env=strings("Env"),
        working_dir=str(config.get("WorkingDir") or ""),
        user=str(config.get("User") or ""),
        labels={str(k): str(v) for k, v in labels.items()},
        stop_signal=str(config.get("StopSignal") or ""),
        os=str(doc.get("os") or ""),
        architecture=str(doc.get("architecture") or ""),
    )


def chain_ids(diff_ids: list[str]) -> list[str]:
    """chain(L0) = diffID(L0); chain(Ln) = sha256(chain(Ln-1) + " " + diffID(Ln))."""
    chains: list[str] = []
    for diff_id in diff_ids:
        if not chains:
            chains.append(diff_id)
        else:
            chains.append(
                "sha256:" + hashlib.sha256(f"{chains[-1]} {diff_id}".encode()).hexdigest()
            )
    return chains


# --- platforms --------------------------------------------------------------------------

_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
}


def host() -> dict[str, str]:
    machine = host_platform.machine()
    out = {"os": "linux", "architecture": _ARCH.get(machine, machine)}
    if machine == "aarch64":
        out["variant"] = "v8"
    return out


def parse_platform(text: str) -> dict[str, str]:
    parts = text.split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise InvalidArgument(f"invalid platform {text!r}: want os/arch[/variant]")
    out = {"os": parts[0], "architecture": parts[1]}
    if len(parts) == 3:
        out["variant"] = parts[2]
    return out


def format_platform(platform: dict[str, Any] | None) -> str:
    """A platform as people write it (`linux/amd64`, `linux/arm64/v8`), for messages and
    listings; "unknown" for a descriptor that names none."""
    if not platform:
        return "unknown"
    parts = [str(platform.get("os") or "?"), str(platform.get("architecture") or "?")]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def platform_matches(candidate: dict[str, Any] | None, wanted: dict[str, str]) -> bool:
    if not candidate:
        return False
    if (
        candidate.get("os") != wanted["os"]
        or candidate.get("architecture") != wanted["architecture"]
    ):
        return False
    variant = wanted.get("variant")
    return not variant or candidate.get("variant") in (None, "", variant)


# --- users -----------------------------------------------------------------------------


def _read_in_root(root: str, path: str) -> str | None:
    """A file of the image read inside `root` (see shim.fs.open_regular: confined, never
    blocking, regular files only), capped; None if absent."""
    rootfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = open_regular(path, dir_fd=rootfd, resolve=RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    except NotRegularFile:
        raise InvalidArgument(f"the image's {path} is not a regular file") from None
    except OSError:
        return None
    finally:
        os.close(rootfd)
    if fd is None:
        return None
    try:
        data = os.read(fd, MAX_ETC_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ETC_FILE:
        raise InvalidArgument(f"the image's {path} is larger than {MAX_ETC_FILE} bytes")
    return data.decode("utf-8", "replace")


def _is_id(text: str) -> bool:
    """Whether `text` is a numeric uid or gid: ASCII digits (str.isdigit() also takes
    "²", which int() refuses); anything else is a name."""
    return text.isascii() and text.isdigit()


def _id_value(text: str) -> int | None:
    """The value of a numeric id (_is_id), None when out of range; thousands of digits
    are not given to int() (which refuses more than 4300)."""
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(MAX_UID)) or int(digits) > MAX_UID:
        return None
    return int(digits)


def _id(text: str, what: str) -> int:
    value = _id_value(text)
    if value is None:
        raise InvalidArgument(f"{what} {_cut(text)} is out of range (0..{MAX_UID})")
    return value


def _cut(text: str) -> str:
    return text if len(text) <= 24 else text[:24] + "..."


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    additional_gids: list[int]


def resolve_user(root: str | None, user: str) -> User:
    """Resolve an image USER ("name", "uid", "name:group", "uid:gid") against the image's
    /etc/passwd and /etc/group; supplementary groups are the groups listing the user."""
    user = user.strip()
    if not user:
        user = "0"
    name, _, group = user.partition(":")
    passwd = _read_in_root(root, "/etc/passwd") if root else None
    groups_file = _read_in_root(root, "/etc/group") if root else None
    uid = gid = None
    username = None
    if _is_id(name):
        uid = _id(name, "uid")
    elif name.startswith("-") and _is_id(name[1:]):
        raise InvalidArgument(f"uid {_cut(name)} is out of range (0..{MAX_UID})")
    for line in (passwd or "").splitlines():
        fields = line.split(":")
        if len(fields) < 4 or not _is_id(fields[2]) or not _is_id(fields[3]):
            continue
        if (uid is None and fields[0] == name) or (uid is not None and _id_value(fields[2]) == uid):
            uid = _id(fields[2], "uid")
            gid = _id(fields[3], "gid")
            username = fields[0]
            break
    if uid is None:
        raise FailedPrecondition(f"no user {name!r} in the image's /etc/passwd")
    if group:
        if _is_id(group):
            gid = _id(group, "gid")
        else:
            gid = next((_id(f[2], "gid") for f in _group_lines(groups_file) if f[0] == group), None)
            if gid is None:
                raise FailedPrecondition(f"no group {group!r} in the image's /etc/group")
    if gid is None:
        gid = 0 if uid == 0 else uid
    additional = []
    if username is not None:
        for fields in _group_lines(groups_file):
            members = fields[3].split(",") if len(fields) > 3 else []
            if username in members:
                g = _id(fields[2], "gid")
                if g != gid and g not in additional:
                    additional.append(g)
    return User(uid, gid, additional)


def _group_lines(text: str | None) -> list[list[str]]:
    out = []
    for line in (text or "").splitlines()[:100_000]:
        fields = line.split(":")
        if len(fields) >= 3 and _is_id(fields[2]):
            out.append(fields)
    return out


def runtime_spec(
    container_id: str,
    namespace: str,
    config: ImageConfig,
    *,
    rootfs_view: str | None,
    args: list[str] | None = None,
    env: list[str] | None = None,
    cwd: str | None = None,
    user: str | None = None,
    terminal: bool = False,
) -> dict[str, Any]:
    """An OCI spec for a container of this image, on berth's safe defaults; the rootfs is
    the bundle's `rootfs` (mounted there from the container's snapshot)."""
    # Docker's rule: arguments given replace CMD and are appended to ENTRYPOINT.
    process_args = config.entrypoint + (list(args) if args else config.cmd)
    if not process_args:
        raise InvalidArgument("the image defines no command: give one")
    who = resolve_user(rootfs_view, user if user is not None else config.user)
    spec = default_spec(
        container_id,
        namespace,
        process_args,
        root="rootfs",
        terminal=terminal,
        cwd=cwd or config.working_dir or "/",
        uid=who.uid,
        gid=who.gid,
    )
    image_env = [e for e in config.env if "=" in e]
    if any(e.startswith("PATH=") for e in image_env):
        spec["process"]["env"] = [e for e in spec["process"]["env"] if not e.startswith("PATH=")]
    spec["process"]["env"] = spec["process"]["env"] + image_env + list(env or [])
    if who.additional_gids:
        spec["process"]["user"]["additionalGids"] = who.additional_gids
    return spec
