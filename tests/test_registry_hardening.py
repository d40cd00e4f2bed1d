"""Pulls from a hostile registry: replies that would decode to gigabytes, bodies larger
than they may be, nonsense Content-Lengths, an oversized config, a failed unpack, a
declared size of 0, and a resumed download kept off the trio loop.

No containers: the registry is a small HTTP server on loopback that serves what each test
puts in its routes, and the storage is a Storage on the test's own directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from berth.daemon import reference
from berth.daemon.metadata import Store
from berth.daemon.storage import content, images, registry
from berth.daemon.storage.content import ContentStore
from berth.daemon.storage.service import Storage
from berth.shim.wire.errors import (
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

NS = "hardening"
REPO = "team/app"
MIB = 1 << 20
BOUND = 8 * MIB  # what a refused reply may cost at most (it is far less)

Handler = Callable[[BaseHTTPRequestHandler], None]


# --- a registry that serves what a test says ---------------------------------------------


class FakeRegistry:
    """Routes map a path to a handler; every request is recorded (method, path, headers)."""

    def __init__(self) -> None:
        self.routes: dict[str, Handler] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        server = self

        class Serve(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                server._serve(self)

            def do_HEAD(self) -> None:
                server._serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Serve)
        self._httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        path = urlsplit(request.path).path
        self.requests.append(
            (request.command, path, {k.lower(): v for k, v in request.headers.items()})
        )
        handler = self.routes.get(path)
        if handler is None:
            send(request, 404, b"")
        else:
            handler(request)

    def asked(self, path: str) -> list[dict[str, str]]:
        """The headers of every request for `path`."""
        return [headers for _, p, headers in self.requests if p == path]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


def send(
    request: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    *,
    length: str | None = "auto",
    repeat: int = 1,
) -> None:
    """Answer with `body` (`repeat` times); `length` None: no Content-Length, the body
    ends when the connection closes."""
    request.send_response(status)
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    if length == "auto":
        request.send_header("Content-Length", str(len(body) * repeat))
    elif length is not None:
        request.send_header("Content-Length", length)
    if length is None:
        request.send_header("Connection", "close")
        request.close_connection = True
    request.end_headers()
    if request.command == "HEAD":
        return
    try:
        for _ in range(repeat):
            request.wfile.write(body)
        request.wfile.flush()
    except (BrokenPipeError, ConnectionResetError):
        request.close_connection = True  # the client stopped reading: as it should


def answer(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None, **kw: Any
) -> Handler:
    return lambda request: send(request, status, body, headers, **kw)


def blob_server(
    data: bytes, *, ranges: bool = True, headers: dict[str, str] | None = None
) -> Handler:
    """A blob, from the offset a `Range: bytes=N-` asks for (if `ranges`)."""

    def serve(request: BaseHTTPRequestHandler) -> None:
        wanted = request.headers.get("Range", "")
        if ranges and wanted.startswith("bytes="):
            start = int(wanted[6:].rstrip("-"))
            extra = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
            send(request, 206, data[start:], {**extra, **(headers or {})})
        else:
            send(request, 200, data, headers)

    return serve


def bomb(size: int) -> bytes:
    """`size` spaces, gzip'd twice: a few hundred bytes on the wire."""
    return gzip.compress(gzip.compress(b" " * size, 9), 9)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_blob(diff_ids: list[str]) -> bytes:
    return json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    ).encode()


def manifest_blob(config: dict[str, Any], layers: list[dict[str, Any]]) -> bytes:
    return json.dumps(
        {"schemaVersion": 2, "mediaType": images.OCI_MANIFEST, "config": config, "layers": layers}
    ).encode()


def desc(media_type: str, data: bytes, size: int | None = None) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "digest": digest(data),
        "size": len(data) if size is None else size,
    }


def serve_image(
    reg: FakeRegistry,
    *,
    config: bytes,
    layers: list[bytes],
    config_size: int | None = None,
    layer_sizes: list[int] | None = None,
    layer_handler: Callable[[bytes], Handler] = blob_server,
) -> bytes:
    """Serve an OCI image as `REPO:v1`; returns its manifest."""
    sizes = layer_sizes or [len(layer) for layer in layers]
    manifest = manifest_blob(
        desc(images.OCI_CONFIG, config, config_size),
        [
            desc(images.OCI_LAYER_GZIP, layer, size)
            for layer, size in zip(layers, sizes, strict=True)
        ],
    )
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        200, manifest, {"Content-Type": images.OCI_MANIFEST}
    )
    reg.routes[f"/v2/{REPO}/blobs/{digest(config)}"] = blob_server(config)
    for layer in layers:
        reg.routes[f"/v2/{REPO}/blobs/{digest(layer)}"] = layer_handler(layer)
    return manifest


