"""Pull and push over the OCI distribution API (httpx, async under trio).

- HTTP or HTTPS (a CA to trust may be given); redirects followed (blob storage often
  redirects); `WWW-Authenticate: Bearer` tokens fetched from the realm (with basic
  credentials when given) and `Basic` answered directly.
- Blobs are fetched concurrently (3 at a time) into named ingests (`pull-<digest>`), so an
  interrupted pull resumes with a Range request; every byte is hashed as it arrives and
  the commit verifies size and digest, so a wrong or truncated blob is never stored.
- Manifests and indexes are size-capped and checked like archive documents; an index is
  resolved to the host platform (or the one asked for).
Imported lazily by berthd: httpx is only loaded when a transfer runs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import trio

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

Progress = Callable[[dict[str, Any]], Awaitable[None]]


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
            verify=verify, follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0)
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
        try:
            reply = await self._client.get(realm, params=query, auth=auth)
        except httpx.InvalidURL as exc:
            raise PermissionDenied(
                f"{self.ref.host}: unusable bearer realm {realm!r}: {exc}"
            ) from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"token service {realm}: {describe(exc)}") from None
        if reply.status_code != 200:
            raise PermissionDenied(f"token request to {realm} failed: HTTP {reply.status_code}")
        try:
            doc = reply.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise PermissionDenied(f"{realm} answered with no JSON object")
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token:
            raise PermissionDenied(f"{realm} returned no token")
        if not (token.isascii() and token.isprintable()) or " " in token:
            raise PermissionDenied(f"{realm} returned a token that is not a header value")
        return "Bearer " + token

    async def request(
        self,
        method: str,
        url: str,
        *,
        scope: str = "pull",
        headers: dict[str, str] | None = None,
        content: bytes | Callable[[], AsyncIterator[bytes]] | None = None,
    ) -> httpx.Response:
        """One request, retried once with fresh credentials after a 401. A streamed body is
        given as a factory: a retry (a token that expired mid-push) needs a new stream."""
        headers = dict(headers or {})
        if scope in self._token:
            headers["Authorization"] = self._token[scope]

        def body() -> Any:
            return content() if callable(content) else content

        response = await self._client.request(method, url, headers=headers, content=body())
        if response.status_code == 401:
            await response.aclose()
            self._token[scope] = await self._authorize(response, scope)
            headers["Authorization"] = self._token[scope]
            response = await self._client.request(method, url, headers=headers, content=body())
        if response.status_code == 401:
            raise PermissionDenied(f"{self.ref.host}: authentication failed")
        return response

    async def stream(self, url: str, headers: dict[str, str]) -> httpx.Response:
        """A GET whose body the caller reads (and must close)."""
        if "pull" in self._token:
            headers["Authorization"] = self._token["pull"]
        request = self._client.build_request("GET", url, headers=headers)
        response = await self._client.send(request, stream=True)
        if response.status_code == 401:
            await response.aclose()
            self._token["pull"] = await self._authorize(response, "pull")
            headers["Authorization"] = self._token["pull"]
            response = await self._client.send(
                self._client.build_request("GET", url, headers=headers), stream=True
            )
        return response

    # -- reading

    async def resolve(self) -> tuple[Descriptor, bytes]:
        """The top descriptor of the reference, with its document."""
        url = f"{self.base}/manifests/{self.ref.object}"
        response = await self.request("GET", url, headers={"Accept": ACCEPT})
        _check(response, f"manifest {self.ref}")
        data = response.content
        if len(data) > images.MAX_DOCUMENT:
            raise InvalidArgument(
                f"manifest of {self.ref} is larger than {images.MAX_DOCUMENT} bytes"
            )
        media_type = _manifest_type(response.headers.get("content-type", ""), data)
        if media_type not in images.INDEX_TYPES + images.MANIFEST_TYPES + schema1.TYPES:
            raise InvalidArgument(f"{self.ref}: unsupported manifest type {media_type!r}")
        if media_type in schema1.TYPES:
            digest = schema1.canonical_digest(data)
        else:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if self.ref.digest and digest != self.ref.digest:
            raise FailedPrecondition(f"{self.ref}: the registry served {digest}")
        return Descriptor(media_type, digest, len(data)), data

    async def blob_size(self, digest: str) -> int:
        """A blob's size as the registry states it (HEAD), 0 if it does not say: schema 1
        manifests give none."""
        response = await self.request("HEAD", f"{self.base}/blobs/{digest}")
        _check(response, f"blob {digest}")
        length = response.headers.get("content-length", "")
        return int(length) if length.isdigit() else 0

    async def fetch_document(self, desc: Descriptor) -> bytes:
        if desc.size > images.MAX_DOCUMENT:
            raise InvalidArgument(f"{desc.digest}: {desc.size} bytes is too large for a manifest")
        response = await self.request(
            "GET", f"{self.base}/manifests/{desc.digest}", headers={"Accept": desc.media_type}
        )
        _check(response, f"manifest {desc.digest}")
        data = response.content
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
    ) -> None:
        """Download a blob into the content store, resuming a previous attempt."""
        ref = f"pull-{desc.digest}"
        try:
            writer = storage.open_writer(namespace, ref, desc.size, desc.digest, lease)
        except AlreadyExists:
            await _report_exists(progress, kind, desc)
            return
        try:
            headers = {"Range": f"bytes={writer.offset}-"} if writer.offset else {}
            response = await self.stream(f"{self.base}/blobs/{desc.digest}", headers)
            try:
                if response.status_code == 200 and writer.offset:
                    # No range support: start over.
                    writer.close()
                    storage.content.abort(f"{namespace}/{ref}")
                    writer = storage.open_writer(namespace, ref, desc.size, desc.digest, lease)
                elif response.status_code not in (200, 206):
                    await response.aread()
                    _check(response, f"blob {desc.digest}")
                await progress(
                    {
                        "kind": kind,
                        "digest": desc.digest,
                        "offset": writer.offset,
                        "total": desc.size,
                        "status": "downloading",
                    }
                )
                async for chunk in response.aiter_bytes(CHUNK):
                    writer.write(chunk)  # hashed as it arrives; more than `size` is refused
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
        response = await self.request("HEAD", f"{self.base}/blobs/{digest}", scope="pull,push")
        return response.status_code == 200

    async def push_blob(
        self, storage: Storage, desc: Descriptor, progress: Progress, kind: str
    ) -> None:
        if await self.blob_exists(desc.digest):  # also after a retry: it may have landed
            await _report_exists(progress, kind, desc)
            return
        response = await self.request("POST", f"{self.base}/blobs/uploads/", scope="pull,push")
        if response.status_code not in (202, 201):
            _check(response, f"upload of {desc.digest}")
        location = response.headers.get("location")
        if not location:
            raise Unavailable(f"{self.ref.host} gave no upload location")
        url = httpx.URL(self.base).join(location)
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            sent = 0
            with open(storage.content.path(desc.digest), "rb") as f:
                while chunk := f.read(CHUNK):
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
        response = await self.request(
            "PUT",
            str(url.copy_with(params=params)),
            scope="pull,push",
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(desc.size)},
            content=body,
        )
        _check(response, f"upload of {desc.digest}", ok=(201, 204))
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
        response = await self.request(
            "PUT",
            f"{self.base}/manifests/{reference}",
            scope="pull,push",
            headers={"Content-Type": media_type},
            content=data,
        )
        _check(response, f"manifest {reference}", ok=(200, 201, 204))


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


def _check(response: httpx.Response, what: str, ok: tuple[int, ...] = (200,)) -> None:
    if response.status_code in ok:
        return
    if response.status_code == 404:
        raise NotFound(f"{what} not found in the registry")
    if response.status_code in (401, 403):
        raise PermissionDenied(f"{what}: access denied (HTTP {response.status_code})")
    raise Unavailable(f"{what}: HTTP {response.status_code} {response.text[:200]}")


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
        for d, doc, labels in reversed(documents):
            storage.put_blob(namespace, doc, d.digest, d.size, labels, lease)
        image = storage.store.put_image(
            namespace, str(ref), top.to_wire(), {}, create=True, update=True
        )
        if unpack:
            await trio.to_thread.run_sync(
                lambda: storage.unpack(namespace, str(ref), snapshotter, platform, lease)
            )
        return image


Documents = list[tuple[Descriptor, bytes, dict[str, str]]]  # to store, with their gc labels


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

    async def fetch(self, desc: Descriptor, kind: str) -> None:
        async with self.limiter:
            await self.client.retrying(
                f"download of {desc.digest}",
                lambda: self.client.fetch_blob(
                    self.storage, self.namespace, desc, self.lease, self.progress, kind
                ),
            )

    async def fetch_all(self, blobs: list[tuple[Descriptor, str]]) -> None:
        async with _transfers() as nursery:
            for desc, kind in blobs:
                nursery.start_soon(self.fetch, desc, kind)


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
        entries = images.parse_index(data, desc.media_type)
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
    manifest = images.parse_manifest(data, desc.media_type)
    documents.append((desc, data, _manifest_refs(manifest)))
    await fetcher.fetch_all(
        [(manifest.config, "config")] + [(layer, "layer") for layer in manifest.layers]
    )
    config = fetcher.storage.content_read(fetcher.namespace, manifest.config.digest)
    images.parse_config(config)  # validates
    return documents


def _manifest_refs(manifest: images.Manifest) -> dict[str, str]:
    refs = {f"{GC_REF_CONTENT}.config": manifest.config.digest}
    refs.update(
        {f"{GC_REF_CONTENT}.l.{i}": layer.digest for i, layer in enumerate(manifest.layers)}
    )
    return refs


async def _convert_schema1(fetcher: _Fetcher, data: bytes) -> tuple[Descriptor, Documents]:
    """Fetch a schema 1 image's layers and convert it (see schema1.py): the converted
    manifest becomes the image's target; its config and manifest are the documents."""
    steps = schema1.parse(data)
    blob_sums = list(dict.fromkeys(s.blob_sum for s in steps if not s.throwaway))
    sizes = {d: await fetcher.client.blob_size(d) for d in blob_sums}
    await fetcher.fetch_all(
        [(Descriptor(images.DOCKER_LAYER_GZIP, d, sizes[d]), "layer") for d in blob_sums]
    )
    layers = {
        d: await trio.to_thread.run_sync(_describe_layer, fetcher.storage, fetcher.namespace, d)
        for d in blob_sums
    }
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
    manifests = _pushable(storage, namespace, local, top, platform)
    limiter = trio.CapacityLimiter(CONCURRENCY)

    async def upload(d: Descriptor, kind: str) -> None:
        async with limiter:
            await client.retrying(
                f"upload of {d.digest}", lambda: client.push_blob(storage, d, progress, kind)
            )

    for mdesc in manifests:
        manifest = images.parse_manifest(storage.read_json(namespace, mdesc), mdesc.media_type)
        async with _transfers() as nursery:
            for layer in manifest.layers:
                nursery.start_soon(upload, layer, "layer")
            nursery.start_soon(upload, manifest.config, "config")
        await client.push_manifest(
            mdesc.digest, mdesc.media_type, storage.read_json(namespace, mdesc)
        )
    if top.media_type in images.INDEX_TYPES and platform is not None and len(manifests) == 1:
        top = manifests[0]  # only one platform was pushed: tag that manifest
    await client.push_manifest(
        ref.tag or top.digest, top.media_type, storage.read_json(namespace, top)
    )
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
