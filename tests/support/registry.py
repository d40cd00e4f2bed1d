"""A real registry for the tests: Debian's docker-registry (distribution 2.8) on a loopback
port with its own storage, optionally behind TLS, htpasswd (basic) or token (bearer) auth.

The token service is the one part written here, because distribution does not ship one:
a small HTTP server on loopback that checks basic credentials and issues the JWT the
registry verifies (RS256, signed by `openssl dgst`, the signing certificate in the `x5c`
header and in the registry's `rootcertbundle`). It records every request it served, so a
test can show that the bearer flow really happened.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.helpers import kill, wait_until

SERVICE = "berth-test-registry"
ISSUER = "berth-test-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(directory: str, name: str, *, ip: str | None = None) -> tuple[str, str]:
    """A fresh RSA key and self-signed certificate (PEM paths), valid for one day."""
    key, cert = os.path.join(directory, f"{name}.key"), os.path.join(directory, f"{name}.crt")
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    command += ["-subj", f"/CN={ip or name}", "-keyout", key, "-out", cert]
    if ip:
        command += ["-addext", f"subjectAltName=IP:{ip}"]
    subprocess.run(command, check=True, capture_output=True)
    return key, cert


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A bearer-token service for the registry (see the module docstring)."""

    def __init__(self, directory: str, credentials: tuple[str, str]) -> None:
        self.key, self.cert = self_signed(directory, "token-signer")
        der = subprocess.run(
            ["openssl", "x509", "-in", self.cert, "-outform", "DER"],
            check=True,
            capture_output=True,
        ).stdout
        self._x5c = base64.b64encode(der).decode()
        self._credentials = credentials
        self.requests: list[dict[str, object]] = []  # what was asked, and the answer
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server._serve(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self._httpd.server_address[1]}/token"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        scopes = query.get("scope", [])
        expected = "Basic " + base64.b64encode(":".join(self._credentials).encode()).decode()
        granted = request.headers.get("Authorization") == expected
        self.requests.append({"scopes": scopes, "service": query.get("service"), "ok": granted})
        if not granted:
            request.send_response(401)
            request.end_headers()
            return
        body = json.dumps({"token": self.token(scopes), "expires_in": 300}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def token(self, scopes: list[str]) -> str:
        """A JWT granting every requested `repository:NAME:ACTIONS` scope."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": self._credentials[0],
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 60,
            "iat": now,
            "jti": _b64url(os.urandom(12)),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", self.key],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return signing_input + "." + _b64url(signature)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


class Registry:
    """docker-registry on a loopback port with its own storage dir.

    auth: None, ("basic", (user, password)) or ("token", (user, password)).
    tls: serve https with a fresh self-signed certificate (`ca` is its PEM text)."""

    def __init__(
        self, auth: tuple[str, tuple[str, str]] | None = None, *, tls: bool = False
    ) -> None:
        if shutil.which("docker-registry") is None:
            pytest.fail("docker-registry is not installed (scripts/setup installs it)")
        self.dir = tempfile.mkdtemp(prefix="bt-reg-", dir="/tmp")
        self.tokens: TokenServer | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._start(auth, tls)
        except BaseException:
            self.close()
            raise

    def _start(self, auth: tuple[str, tuple[str, str]] | None, tls: bool) -> None:
        if auth and auth[0] == "token":  # binds its own port first: no collision below
            self.tokens = TokenServer(self.dir, auth[1])
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = ["version: 0.1", "log:", "  level: warn", "storage:", "  filesystem:"]
        config += [f"    rootdirectory: {self.dir}/data", "  delete:", "    enabled: true"]
        config += ["http:", f"  addr: {self.host}"]
        self.ca = ""
        if tls:
            key, cert = self_signed(self.dir, "registry", ip="127.0.0.1")
            self.ca = Path(cert).read_text()
            config += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if auth and auth[0] == "basic":
            user, password = auth[1]
            hashed = subprocess.run(
                ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
            ).stdout.strip()
            Path(self.dir, "htpasswd").write_text(hashed + "\n")
            config += ["auth:", "  htpasswd:", "    realm: berth-test"]
            config += [f"    path: {self.dir}/htpasswd"]
        elif auth and auth[0] == "token" and self.tokens is not None:
            config += ["auth:", "  token:", f"    realm: {self.tokens.realm}"]
            config += [f"    service: {SERVICE}", f"    issuer: {ISSUER}"]
            config += [f"    rootcertbundle: {self.tokens.cert}"]
        elif auth:
            raise ValueError(f"unknown auth {auth[0]!r}")
        Path(self.dir, "config.yml").write_text("\n".join(config) + "\n")
        with open(Path(self.dir, "registry.log"), "wb") as log:
            self.proc = subprocess.Popen(
                ["docker-registry", "serve", f"{self.dir}/config.yml"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("docker-registry exited: " + self.log())
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(up, what="the registry to listen")

    def log(self) -> str:
        try:
            return Path(self.dir, "registry.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc is not None:
                kill(self.proc.pid, 15)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            try:
                if self.tokens is not None:
                    self.tokens.close()
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)


class Relay:
    """A loopback TCP relay in front of the registry, to disturb downloads at exact points.

    stall_after: once one connection has carried that many of the registry's bytes, hold
    the rest back until `release()`: a download stands still mid-blob for as long as the
    test needs, with no timing involved. cut_once_after: the first connection to carry
    that many is reset (RST) right there, as a network failure would."""

    def __init__(
        self, target_port: int, *, stall_after: int | None = None, cut_once_after: int | None = None
    ) -> None:
        self._target = ("127.0.0.1", target_port)
        self._stall_after = stall_after if stall_after is not None else 1 << 62
        self._cut_after = cut_once_after
        self.cuts = 0
        self._released = threading.Event()
        self._closing = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.host = f"127.0.0.1:{self.port}"
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def release(self) -> None:
        self._released.set()

    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._sockets.append(sock)
        return sock

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = self._track(socket.create_connection(self._target))
            except OSError:
                client.close()
                continue
            self._track(client)
            for source, sink, downstream in ((client, upstream, False), (upstream, client, True)):
                thread = threading.Thread(
                    target=self._pump, args=(source, sink, downstream), daemon=True
                )
                with self._lock:
                    self._threads.append(thread)
                thread.start()

    def _pump(self, source: socket.socket, sink: socket.socket, downstream: bool) -> None:
        """Copy one direction; `downstream` (registry -> client) is the one disturbed."""
        carried = 0
        try:
            while True:
                limit = 1 << 16
                if downstream and not self._released.is_set():
                    if carried >= self._stall_after:
                        self._released.wait()
                        if self._closing:
                            return
                        continue
                    limit = min(limit, self._stall_after - carried)
                if downstream and self._cut_after is not None and not self.cuts:
                    if carried >= self._cut_after:
                        self.cuts += 1
                        self._reset(source, sink)
                        return
                    limit = min(limit, self._cut_after - carried)
                data = source.recv(limit)
                if not data:
                    break
                sink.sendall(data)
                carried += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _reset(*sockets: socket.socket) -> None:
        """Abort both ends. Kernel fact: close() does not end a recv() another thread is
        blocked in, and the socket lives on until that returns, so nothing would be sent;
        shutdown(SHUT_RD) wakes that thread first, then close() with linger 0 sends RST."""
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)
        for sock in sockets:
            sock.close()

    def close(self) -> None:
        self._closing = True
        self._released.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() (Linux)
        self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in threads:
            thread.join(10)


class StaticRegistry:
    """A registry of fixed documents, for what distribution 2.8 no longer serves (schema 1
    manifests: it refuses their push). GET and HEAD of /v2/<name>/manifests/<ref> (as given:
    bytes and Content-Type, None for no header) and /v2/<name>/blobs/<digest>; it records
    the paths asked for."""

    def __init__(
        self, manifests: dict[str, tuple[bytes, str | None]], blobs: dict[str, bytes]
    ) -> None:
        self.manifests = manifests  # "<name>/<ref>" -> (document, content type)
        self.blobs = blobs  # digest -> bytes
        self.requests: list[str] = []
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                registry._serve(self, body=True)

            def do_HEAD(self) -> None:
                registry._serve(self, body=False)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _serve(self, request: BaseHTTPRequestHandler, *, body: bool) -> None:
        path = urllib.parse.urlsplit(request.path).path
        self.requests.append(f"{request.command} {path}")
        data: bytes | None = None
        content_type: str | None = "application/octet-stream"
        if path == "/v2/":
            data, content_type = b"{}", "application/json"
        elif "/manifests/" in path:
            name, _, ref = path[len("/v2/") :].partition("/manifests/")
            data, content_type = self.manifests.get(f"{name}/{ref}", (None, None))
        elif "/blobs/" in path:
            data = self.blobs.get(path.rsplit("/", 1)[-1])
        if data is None:
            request.send_response(404)
            request.send_header("Content-Length", "0")
            request.end_headers()
            return
        request.send_response(200)
        if content_type is not None:
            request.send_header("Content-Type", content_type)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)