def blob_path(data: bytes) -> str:
    return f"/v2/{REPO}/blobs/{digest(data)}"


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def reg() -> Iterator[FakeRegistry]:
    server = FakeRegistry()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def storage(tmp_path: Path) -> Iterator[Storage]:
    store = Store(str(tmp_path / "meta.db"))
    s = Storage(str(tmp_path / "root"), str(tmp_path / "state"), store)
    try:
        yield s
    finally:
        s.close()
        store.close()


def ref_of(reg: FakeRegistry, tag: str = "v1") -> reference.Reference:
    return reference.parse(f"{reg.host}/{REPO}:{tag}")


async def pull(storage: Storage, reg: FakeRegistry, *, unpack: bool = False) -> dict[str, Any]:
    ref = ref_of(reg)
    client = registry.RegistryClient(ref, plain_http=True)
    items: list[dict[str, Any]] = []

    async def progress(item: dict[str, Any]) -> None:
        items.append(item)

    try:
        async with registry.transport_errors(ref.host):
            return await registry.pull(
                storage, NS, ref, client, progress, platform=None, unpack=unpack, snapshotter=None
            )
    finally:
        await client.aclose()


async def peak_of(work: Callable[[], Awaitable[object]]) -> tuple[int, BaseException | None]:
    """Peak traced memory while `work` runs, and what it raised."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    error: BaseException | None = None
    try:
        await work()
    except BaseException as exc:
        error = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, error


# --- replies read raw, bounded -----------------------------------------------------------


@pytest.mark.parametrize("encoding", ["gzip, gzip", "zstd"])
async def test_a_compressed_manifest_is_refused_in_bounded_memory(
    storage: Storage, reg: FakeRegistry, encoding: str
) -> None:
    """A few hundred bytes that decode to 64 MiB: refused unread (berth asked for identity)."""
    if encoding == "zstd":
        import zstandard

        body = zstandard.ZstdCompressor(level=19).compress(b" " * 64 * MIB)
    else:
        body = bomb(64 * MIB)
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        200, body, {"Content-Type": images.OCI_MANIFEST, "Content-Encoding": encoding}
    )
    peak, error = await peak_of(lambda: pull(storage, reg))
    assert isinstance(error, InvalidArgument), error
    assert "Content-Encoding" in str(error)
    assert peak < BOUND, peak
    assert reg.asked(f"/v2/{REPO}/manifests/v1")[0]["accept-encoding"] == "identity"
    with pytest.raises(NotFound):
        storage.store.get_image(NS, str(ref_of(reg)))


async def test_a_redirect_body_is_never_read(storage: Storage, reg: FakeRegistry) -> None:
    """httpx would read (and decode) a redirect's whole body: berth follows redirects
    itself and reads none, and the pull goes on at the new location."""
    config = config_blob([])
    manifest = serve_image(reg, config=config, layers=[])
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        302,
        bomb(64 * MIB),
        {"Location": f"/v2/{REPO}/manifests/real", "Content-Encoding": "gzip, gzip"},
    )
    reg.routes[f"/v2/{REPO}/manifests/real"] = answer(
        200, manifest, {"Content-Type": images.OCI_MANIFEST}
    )
    peak, error = await peak_of(lambda: pull(storage, reg))
    assert error is None, error
    assert peak < BOUND, peak
    assert storage.store.get_image(NS, str(ref_of(reg)))["target"]["digest"] == digest(manifest)


@pytest.mark.parametrize(
    "kind",
    ["gzip-bomb", "plain-16MiB-no-length", "plain-16MiB"],
)
async def test_a_token_reply_is_read_bounded(
    storage: Storage, reg: FakeRegistry, kind: str
) -> None:
    realm = f"http://{reg.host}/token"
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}",service="test"'}
    )
    if kind == "gzip-bomb":
        token = answer(200, bomb(64 * MIB), {"Content-Encoding": "gzip, gzip"})
    elif kind == "plain-16MiB-no-length":
        token = answer(200, b" " * MIB, length=None, repeat=16)
    else:
        token = answer(200, b" " * MIB, repeat=16)
    reg.routes["/token"] = token
    peak, error = await peak_of(lambda: pull(storage, reg))
    assert isinstance(error, InvalidArgument), error
    assert peak < BOUND, peak


async def test_a_token_reply_is_parsed_with_the_bounded_loader(
    storage: Storage, reg: FakeRegistry
) -> None:
    """Deeply nested JSON is 'no JSON object', not a RecursionError."""
    realm = f"http://{reg.host}/token"
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        401, b"", {"WWW-Authenticate": f'Bearer realm="{realm}"'}
    )
    reg.routes["/token"] = answer(200, b"[" * 60_000)
    with pytest.raises(PermissionDenied, match="no JSON object"):
        await pull(storage, reg)


async def test_an_error_reply_is_read_only_in_part(storage: Storage, reg: FakeRegistry) -> None:
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(500, b"x" * MIB, repeat=32)
    peak, error = await peak_of(lambda: pull(storage, reg))
    assert isinstance(error, Unavailable), error
    assert "HTTP 500" in str(error) and len(str(error)) < 1000
    assert peak < BOUND, peak


async def test_an_encoded_blob_is_refused_and_nothing_stored(
    storage: Storage, reg: FakeRegistry
) -> None:
    layer = gzip.compress(b"a layer")
    serve_image(
        reg,
        config=config_blob([digest(b"x")]),
        layers=[layer],
        layer_handler=lambda data: blob_server(data, headers={"Content-Encoding": "gzip"}),
    )
    with pytest.raises(InvalidArgument, match="Content-Encoding"):
        await pull(storage, reg)
    assert not storage.content.exists(digest(layer))
    with pytest.raises(NotFound):
        storage.store.get_image(NS, str(ref_of(reg)))


# --- Content-Length ----------------------------------------------------------------------


async def test_a_huge_content_length_refuses_a_document_unread(
    storage: Storage, reg: FakeRegistry
) -> None:
    """20 digits (as many as HTTP/1.1's parser lets through) on a 32 MiB stream."""
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(
        200, b" " * MIB, {"Content-Type": images.OCI_MANIFEST}, length="9" * 20, repeat=32
    )
    peak, error = await peak_of(lambda: pull(storage, reg))
    assert isinstance(error, InvalidArgument), error
    assert "Content-Length" in str(error) or "larger than" in str(error)
    assert peak < BOUND, peak


async def test_a_content_length_of_5000_digits_is_a_clear_error(
    storage: Storage, reg: FakeRegistry
) -> None:
    reg.routes[f"/v2/{REPO}/manifests/v1"] = answer(200, b"{}", length="1" * 5000)
    with pytest.raises(BerthError):
        await pull(storage, reg)


@pytest.mark.parametrize("length", ["9" * 20, "²", "١٢", "12abc", "-1", " "])
async def test_a_blob_size_from_a_nonsense_content_length_is_a_clear_error(length: str) -> None:
    """HEAD gives a schema 1 layer's size: it must be a plain decimal below 2**63."""
    ref = reference.parse(f"registry.test/{REPO}:v1")
    client = registry.RegistryClient(ref, plain_http=True)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=[(b"content-length", length.encode())])

    # The test's transport hands the header over as sent: HTTP/1.1's parser would refuse
    # most of these itself, another transport (or a future httpx) need not.
    await client.aclose()
    client._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    try:
        with pytest.raises(InvalidArgument, match="Content-Length"):
            await client.blob_size(digest(b"layer"))
    finally:
        await client.aclose()


