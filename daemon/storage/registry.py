"""Pull and push over the OCI distribution API (httpx, async under trio).

- HTTP or HTTPS (a CA to trust may be given); redirects followed (blob storage often
  redirects); `WWW-Authenticate: Bearer` tokens fetched from the realm (with basic
  credentials when given) and `Basic` answered directly.
- Blobs are fetched concurrently (3 at a time) into named ingests (`pull-<digest>`), so an
  interrupted pull resumes with a Range request; every byte is hashed as it arrives and
  the commit verifies size and digest, so a wrong or truncated blob is never stored.
- Manifests and indexes are size-capped and checked like archive documents; an index is
  resolved to the host platform (or the one asked for).
- Every reply is read as the bytes sent, never decoded (berth asks for `identity`; a body
  in any other Content-Encoding is refused: a 500-byte reply can decode to gigabytes), and
  as it arrives, with a cap: a document MAX_DOCUMENT, a token reply TOKEN_LIMIT, the text
  of an error ERROR_TEXT; a blob its declared size. Redirects are followed here, not by
  httpx, which reads (and decodes) a redirect's whole body.
- Disk work (opening and resuming an ingest, writing a chunk, committing, storing the
  documents, unpacking) runs in worker threads, never on berthd's trio loop.
Imported lazily by berthd: httpx is only loaded when a transfer runs.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from berth.daemon.documents import load_json
from berth.daemon.reference import Reference
from berth.daemon.storage import images, schema1, transfer
from berth.daemon.storage.content import validate_digest
from berth.daemon.storage.images import Descriptor
from berth.daemon.storage.service import GC_REF_CONTENT, Storage, decompressor
from berth.shim.wire.errors import (
    AlreadyExists,
    BerthError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

log = logging.getLogger("berthd.registry")

ACCEPT = ", ".join(
    [images.OCI_INDEX, images.OCI_MANIFEST, images.DOCKER_LIST, images.DOCKER_MANIFEST]
    + [f"{t}; q=0.5" for t in schema1.TYPES]  # old registries' images: converted on pull
)
CONCURRENCY = 3
TRANSFER_ATTEMPTS = 3
CHUNK = 1 << 20
MAX_REDIRECTS = 10
TOKEN_LIMIT = 64 * 1024  # a token reply (a JWT and a few fields) is a few KiB
ERROR_TEXT = 4 * 1024  # of an error reply's body, read for its message
SHOWN_ERROR = 200  # characters of it shown
_LENGTH = re.compile(r"[0-9]{1,19}")  # a Content-Length berth takes (ASCII digits, < 2**63)
MAX_LENGTH = (1 << 63) - 1

Progress = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class Reply:
    """A registry's reply, its body (if asked for) read raw and bounded."""

    status_code: int
    headers: httpx.Headers
    body: bytes


