"""Values at the edges that both fuzzers (berthd's API, tests/test_fuzz.py; berth-grpc's,
tests/test_grpc_fuzz.py) give fields: times for containerd's RFC 3339 labels (past int64
nanoseconds, before 1970, not dates at all), containerd's own label keys, and strings
that names and paths must refuse."""

from __future__ import annotations

TIMES = [
    "9999-12-31T23:59:59Z",
    "0001-01-01T00:00:00Z",
    "1970-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "2262-04-12T00:00:00Z",
    "2026-13-45T25:61:61Z",
    "2026-01-01T00:00:00+99:99",
    "99999-01-01T00:00:00Z",
]
LABEL_KEYS = [
    "containerd.io/gc.expire",
    "containerd.io/gc.flat",
    "containerd.io/gc.ref.content",
    "containerd.io/gc.ref.content.l.0",
    "containerd.io/gc.ref.snapshot.overlayfs",
    "containerd.io/gc.ref.image",
    "containerd.io/uncompressed",
    "containerd.io/snapshot.ref",
    "containerd.io/distribution.source.docker.io",
]
HOSTILE = [
    "",
    "../x",
    "..",
    "/",
    "a/../../b",
    "\0",
    "x" * 5000,
    "sha256:" + "0" * 64,
    "sha256:../../etc/passwd",
    "sha256:",
    "sha512:" + "0" * 128,
    "-",
    " ",
    "\n",
    "é",
    "*",
    "%s%n",
    "labels.a==b",
]