# --- the config, the record, a size of 0 -------------------------------------------------


async def test_a_config_declared_larger_than_a_document_is_refused_before_its_fetch(
    storage: Storage, reg: FakeRegistry
) -> None:
    config = config_blob([])
    layer = gzip.compress(b"layer")
    serve_image(reg, config=config, layers=[layer], config_size=images.MAX_DOCUMENT + 1)
    with pytest.raises(InvalidArgument, match="image config"):
        await pull(storage, reg)
    assert reg.asked(blob_path(config)) == [] and reg.asked(blob_path(layer)) == []
    assert storage.content.list_ingests() == []
    with pytest.raises(NotFound):
        storage.store.get_image(NS, str(ref_of(reg)))


@pytest.mark.parametrize("had_one", [True, False])
async def test_a_pull_whose_unpack_fails_leaves_the_image_record_as_it_was(
    storage: Storage, reg: FakeRegistry, had_one: bool
) -> None:
    """The config lists no layer but the manifest one: the unpack refuses it, after the
    record was moved; the record goes back (or away, if the pull created it)."""
    name = str(ref_of(reg))
    old_target = {"media_type": images.OCI_MANIFEST, "digest": digest(b"old"), "size": 3}
    if had_one:
        storage.store.put_image(NS, name, old_target, {"keep": "me"}, create=True, update=False)
    serve_image(reg, config=config_blob([]), layers=[gzip.compress(b"layer")])
    with pytest.raises(InvalidArgument, match="disagree"):
        await pull(storage, reg, unpack=True)
    if had_one:
        image = storage.store.get_image(NS, name)
        assert image["target"] == old_target and image["labels"] == {"keep": "me"}
    else:
        with pytest.raises(NotFound):
            storage.store.get_image(NS, name)


