"""Hostile tar headers: bounded memory and time, a clear error, never an internal one.

Layers (apply_layer) and image archives (import_archive) are read header by header within
bounds: PAX headers and GNU long names of at most a megabyte in front of an entry, a global
PAX header applied to nothing (as docker and containerd do), GNU sparse maps of at most a
megabyte, and no list of every header read. What tarfile alone raised on malformed
headers (ValueError, IndexError, OSError(EFBIG)) is `invalid argument`. The image
documents next to them: a schema 1 signature header nested deep, a USER that is not
numeric in ASCII, a docker archive's RepoTags that are not a list of strings."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from berth.daemon.metadata import Store
from berth.daemon.storage import schema1, transfer
from berth.daemon.storage.archive import UnsafeLayer, apply_layer
from berth.daemon.storage.images import resolve_user
from berth.daemon.storage.service import Storage
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument

END = bytes(1024)  # two zero blocks: the end of an archive


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % tarfile.BLOCKSIZE)


def _header(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0) -> bytes:
    """A bare ustar header: the size it declares, whatever data follows it."""
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mtime = kind, size, 1_000_000
    return info.tobuf(tarfile.USTAR_FORMAT)


def _record(key: bytes, value: bytes) -> bytes:
    """One PAX record, "<length> <key>=<value>\\n", its length counting itself."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode() + body


def _pax(records: list[tuple[bytes, bytes]], kind: bytes = tarfile.XHDTYPE) -> bytes:
    data = b"".join(_record(k, v) for k, v in records)
    return _header("pax", kind, len(data)) + _pad(data)


def _with_checksum(header: bytes) -> bytes:
    block = bytearray(header)
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def _old_sparse(extended: bool) -> bytes:
    """An old GNU sparse ('S') header, marked extended (another map block follows) or not."""
    block = bytearray(_header("s", tarfile.GNUTYPE_SPARSE))
    block[482] = 1 if extended else 0
    return _with_checksum(bytes(block))


def _apply(root: Path, data: bytes | io.BytesIO) -> Any:
    stream = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    return apply_layer(str(root), stream)


def _peak(fn: Any) -> tuple[int, Exception | None]:
    """The peak of memory allocated while `fn` ran, and what it raised."""
    error = None
    tracemalloc.start()
    try:
        fn()
    except Exception as exc:
        error = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


# --- layers: memory --------------------------------------------------------------------


def test_global_pax_header_is_applied_to_nothing_in_bounded_memory(tmp_path: Path) -> None:
    # 20,000 keys in one global header and 1000 empty entries: a 54 KB gzip layer that
    # took 423 MB (tarfile copies the global keys into every entry and keeps each entry).
    keys = [(b"k%d" % i, b"") for i in range(20_000)] + [(b"uid", b"4242")]
    data = io.BytesIO(
        _pax(keys, tarfile.XGLTYPE) + b"".join(_header(f"e{i}") for i in range(1000)) + END
    )
    results: list[Any] = []
    peak, error = _peak(lambda: results.append(_apply(tmp_path, data)))
    assert error is None
    assert peak < 20 << 20, f"{peak} bytes"
    assert results[0].entries == 1000
    assert len(os.listdir(tmp_path)) == 1000
    assert (tmp_path / "e7").stat().st_uid == 0  # docker and containerd ignore it too


def test_pax_header_declaring_64_mib_is_refused_unread(tmp_path: Path) -> None:
    data = io.BytesIO(_header("pax", tarfile.XHDTYPE, 64 << 20) + bytes(64 << 20) + END)
    peak, error = _peak(lambda: _apply(tmp_path, data))
    assert isinstance(error, UnsafeLayer), error
    assert "more than 1048576 bytes of PAX headers" in str(error)
    assert peak < 8 << 20, f"{peak} bytes"
    assert os.listdir(tmp_path) == []


def test_long_names_and_pax_headers_are_bounded_together(tmp_path: Path) -> None:
    name = b"n" * (600 << 10)
    data = (
        _header("././@LongLink", tarfile.GNUTYPE_LONGNAME, len(name))
        + _pad(name)
        + _pax([(b"comment", b"c" * (600 << 10))])
        + _header("f")
        + END
    )
    with pytest.raises(UnsafeLayer, match="PAX headers and GNU long names"):
        _apply(tmp_path, data)
    chain = b"".join(_pax([(b"path", b"x")]) for _ in range(40)) + _header("f") + END
    with pytest.raises(UnsafeLayer, match="more than 16 PAX headers"):
        _apply(tmp_path, chain)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("kind", ["old", "1.0"])
