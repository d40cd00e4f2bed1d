"""Image references: `[host[:port]/]path[:tag][@digest]`, normalised the way docker does
(`busybox` -> `docker.io/library/busybox:latest`). Trio-free and light: the CLI uses it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from berth.shim.wire.errors import InvalidArgument

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[a-zA-Z0-9-]+\.)*[a-zA-Z0-9-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?")
DEFAULT_HOST = "docker.io"
MAX_REFERENCE = 255


@dataclass(frozen=True)
class Reference:
    host: str
    path: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """host/path (no tag or digest)."""
        return f"{self.host}/{self.path}"

    @property
    def object(self) -> str:
        """What the registry resolves: the digest if any, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def parse(text: str) -> Reference:
    """Parse and normalise an image reference."""
    if not isinstance(text, str) or not text or len(text) > MAX_REFERENCE:
        raise InvalidArgument(f"invalid image reference {text!r}")
    rest, digest = text, ""
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise InvalidArgument(f"invalid digest in reference {text!r}")
    tag = ""
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"invalid tag in reference {text!r}")
    host, _, path = rest.partition("/")
    if not path or (
        "." not in host and ":" not in host and host != "localhost" and not host.startswith("[")
    ):
        host, path = DEFAULT_HOST, rest
    if not _HOST.fullmatch(host):
        raise InvalidArgument(f"invalid registry host in reference {text!r}")
    if host == DEFAULT_HOST and "/" not in path:
        path = f"library/{path}"
    if not _PATH.fullmatch(path):
        raise InvalidArgument(f"invalid repository path in reference {text!r}")
    if not tag and not digest:
        tag = "latest"
    return Reference(host, path, tag, digest)


def normalize(text: str) -> str:
    return str(parse(text))