class RegistryClient:
    def __init__(
        self,
        ref: Reference,
        *,
        plain_http: bool = False,
        username: str = "",
        password: str = "",
        tls_ca: str = "",
        tls_skip_verify: bool = False,
    ) -> None:
        self.ref = ref
        scheme = "http" if plain_http else "https"
        self.base = f"{scheme}://{ref.host}/v2/{ref.path}"
        verify: ssl.SSLContext | bool = True
        if tls_skip_verify:
            verify = False
        elif tls_ca:
            try:
                verify = ssl.create_default_context(cadata=tls_ca)
            except (ssl.SSLError, ValueError, TypeError) as exc:
                raise InvalidArgument(f"tls_ca is not a PEM certificate: {exc}") from None
        self._credentials = (username, password) if username else None
        self._token: dict[str, str] = {}
        self._client = httpx.AsyncClient(
            verify=verify,
            follow_redirects=False,  # _send follows them (see the module docstring)
            headers={"Accept-Encoding": "identity"},
            timeout=httpx.Timeout(30.0, read=300.0),
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- auth

    async def _authorize(self, response: httpx.Response, scope: str) -> str:
        challenge = response.headers.get("www-authenticate", "")
        scheme, _, rest = challenge.partition(" ")
        if scheme.lower() == "basic":
            if not self._credentials:
                raise PermissionDenied(f"{self.ref.host} requires credentials (--user)")
            raw = f"{self._credentials[0]}:{self._credentials[1]}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme.lower() != "bearer":
            raise PermissionDenied(f"{self.ref.host}: unsupported authentication {challenge!r}")
        params = _challenge_params(rest)
        realm = params.get("realm")
        if not realm:
            raise PermissionDenied(f"{self.ref.host}: bearer challenge without a realm")
        query = {
            "service": params.get("service", ""),
            "scope": params.get("scope") or f"repository:{self.ref.path}:{scope}",
        }
        auth = httpx.BasicAuth(*self._credentials) if self._credentials else None
        what = f"the token reply of {realm}"
        try:
            reply = await self._send("GET", httpx.URL(realm).copy_merge_params(query), {}, auth)
            try:
                if reply.status_code != 200:
                    raise PermissionDenied(
                        f"token request to {realm} failed: HTTP {reply.status_code}"
                    )
                data = await _read(reply, TOKEN_LIMIT, what)
            finally:
                await reply.aclose()
        except httpx.InvalidURL as exc:
            raise PermissionDenied(
                f"{self.ref.host}: unusable bearer realm {realm!r}: {exc}"
            ) from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"token service {realm}: {describe(exc)}") from None
        try:
            doc = load_json(data, what, max_size=TOKEN_LIMIT)
        except InvalidArgument:
            doc = None
        if not isinstance(doc, dict):
            raise PermissionDenied(f"{realm} answered with no JSON object")
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise PermissionDenied(f"{realm} returned no token")
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise PermissionDenied(f"{realm} returned a token that is not a header value")
        return "Bearer " + token

    async def _send(
        self,
        method: str,
        url: str | httpx.URL,
        headers: dict[str, str],
        auth: httpx.Auth | None = None,
        content: Any = None,
    ) -> httpx.Response:
        """One request, its redirects followed (their bodies never read); the final reply
        is streamed: the caller reads it (bounded, `_read`) and closes it. httpx's own
        redirect handling would read each redirect's whole body, decoded."""
        request = self._client.build_request(method, url, headers=headers, content=content)
        response = await self._client.send(request, auth=auth, stream=True)
        for _ in range(MAX_REDIRECTS):
            follow = response.next_request  # cross-origin: without the Authorization header
            if follow is None:
                return response
            await response.aclose()
            response = await self._client.send(follow, stream=True)
        await response.aclose()
        raise Unavailable(f"{self.ref.host}: more than {MAX_REDIRECTS} redirects for {url}")

    async def _open(
        self,
        method: str,
        url: str,
        *,
        scope: str = "pull",
        headers: dict[str, str] | None = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
    ) -> httpx.Response:
        """One request (see `_send`: the caller closes the reply), retried once with
        fresh credentials after a 401. A streamed body is given as a factory: a retry (a
        token that expired mid-push) needs a new stream."""
        headers = dict(headers or {})
        if scope in self._token:
            headers["Authorization"] = self._token[scope]

        def body() -> Any:
            return content() if callable(content) else content

        response = await self._send(method, url, headers, content=body())
        if response.status_code == 401:
            await response.aclose()
            self._token[scope] = await self._authorize(response, scope)
            headers["Authorization"] = self._token[scope]
            response = await self._send(method, url, headers, content=body())
        if response.status_code == 401:
            await response.aclose()
            raise PermissionDenied(f"{self.ref.host}: authentication failed")
        return response

    async def request(
        self,
        method: str,
        url: str,
        *,
        what: str,
        scope: str = "pull",
        headers: dict[str, str] | None = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
        ok: tuple[int, ...] | None = (200,),
        limit: int | None = None,
    ) -> Reply:
        """`_open`, its status checked against `ok` (None: any) and, with a `limit`, its
        body read (more than `limit` bytes is an error); the reply is closed."""
        response = await self._open(method, url, scope=scope, headers=headers, content=content)
        try:
            if ok is not None:
                await _check(response, what, ok)
            body = b"" if limit is None else await _read(response, limit, what)
            return Reply(response.status_code, response.headers, body)
        finally:
            await response.aclose()

    # -- reading

    async def resolve(self) -> tuple[Descriptor, bytes]:
        """The top descriptor of the reference, with its document."""
        url = f"{self.base}/manifests/{self.ref.object}"
        reply = await self.request(
            "GET",
            url,
            what=f"manifest {self.ref}",
            headers={"Accept": ACCEPT},
            limit=images.MAX_DOCUMENT,
        )
        data = reply.body
        media_type, digest = await trio.to_thread.run_sync(
            _identify, reply.headers.get("content-type", ""), data
        )
        if not digest:
            raise InvalidArgument(f"{self.ref}: unsupported manifest type {media_type!r}")
        if self.ref.digest and digest != self.ref.digest:
            raise FailedPrecondition(f"{self.ref}: the registry served {digest}")
        return Descriptor(media_type, digest, len(data)), data

    async def blob_size(self, digest: str) -> int:
        """A blob's size as the registry states it (HEAD), 0 if it does not say: schema 1
        manifests give none."""
        what = f"blob {digest}"
        reply = await self.request("HEAD", f"{self.base}/blobs/{digest}", what=what)
        return _declared_length(reply.headers, what) or 0

    async def fetch_document(self, desc: Descriptor) -> bytes:
        if desc.size > images.MAX_DOCUMENT:
            raise InvalidArgument(f"{desc.digest}: {desc.size} bytes is too large for a manifest")
        reply = await self.request(
            "GET",
            f"{self.base}/manifests/{desc.digest}",
            what=f"manifest {desc.digest}",
            headers={"Accept": desc.media_type},
            limit=desc.size,  # any byte more cannot match
        )
        data = reply.body
        if "sha256:" + hashlib.sha256(data).hexdigest() != desc.digest or len(data) != desc.size:
            raise FailedPrecondition(f"manifest {desc.digest} does not match its digest")
        return data

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[None]]) -> None:
        """Run one blob transfer, again after a transport failure (a connection reset, a
        keep-alive connection the server closed as it was reused): each retry resumes or
        re-checks, so it repeats no work that already landed."""
        for n in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                await attempt()
                return
            except httpx.TransportError as exc:
                if n == TRANSFER_ATTEMPTS:
                    raise
                log.warning("%s: %s (attempt %d); retrying", what, describe(exc), n)
                await trio.sleep(0.2 * n)

    async def fetch_blob(
        self,
        storage: Storage,
        namespace: str,
        desc: Descriptor,
        lease: str,
        progress: Progress,
        kind: str,
        *,
        declared: bool = True,
    ) -> None:
        """Download a blob into the content store, resuming a previous attempt. `declared`:
        desc.size is the blob's size, even if 0 (schema 1 layers may have none). The
        ingest is opened (re-hashing what a previous attempt left), written and committed
        in worker threads."""
        ref = f"pull-{desc.digest}"
        what = f"blob {desc.digest}"
        open_writer = functools.partial(
            storage.open_writer, namespace, ref, desc.size, desc.digest, lease, declared=declared
        )
        try:
            writer = await trio.to_thread.run_sync(open_writer)
        except AlreadyExists:
            await _report_exists(progress, kind, desc)
            return
        try:
            headers = {"Range": f"bytes={writer.offset}-"} if writer.offset else {}
            response = await self._open("GET", f"{self.base}/blobs/{desc.digest}", headers=headers)
            try:
                if response.status_code == 200 and writer.offset:
                    # No range support: start over.
                    writer.close()
                    await trio.to_thread.run_sync(storage.content.abort, f"{namespace}/{ref}")
                    writer = await trio.to_thread.run_sync(open_writer)
                elif response.status_code not in (200, 206):
                    await _check(response, what)
                _require_identity(response.headers, what)
                length = _declared_length(response.headers, what)
                if declared and length is not None and length > desc.size - writer.offset:
                    raise InvalidArgument(
                        f"{what}: the registry sends {length} bytes from offset "
                        f"{writer.offset}, more than its size {desc.size}"
                    )
                await progress(
                    {
                        "kind": kind,
                        "digest": desc.digest,
                        "offset": writer.offset,
                        "total": desc.size,
                        "status": "downloading",
                    }
                )
                async for chunk in response.aiter_raw(CHUNK):
                    # hashed as it arrives; more than a declared size is refused
                    await trio.to_thread.run_sync(writer.write, chunk)
                    await progress(
                        {
                            "kind": kind,
                            "digest": desc.digest,
                            "offset": writer.offset,
                            "total": desc.size,
                            "status": "downloading",
                        }
                    )
            finally:
                await response.aclose()
            await trio.to_thread.run_sync(
                storage.commit, namespace, writer, desc.size, desc.digest, None, lease
            )
        finally:
            writer.close()
        await progress(
            {
                "kind": kind,
                "digest": desc.digest,
                "offset": desc.size,
                "total": desc.size,
                "status": "done",
            }
        )

    # -- writing

    async def blob_exists(self, digest: str) -> bool:
        reply = await self.request(
            "HEAD", f"{self.base}/blobs/{digest}", what=f"blob {digest}", scope="pull,push", ok=None
        )
        return reply.status_code == 200

    async def push_blob(
        self, storage: Storage, desc: Descriptor, progress: Progress, kind: str
    ) -> None:
        if await self.blob_exists(desc.digest):  # also after a retry: it may have landed
            await _report_exists(progress, kind, desc)
            return
        what = f"upload of {desc.digest}"
        reply = await self.request(
            "POST", f"{self.base}/blobs/uploads/", what=what, scope="pull,push", ok=(202, 201)
        )
        location = reply.headers.get("location")
        if not location:
            raise Unavailable(f"{self.ref.host} gave no upload location")
        url = httpx.URL(self.base).join(location)
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            sent = 0
            with open(storage.content.path(desc.digest), "rb") as f:
                while chunk := await trio.to_thread.run_sync(f.read, CHUNK):
                    sent += len(chunk)
                    await progress(
                        {
                            "kind": kind,
                            "digest": desc.digest,
                            "offset": sent,
                            "total": desc.size,
                            "status": "uploading",
                        }
                    )
                    yield chunk

        params = dict(url.params)
        params["digest"] = desc.digest
        await self.request(
            "PUT",
            str(url.copy_with(params=params)),
            what=what,
            scope="pull,push",
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
            content=body,
            ok=(201, 204),
        )
        await progress(
            {
                "kind": kind,
                "digest": desc.digest,
                "offset": desc.size,
                "total": desc.size,
                "status": "done",
            }
        )

    async def push_manifest(self, reference: str, media_type: str, data: bytes) -> None:
        await self.request(
            "PUT",
            f"{self.base}/manifests/{reference}",
            what=f"manifest {reference}",
            scope="pull,push",
            headers={"Content-Type": media_type},
            content=data,
            ok=(200, 201, 204),
        )