def test_endless_sparse_maps_are_refused_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    if kind == "old":  # extension blocks of 21 regions each, every one saying "more"
        block = bytearray(512)
        for start in range(0, 21 * 24, 24):
            block[start : start + 24] = b"%011o\0%011o\0" % (1, 1)
        block[504] = 1
        raw = _old_sparse(True) + bytes(block) * 8192 + END
    else:  # a 1.0 map announcing more regions than a megabyte can hold, or an endless line
        sparse = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")]
        raw = _pax(sparse) + _header("f", size=512) + b"9" * (4 << 20) + END
    data = io.BytesIO(raw)
    peak, error = _peak(lambda: _apply(tmp_path, data))
    assert isinstance(error, UnsafeLayer), error
    assert peak < 8 << 20, f"{peak} bytes"


# --- layers: malformed headers ------------------------------------------------------------

SPARSE_10 = [(b"GNU.sparse.major", b"1"), (b"GNU.sparse.minor", b"0")]


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (
            _pax([(b"GNU.sparse.size", b"x"), (b"GNU.sparse.name", b"f")]) + _header("f") + END,
            "malformed tar header",
        ),
        (_pax([(b"GNU.sparse.map", b"a,b")]) + _header("f") + END, "malformed tar header"),
        (
            _pax([*SPARSE_10, (b"GNU.sparse.realsize", b"10")])
            + _header("f", size=512)
            + _pad(b"zz\nqq\n")
            + END,
            "sparse map holds 'zz', not a number",
        ),
        (
            _pax([*SPARSE_10, (b"GNU.sparse.realsize", b"10")]) + _header("f", size=512) + b"1\n",
            "ends inside its sparse map",
        ),
        (_old_sparse(True), "ends inside its sparse map"),
        (
            _pax([(b"GNU.sparse.map", b"0,0"), (b"GNU.sparse.realsize", b"%d" % 2**62)])
            + _header("f")
            + END,
            "File too large",
        ),
        (_header("f")[:124] + b"\xff" * 12 + _header("f")[136:], "negative size"),
    ],
    ids=["sparse.size", "sparse.map", "map-1.0", "map-1.0-cut", "old-cut", "efbig", "negative"],
)
def test_malformed_headers_are_clear_errors(tmp_path: Path, layer: bytes, message: str) -> None:
    if message == "negative size":
        layer = _with_checksum(layer) + END
    with pytest.raises(UnsafeLayer, match=message):
        _apply(tmp_path, layer)


def test_an_invalid_header_mid_layer_is_not_taken_for_its_end(tmp_path: Path) -> None:
    # tarfile ends an archive at an invalid header after the first block: the entries
    # after it were silently left out, with the diff ID of the whole stream verified.
    data = _header("a") + b"garbage!" * 64 + _header("b") + END
    with pytest.raises(UnsafeLayer, match="invalid tar header at byte 512"):
        _apply(tmp_path, data)


class _EndCounter(io.BytesIO):
    """A stream that fails a test reading on and on past its end (tarfile's skip)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads_at_end = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size:
            self.reads_at_end += 1
            assert self.reads_at_end < 1000, "read on past the end of the stream"
        return data


def test_a_size_beyond_the_stream_ends_the_layer_at_once(tmp_path: Path) -> None:
    # A whiteout (whose data nobody reads) of 10^30 bytes: tarfile's stream seek read
    # nothing for ever, one berthd thread at 100% CPU.
    data = _pax([(b"size", b"1" + b"0" * 30)]) + _header(".wh.x") + END
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match="ends inside the data"):
        apply_layer(str(tmp_path), _EndCounter(data))
    assert time.monotonic() - started < 10


def test_gnu_tar_sparse_files_of_every_format_apply(tmp_path: Path) -> None:
    # tar is essential in Debian: missing, it is a broken machine, not a reason to skip
    assert shutil.which("tar"), "GNU tar is needed"
    src = tmp_path / "src"
    src.mkdir()
    fd = os.open(src / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for i in range(40):  # more regions than an old header and a 1.0 map block hold
            os.pwrite(fd, b"region %d " % i * 64, i * (1 << 20))
        os.ftruncate(fd, 64 << 20)
    finally:
        os.close(fd)
    (src / "lead").write_bytes(b"x" * 5000)  # data at offset 0
    os.truncate(src / "lead", 4 << 20)
    expected = {n: hashlib.sha256((src / n).read_bytes()).hexdigest() for n in ("big", "lead")}
    formats = [["--format=gnu"]] + [
        ["--format=posix", f"--sparse-version={v}"] for v in ("0.0", "0.1", "1.0")
    ]
    for options in formats:
        out = tmp_path / "layer.tar"
        subprocess.run(
            ["tar", *options, "--sparse", "-C", str(src), "-cf", str(out), "big", "lead"],
            check=True,
        )
        root = tmp_path / f"root{formats.index(options)}"
        root.mkdir()
        result = apply_layer(str(root), io.BytesIO(out.read_bytes()))
        assert result.entries == 2, options
        for name, digest in expected.items():
            assert hashlib.sha256((root / name).read_bytes()).hexdigest() == digest, options
        assert (root / "big").stat().st_blocks * 512 < 8 << 20, options  # holes kept


# --- image archives ----------------------------------------------------------------------


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = Store(str(tmp_path / "meta" / "meta.db"))
    store.ensure_namespace("default")
    storage = Storage(str(tmp_path / "root"), str(tmp_path / "state"), store, "native")
    try:
        yield storage
    finally:
        storage.close()
        store.close()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _docker_archive(path: Path, repo_tags: object) -> None:
    """A `docker save` archive of one empty layer, its manifest's RepoTags as given."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT):
        pass
    layer = buf.getvalue()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        }
    ).encode()
    manifest = [{"Config": "config.json", "RepoTags": repo_tags, "Layers": ["l/layer.tar"]}]
    files = {"config.json": config, "l/layer.tar": layer, "manifest.json": json.dumps(manifest)}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            raw = data if isinstance(data, bytes) else data.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.mark.parametrize("tags", ["busybox:1", 5, ["ok:1", 7]])
