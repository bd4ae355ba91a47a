"""Real servers on 127.0.0.1 for tests: a GCS emulator, a scripted HTTP server and MLflow.

Each is a context manager that picks a free port, runs in a background thread (MLflow: a
subprocess), and stops on exit, so storage, fetch-weights, data, pipeline and deployment tests
can share them:

    with gcs_emulator() as gcs:             # then STORAGE_EMULATOR_HOST=gcs.url
        gcs.client().create_bucket("b")
    with http_server() as http:
        http.add("/w.h5", b"...", fail_with=[503, 503])
        storage.download(http.url("/w.h5"), dest)
        assert http.count("/w.h5") == 3
    with mlflow_server(tmp_path / "mlflow") as url:   # then MLFLOW_TRACKING_URI=url
        ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from gcp_storage_emulator.server import create_server

# === GCS emulator ===


@dataclass
class GcsEmulator:
    """A running in-memory gcp-storage-emulator; `url` is the STORAGE_EMULATOR_HOST value."""

    url: str
    server: Any

    def client(self, project: str = "test") -> Any:
        """A google-cloud-storage client talking to this emulator, for test setup."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        options = {"api_endpoint": self.url}
        return storage.Client(
            project=project, credentials=AnonymousCredentials(), client_options=options
        )

    def wipe(self) -> None:
        """Delete every bucket and object."""
        self.server.wipe()


@contextlib.contextmanager
def gcs_emulator() -> Iterator[GcsEmulator]:
    """Start gcp-storage-emulator in this process on a free port of 127.0.0.1."""
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    try:
        # Port 0 lets the OS choose; the emulator has no public accessor for the bound port.
        host, port = server._api._httpd.server_address
        yield GcsEmulator(url=f"http://{host}:{port}", server=server)
    finally:
        server.stop()


@dataclass
class CuttingProxy:
    """A TCP proxy in front of a server; `url` replaces the server's. It counts the bytes the
    server sends through it, and drops the first connection once that connection has carried
    `cut_after` bytes towards the client (a link lost mid-download). The server's own address
    in what it sends (the emulator's mediaLink) is rewritten to the proxy's, so links lead
    back through the proxy."""

    url: str
    served: int = 0
    cuts: int = 0


@contextlib.contextmanager
def cutting_proxy(upstream_url: str, cut_after: int) -> Iterator[CuttingProxy]:
    upstream = upstream_url.removeprefix("http://")
    host, port = upstream.rsplit(":", 1)
    while True:  # a port of the same width: rewriting the address keeps every length
        listener = socket.create_server(("127.0.0.1", 0))
        if len(str(listener.getsockname()[1])) == len(port):
            break
        listener.close()
    proxy = CuttingProxy(url=f"http://127.0.0.1:{listener.getsockname()[1]}")
    rewrite = (upstream.encode(), proxy.url.removeprefix("http://").encode())
    lock = threading.Lock()

    def pump(source: socket.socket, sink: socket.socket, to_client: bool) -> None:
        carried = 0
        try:
            while data := source.recv(65536):
                if to_client:
                    data = data.replace(*rewrite)
                with lock:
                    if to_client and proxy.cuts == 0 and carried + len(data) > cut_after:
                        data = data[: cut_after - carried]
                        proxy.cuts += 1
                        cut = True
                    else:
                        cut = False
                    if to_client:
                        proxy.served += len(data)
                sink.sendall(data)
                carried += len(data)
                if cut:
                    break
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection((host, int(port)))
            for args in ((client, server, False), (server, client, True)):
                threading.Thread(target=pump, args=args, daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield proxy
    finally:
        listener.close()


# === Scripted HTTP server ===


@dataclass
class Route:
    """What the server answers on one path: first one response per status in `fail_with`,
    then `body` with status 200, claiming `content_length` bytes if set (to cut a body short),
    plus `headers`."""

    body: bytes
    fail_with: list[int] = field(default_factory=list)
    content_length: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


class HttpServer:
    """A threaded HTTP/1.0 server on 127.0.0.1 serving scripted `Route`s; it records the path
    of every request it receives, in order, in `requests`. Unknown paths answer 404."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def add(self, path: str, body: bytes, **route: Any) -> str:
        """Serve `body` at `path` (see `Route` for the options); returns its URL."""
        self.routes[path] = Route(body=body, **route)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{path}"

    def count(self, path: str) -> int:
        """How many requests reached `path` so far."""
        with self._lock:
            return self.requests.count(path)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append(handler.path)
            route = self.routes.get(handler.path)
            failure = route.fail_with.pop(0) if route and route.fail_with else None
        if route is None or failure is not None:
            status = failure or 404
            handler.send_response(status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(route.content_length or len(route.body)))
        for name, value in route.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(route.body)  # HTTP/1.0: the connection closes after the body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server dispatches to
                server._answer(self)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


@contextlib.contextmanager
def http_server() -> Iterator[HttpServer]:
    """Start an `HttpServer` on a free port of 127.0.0.1; shut it down on exit."""
    server = HttpServer()
    server._thread.start()
    try:
        yield server
    finally:
        server._httpd.shutdown()
        server._httpd.server_close()
        server._thread.join(timeout=5)


# === MLflow tracking server ===


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(root: Path, *, app_name: str | None = None,
                  env: Mapping[str, str] | None = None) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite store and proxied artifacts under `root`;
    yields its URL and stops it on exit. `app_name`: `--app-name` (e.g. "basic-auth");
    `env`: added to the server's environment (e.g. MLFLOW_AUTH_CONFIG_PATH)."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("mlflow")), "server",
               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--default-artifact-root", "mlflow-artifacts:/",
               "--artifacts-destination", str(root / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    if app_name:
        command += ["--app-name", app_name]
    # /health is never behind auth
    with _server_process(command, port, "/health", root / "server.log", env) as url:
        yield url


@contextlib.contextmanager
def mlflow_model_server(model_uri: str, tracking_uri: str, root: Path) -> Iterator[str]:
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1; yields its URL."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {"MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager",
               "local", "--host", "127.0.0.1", "--port", str(port)]
    with _server_process(command, port, "/ping", root / "serve.log", env,
                         start_seconds=180) as url:
        yield url


@contextlib.contextmanager
def _server_process(command: list[str], port: int, health: str, log_path: Path,
                    env: Mapping[str, str] | None = None,
                    start_seconds: float = 120) -> Iterator[str]:
    """Runs `command` (a server on 127.0.0.1:`port`) in a session of its own, waits until
    GET `health` answers, yields its URL; on exit stops it and its children (uvicorn workers)
    at once: uvicorn's graceful shutdown takes over ten seconds, a test server needs none."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})}, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_seconds
        while True:
            try:
                urllib.request.urlopen(f"{url}{health}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command[1:3])} did not start:\n" +
                                       log_path.read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: it failed to start
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