async def test_a_layer_declared_as_0_bytes_is_held_to_it(
    storage: Storage, reg: FakeRegistry
) -> None:
    """A descriptor of size 0 whose digest names 10 bytes: not "size unknown"."""
    layer = b"0123456789"
    serve_image(reg, config=config_blob([digest(layer)]), layers=[layer], layer_sizes=[0])
    with pytest.raises(InvalidArgument, match=r"more than its size 0|exceed the total 0"):
        await pull(storage, reg)
    assert not storage.content.exists(digest(layer))


def test_the_content_store_tells_a_declared_0_from_an_unknown_size(tmp_path: Path) -> None:
    store = ContentStore(str(tmp_path))
    empty = digest(b"")
    w = store.writer("zero", 0, empty, declared=True)
    with pytest.raises(InvalidArgument, match="exceed the total 0"):
        w.write(b"x")
    w.close()
    w = store.writer("zero")  # a resume keeps the declared size
    assert w.declared and w.total == 0
    with pytest.raises(InvalidArgument):
        w.write(b"x")
    assert w.commit() == empty
    # 0 undeclared is containerd's "unknown": anything goes, the commit checks no size
    w = store.writer("unknown")
    w.write(b"abc")
    assert w.commit() == digest(b"abc")
    # and a commit that says 0 of an ingest declared 0 checks it
    w = store.writer("short", 0, declared=True)
    assert w.commit(0) == empty
    w = store.writer("declared-5", 5)
    w.write(b"abc")
    with pytest.raises(FailedPrecondition, match="size mismatch"):
        w.commit()


# --- a resumed download, off the loop ----------------------------------------------------


@pytest.mark.parametrize("ranges", [True, False])
async def test_a_resumed_download_opens_writes_and_aborts_in_worker_threads(
    storage: Storage, reg: FakeRegistry, monkeypatch: pytest.MonkeyPatch, ranges: bool
) -> None:
    """Opening an ingest re-hashes what it holds (gigabytes, maybe), and each write is a
    blocking os.write: none of it may run on the trio loop (the main thread here)."""
    layer = os.urandom(3 * MIB)
    config = config_blob([digest(layer)])
    serve_image(
        reg, config=config, layers=[layer], layer_handler=lambda d: blob_server(d, ranges=ranges)
    )
    half = len(layer) // 2
    partial = storage.content.writer(f"{NS}/pull-{digest(layer)}", len(layer), digest(layer))
    partial.write(layer[:half])
    partial.close()  # a pull cut here: the next one resumes

    on_loop: list[str] = []

    def watch(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def watched(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, watched)

    watch(Storage, "open_writer")
    watch(Storage, "commit")
    watch(Storage, "put_blob")
    watch(content.Writer, "write")
    watch(ContentStore, "abort")
    await pull(storage, reg)
    assert on_loop == []
    assert storage.content.read(digest(layer)) == layer
    asked = reg.asked(blob_path(layer))
    assert asked and asked[0].get("range") == f"bytes={half}-"
    assert storage.content.list_ingests() == []