def test_repo_tags_must_be_a_list_of_strings(
    storage: Storage, tmp_path: Path, tags: object
) -> None:
    path = tmp_path / "docker.tar"
    _docker_archive(path, tags)
    with pytest.raises(InvalidArgument, match="RepoTags must be a list of strings"):
        transfer.import_archive(storage, "default", str(path), unpack=False)
    assert storage.store.list_images("default") == []


def test_repo_tags_null_and_a_list_import(storage: Storage, tmp_path: Path) -> None:
    for tags, name in ((None, None), (["busybox:1"], "docker.io/library/busybox:1")):
        path = tmp_path / "docker.tar"
        _docker_archive(path, tags)
        made = transfer.import_archive(storage, "default", str(path), unpack=False)
        assert len(made["images"]) == 1
        if name:
            assert made["images"][0]["name"] == name


def test_archive_headers_are_read_within_bounds(
    storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "hostile.tar"
    path.write_bytes(_header("a") + _pax([(b"GNU.sparse.map", b"a,b")]) + _header("f") + END)
    with pytest.raises(InvalidArgument, match="malformed tar header"):
        transfer.import_archive(storage, "default", str(path), unpack=False)
    path.write_bytes(_header("pax", tarfile.XHDTYPE, 64 << 20) + bytes(64 << 20) + END)
    with pytest.raises(InvalidArgument, match="PAX headers"):
        transfer.import_archive(storage, "default", str(path), unpack=False)
    monkeypatch.setattr(transfer, "MAX_ARCHIVE_MEMBERS", 10)
    path.write_bytes(b"".join(_header(f"d{i}", tarfile.DIRTYPE) for i in range(11)) + END)
    with pytest.raises(InvalidArgument, match="more than 10 entries"):
        transfer.import_archive(storage, "default", str(path), unpack=False)
    assert storage.store.list_images("default") == []


# --- image documents ---------------------------------------------------------------------


def test_schema1_signature_header_nested_deep_is_invalid_argument() -> None:
    protected = base64.urlsafe_b64encode(b"[" * 100_000).decode().rstrip("=")
    manifest = json.dumps(
        {
            "schemaVersion": 1,
            "fsLayers": [],
            "history": [],
            "signatures": [{"protected": protected}],
        }
    ).encode()
    with pytest.raises(InvalidArgument, match="unreadable signature"):
        schema1.payload(manifest)


def test_ids_are_ascii_digits(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        f"sup:x:\u00b2:0::/:/bin/sh\nbig:x:{'1' * 5000}:0::/:/bin/sh\nu:x:5:5::/:/bin/sh\n"
    )
    (tmp_path / "etc/group").write_text("g:x:\u00b3:u\n")
    root = str(tmp_path)
    with pytest.raises(FailedPrecondition, match="no user '\u00b2'"):
        resolve_user(root, "\u00b2")  # a name, as docker takes it: there is none
    with pytest.raises(FailedPrecondition, match="no group '\u00b2'"):
        resolve_user(root, "0:\u00b2")
    with pytest.raises(FailedPrecondition, match="no user 'sup'"):
        resolve_user(root, "sup")  # its uid is not a number: the line is not a user
    with pytest.raises(InvalidArgument, match="out of range"):
        resolve_user(root, "big")
    with pytest.raises(InvalidArgument, match="out of range"):
        resolve_user(root, "9" * 5000)
    assert resolve_user(root, "5").uid == 5
    assert resolve_user(root, "u").additional_gids == []  # group g's gid is not a number
    assert resolve_user(None, "0000000000000000007").uid == 7