@contextlib.asynccontextmanager
async def _transfers() -> AsyncIterator[trio.Nursery]:
    """A nursery for concurrent transfers whose failure surfaces as the typed error of the
    first transfer that failed (trio wraps errors leaving a nursery in an ExceptionGroup)."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        stack: list[BaseException] = [group]
        while stack:
            exc = stack.pop(0)
            if isinstance(exc, BaseExceptionGroup):
                stack.extend(exc.exceptions)
            else:
                leaves.append(exc)
        if any(isinstance(e, trio.Cancelled) for e in leaves):
            raise  # a cancellation (e.g. the client went away) stays one
        typed = [e for e in leaves if isinstance(e, BerthError)]
        if typed:
            raise typed[0] from None
        for leaf in leaves:
            if isinstance(leaf, REGISTRY_ERRORS):
                raise Unavailable(f"registry transfer failed: {describe(leaf)}") from None
        # Anything else (the API client's stream broke, ENOSPC while writing a blob) leaves
        # as itself, so the RPC layer treats it as it treats it everywhere else.
        raise leaves[0] from None


# What a registry (or the network to it) can cause: transport and TLS failures (httpx wraps
# the ssl and trio stream errors below it), and URLs it hands out (an upload location) that
# do not parse. A bare trio stream error comes from the API client's progress stream.
REGISTRY_ERRORS = (httpx.HTTPError, httpx.InvalidURL)


def describe(exc: BaseException) -> str:
    """The first non-empty message along an exception's cause chain: httpx's errors from a
    TLS handshake on trio carry none themselves, the ssl error below them says why."""
    seen: set[int] = set()
    current: BaseException | None = exc
    text = ""
    while current is not None and id(current) not in seen and not text:
        seen.add(id(current))
        text = str(current).strip()
        # __context__ even where suppressed: httpcore re-raises its own ConnectError with
        # the context suppressed, and the reason (the ssl error) is only found there.
        current = current.__cause__ or current.__context__
    text = text or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({text})"
    return text


@contextlib.asynccontextmanager
async def transport_errors(host: str) -> AsyncIterator[None]:
    """Turn a transport failure anywhere in a pull or push (connect, TLS, a cut stream)
    into Unavailable with the reason, instead of an internal error."""
    try:
        yield
    except REGISTRY_ERRORS as exc:
        raise Unavailable(f"{host}: {describe(exc)}") from None


async def _check(response: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
    if response.status_code in ok:
        return
    if response.status_code == 404:
        raise NotFound(f"{what} not found in the registry")
    if response.status_code in (401, 403):
        raise PermissionDenied(f"{what}: access denied (HTTP {response.status_code})")
    raise Unavailable(f"{what}: HTTP {response.status_code} {await _error_text(response)}")


async def _error_text(response: httpx.Response) -> str:
    """The start of an error reply's body, for its message: at most ERROR_TEXT bytes are
    read (none of a body in some Content-Encoding), the rest never is."""
    try:
        _require_identity(response.headers, "error reply")
    except InvalidArgument:
        return "(a body in an encoding berth did not ask for)"
    data = bytearray()
    with contextlib.suppress(httpx.HTTPError):  # the status says enough
        async for piece in response.aiter_raw():
            data += piece
            if len(data) >= ERROR_TEXT:
                break
    return bytes(data[:ERROR_TEXT]).decode(errors="replace").strip()[:SHOWN_ERROR]


async def _read(response: httpx.Response, limit: int, what: str) -> bytes:
    """The body of `response` as sent (never decoded), refused past `limit` bytes: read
    as it arrives, so a registry that sends more (or says it will) costs at most one
    network read beyond the limit."""
    _require_identity(response.headers, what)
    length = _declared_length(response.headers, what)
    if length is not None and length > limit:
        raise InvalidArgument(f"{what} is larger than {limit} bytes (it is {length})")
    data = bytearray()
    async for piece in response.aiter_raw():
        data += piece
        if len(data) > limit:
            raise InvalidArgument(f"{what} is larger than {limit} bytes")
    return bytes(data)


def _require_identity(headers: httpx.Headers, what: str) -> None:
    """Refuse a body in any Content-Encoding: berth asks for identity, and a compressed
    reply (`gzip, gzip`, zstd) can expand a few hundred bytes to gigabytes."""
    codings = [
        c.strip().lower() for v in headers.get_list("content-encoding") for c in v.split(",")
    ]
    odd = [c for c in codings if c and c != "identity"]
    if odd:
        shown = ", ".join(odd)
        raise InvalidArgument(
            f"{what}: the registry sent it in Content-Encoding {shown[:80]!r} although berth "
            "asked for identity (uncompressed)"
        )


def _declared_length(headers: httpx.Headers, what: str) -> int | None:
    """The Content-Length of a reply, None if there is none; anything but a plain
    decimal below 2**63 is the registry's error, said so."""
    value = headers.get("content-length")
    if value is None:
        return None
    text = value.strip()
    if _LENGTH.fullmatch(text) is None or int(text) > MAX_LENGTH:
        raise InvalidArgument(f"{what}: the registry sent an invalid Content-Length {value[:40]!r}")
    return int(text)


def _identify(content_type: str, data: bytes) -> tuple[str, str]:
    """The media type and digest of a served top manifest ("" for a type berth does not
    take); a worker thread's job: it may parse and hash a few MiB."""
    media_type = _manifest_type(content_type, data)
    if media_type in schema1.TYPES:
        return media_type, schema1.canonical_digest(data)
    if media_type in images.INDEX_TYPES + images.MANIFEST_TYPES:
        return media_type, "sha256:" + hashlib.sha256(data).hexdigest()
    return media_type, ""


def _manifest_type(content_type: str, data: bytes) -> str:
    """The media type of a served manifest: its Content-Type when that is one berth
    knows, else what the document declares (a schema 1 manifest declares none: its
    schemaVersion says it)."""
    media_type = content_type.split(";")[0].strip()
    if media_type in images.INDEX_TYPES + images.MANIFEST_TYPES + schema1.TYPES:
        return media_type
    try:
        doc = images.parse_document(data, "manifest")
    except InvalidArgument:
        return ""
    if schema1.is_schema1(doc):
        return schema1.SIGNED_MANIFEST if "signatures" in doc else schema1.MANIFEST
    return str(doc.get("mediaType") or "")


def _challenge_params(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(text):
        eq = text.find("=", i)
        if eq < 0:
            break
        key = text[i:eq].strip().strip(",").strip()
        if eq + 1 < len(text) and text[eq + 1] == '"':
            end = text.find('"', eq + 2)
            end = len(text) if end < 0 else end
            out[key] = text[eq + 2 : end]
            i = end + 1
        else:
            end = text.find(",", eq)
            end = len(text) if end < 0 else end
            out[key] = text[eq + 1 : end].strip()
            i = end
        while i < len(text) and text[i] in ", ":
            i += 1
    return out


async def pull(
    storage: Storage,
    namespace: str,
    ref: Reference,
    client: RegistryClient,
    progress: Progress,
    *,
    platform: dict[str, str] | None,
    unpack: bool,
    snapshotter: str | None,
) -> dict[str, Any]:
    """Pull `ref` into `namespace`; returns the image record."""
    wanted = platform or images.host()
    with storage.lease(namespace, None) as lease:
        top, top_data = await client.resolve()
        fetcher = _Fetcher(storage, namespace, client, lease, progress)
        if top.media_type in schema1.TYPES:
            top, documents = await _convert_schema1(fetcher, top_data)
        else:
            documents = await _fetch_image(fetcher, ref, top, top_data, wanted)
        record = functools.partial(
            _record,
            storage,
            namespace,
            str(ref),
            top,
            documents,
            unpack=unpack,
            snapshotter=snapshotter,
            platform=platform,
            lease=lease,
        )
        return await trio.to_thread.run_sync(record)


Documents = list[tuple[Descriptor, bytes, dict[str, str]]]  # to store, with their gc labels


def _record(
    storage: Storage,
    namespace: str,
    name: str,
    top: Descriptor,
    documents: Documents,
    *,
    unpack: bool,
    snapshotter: str | None,
    platform: dict[str, str] | None,
    lease: str,
) -> dict[str, Any]:
    """Store a pull's documents, then create (or move) its image record and unpack it
    (in a worker thread). If the unpack fails, the record is put back as it was: a failed
    pull changes nothing (what it stored goes with its lease)."""
    for d, doc, labels in reversed(documents):
        storage.put_blob(namespace, doc, d.digest, d.size, labels, lease)
    with storage.images_replaced(namespace, [(name, top.to_wire())]) as (image,):
        if unpack:
            storage.unpack(namespace, name, snapshotter, platform, lease)
    return image


class _Fetcher:
    """Downloads of one pull: blobs into the content store under its lease, a few at a
    time, each retried after a transport failure."""

    def __init__(
        self,
        storage: Storage,
        namespace: str,
        client: RegistryClient,
        lease: str,
        progress: Progress,
    ) -> None:
        self.storage = storage
        self.namespace = namespace
        self.client = client
        self.lease = lease
        self.progress = progress
        self.limiter = trio.CapacityLimiter(CONCURRENCY)

    async def fetch(self, desc: Descriptor, kind: str, declared: bool) -> None:
        async with self.limiter:
            await self.client.retrying(
                f"download of {desc.digest}",
                lambda: self.client.fetch_blob(
                    self.storage,
                    self.namespace,
                    desc,
                    self.lease,
                    self.progress,
                    kind,
                    declared=declared,
                ),
            )

    async def fetch_all(self, blobs: list[tuple[Descriptor, str, bool]]) -> None:
        """Fetch (descriptor, progress kind, whether its size is declared) blobs."""
        async with _transfers() as nursery:
            for desc, kind, declared in blobs:
                nursery.start_soon(self.fetch, desc, kind, declared)


async def _fetch_image(
    fetcher: _Fetcher, ref: Reference, top: Descriptor, data: bytes, wanted: dict[str, str]
) -> Documents:
    """Resolve an index to the manifest of `wanted`, fetch its config and layers; the
    documents on the way, to store once everything they reference is stored."""
    documents: Documents = []
    desc = top
    for _ in range(4):
        if desc.media_type in images.MANIFEST_TYPES:
            break
        entries = await trio.to_thread.run_sync(images.parse_index, data, desc.media_type)
        choice = [e for e in entries if images.platform_matches(e.platform, wanted)]
        if not choice:
            have = ", ".join(images.format_platform(e.platform) for e in entries) or "none"
            raise NotFound(
                f"{ref}: no manifest for platform {images.format_platform(wanted)} (have {have})"
            )
        documents.append((desc, data, {f"{GC_REF_CONTENT}.m.0": choice[0].digest}))
        desc = choice[0]
        data = await fetcher.client.fetch_document(desc)
    else:
        raise InvalidArgument(f"{ref}: indexes nested too deeply")
    manifest = await trio.to_thread.run_sync(images.parse_manifest, data, desc.media_type)
    documents.append((desc, data, _manifest_refs(manifest)))
    if manifest.config.size > images.MAX_DOCUMENT:  # refused before anything is fetched
        raise InvalidArgument(
            f"{ref}: image config {manifest.config.digest} of {manifest.config.size} bytes "
            f"is larger than {images.MAX_DOCUMENT}"
        )
    await fetcher.fetch_all(
        [(manifest.config, "config", True)] + [(layer, "layer", True) for layer in manifest.layers]
    )
    await trio.to_thread.run_sync(  # validates
        _read_config, fetcher.storage, fetcher.namespace, manifest.config
    )
    return documents


def _read_config(storage: Storage, namespace: str, desc: Descriptor) -> images.ImageConfig:
    return images.parse_config(storage.read_json(namespace, desc))


def _manifest_refs(manifest: images.Manifest) -> dict[str, str]:
    refs = {f"{GC_REF_CONTENT}.config": manifest.config.digest}
    refs.update(
        {f"{GC_REF_CONTENT}.l.{i}": layer.digest for i, layer in enumerate(manifest.layers)}
    )
    return refs


async def _convert_schema1(fetcher: _Fetcher, data: bytes) -> tuple[Descriptor, Documents]:
    """Fetch a schema 1 image's layers and convert it (see schema1.py): the converted
    manifest becomes the image's target; its config and manifest are the documents."""
    steps = await trio.to_thread.run_sync(schema1.parse, data)
    blob_sums = list(dict.fromkeys(s.blob_sum for s in steps if not s.throwaway))
    sizes = {d: await fetcher.client.blob_size(d) for d in blob_sums}
    await fetcher.fetch_all(  # a size the registry does not state (0) is not enforced
        [
            (Descriptor(images.DOCKER_LAYER_GZIP, d, sizes[d]), "layer", sizes[d] > 0)
            for d in blob_sums
        ]
    )
    layers = {
        d: await trio.to_thread.run_sync(_describe_layer, fetcher.storage, fetcher.namespace, d)
        for d in blob_sums
    }
    return await trio.to_thread.run_sync(_converted, steps, layers)


def _converted(
    steps: list[schema1.Step], layers: dict[str, tuple[Descriptor, str]]
) -> tuple[Descriptor, Documents]:
    config_data, manifest_data = schema1.convert(steps, layers)
    manifest = images.parse_manifest(manifest_data, images.DOCKER_MANIFEST)
    images.parse_config(config_data)  # validates
    desc = Descriptor(
        images.DOCKER_MANIFEST,
        "sha256:" + hashlib.sha256(manifest_data).hexdigest(),
        len(manifest_data),
    )
    return desc, [
        (desc, manifest_data, _manifest_refs(manifest)),
        (manifest.config, config_data, {}),
    ]


def _describe_layer(storage: Storage, namespace: str, digest: str) -> tuple[Descriptor, str]:
    """A downloaded schema 1 layer's descriptor (gzip'd or, rarely, plain) and diff ID."""
    size = storage.content_info(namespace, digest)["size"]
    with open(storage.content.path(digest), "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        media_type = images.DOCKER_LAYER_GZIP if gzipped else images.DOCKER_LAYER
        stream = decompressor(media_type, raw)
        uncompressed = hashlib.sha256()
        while chunk := stream.read(CHUNK):
            uncompressed.update(chunk)
    return Descriptor(media_type, digest, size), "sha256:" + uncompressed.hexdigest()


async def push(
    storage: Storage,
    namespace: str,
    local: str,
    ref: Reference,
    client: RegistryClient,
    progress: Progress,
    platform: dict[str, str] | None,
) -> dict[str, Any]:
    """Push the local image `local` to `ref`; returns the pushed top descriptor."""
    image = storage.store.get_image(namespace, local)
    top = Descriptor.from_wire(image["target"])
    manifests = await trio.to_thread.run_sync(_pushable, storage, namespace, local, top, platform)
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def upload(d: Descriptor, kind: str) -> None:
        async with limiter:
            await client.retrying(
                f"upload of {d.digest}", lambda: client.push_blob(storage, d, progress, kind)
            )

    for mdesc in manifests:
        data = await trio.to_thread.run_sync(storage.read_json, namespace, mdesc)
        manifest = await trio.to_thread.run_sync(images.parse_manifest, data, mdesc.media_type)
        async with _transfers() as nursery:
            for layer in manifest.layers:
                nursery.start_soon(upload, layer, "layer")
            nursery.start_soon(upload, manifest.config, "config")
        await client.push_manifest(mdesc.digest, mdesc.media_type, data)
    if top.media_type in images.INDEX_TYPES and platform is not None and len(manifests) == 1:
        top = manifests[0]  # only one platform was pushed: tag that manifest
    data = await trio.to_thread.run_sync(storage.read_json, namespace, top)
    await client.push_manifest(ref.tag or top.digest, top.media_type, data)
    validate_digest(top.digest)
    return top.to_wire()


def _pushable(
    storage: Storage,
    namespace: str,
    local: str,
    top: Descriptor,
    platform: dict[str, str] | None,
) -> list[Descriptor]:
    """The manifests a push uploads, checked before anything is sent: an index goes
    whole or not at all (a registry refuses an index whose manifests it lacks, after
    every layer went up), so one whose other platforms are not held here is refused
    locally, unless `platform` picks one that is."""
    held, absent = transfer.platforms_held(storage, namespace, top)
    if top.media_type not in images.INDEX_TYPES:
        if absent:
            raise FailedPrecondition(f"cannot push {local}: some of its layers are not held here")
        return held
    if platform is not None:
        chosen = [e for e in held if images.platform_matches(e.platform, platform)]
        if not chosen:
            raise FailedPrecondition(
                f"cannot push {local}: no image for platform {images.format_platform(platform)}"
                f" is held here (held: {_platforms(held)})"
            )
        return chosen[:1]
    if absent:
        raise FailedPrecondition(
            f"cannot push {local}: its index lists platforms not held here "
            f"({_platforms(absent)}; pulled for one platform only?); push the held ones "
            f"one at a time with --platform ({_platforms(held)})"
        )
    return held


def _platforms(descs: list[Descriptor]) -> str:
    return ", ".join(images.format_platform(d.platform) for d in descs) or "none"


async def _report_exists(progress: Progress, kind: str, desc: Descriptor) -> None:
    """The progress item of a blob nothing had to move for."""
    await progress(
        {
            "kind": kind,
            "digest": desc.digest,
            "offset": desc.size,
            "total": desc.size,
            "status": "exists",
        }
    )
