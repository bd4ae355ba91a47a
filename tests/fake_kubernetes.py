"""A small fake of the Kubernetes API on 127.0.0.1: what the TFJob launcher calls.

    with fake_kubernetes(token="t") as api:          # api.url, api.jobs, api.requests
        api.script = [[created], [created, running], [..., succeeded]]
        ...

Routes: TFJobs (kubeflow.org/v1) create (201; 409 AlreadyExists), get (200; 404), delete
(200; 404), and one PersistentVolumeClaim read. Each GET of a job applies the next step of
`script` (a list of condition lists) to its status, as the training operator would between two
polls; `on_step(index, job)` may act on the side (write the chief's outputs). Requests without
the bearer token get 401. `fail_create` makes the next create answer that HTTP status,
`unavailable_gets` the next job reads 503.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TFJOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/tfjobs(?:/([^/?]+))?$")
PVC = re.compile(r"^/api/v1/namespaces/([^/]+)/persistentvolumeclaims/([^/?]+)$")


def condition(kind: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}


@dataclass
class FakeKubernetes:
    token: str
    namespace: str = "mask-rcnn"
    url: str = ""
    jobs: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    script: list[list[dict]] = field(default_factory=list)
    steps: dict[str, int] = field(default_factory=dict)
    on_step: Callable[[int, dict], None] | None = None
    claims: dict[str, list[str]] = field(default_factory=dict)
    fail_create: int = 0
    unavailable_gets: int = 0  # the next GETs of a TFJob answer 503
    lock: threading.Lock = field(default_factory=threading.Lock)

    def advance(self, name: str) -> dict:
        job = self.jobs[name]
        step = self.steps.get(name, 0)
        if step < len(self.script):
            job["status"] = {"conditions": self.script[step]}
            if self.on_step is not None:
                self.on_step(step, job)
            self.steps[name] = step + 1
        return job


def _handler(api: FakeKubernetes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def status(self, code: int, reason: str, message: str) -> None:
            self.reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "reason": reason, "message": message, "code": code})

        def handle_any(self, method: str) -> None:
            path = self.path.split("?")[0]
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            with api.lock:
                api.requests.append((method, path))
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    return self.status(401, "Unauthorized", "no or wrong bearer token")
                if match := PVC.match(path):
                    namespace, name = match.groups()
                    if method != "GET" or name not in api.claims or namespace != api.namespace:
                        return self.status(404, "NotFound", f"pvc {name} not found")
                    return self.reply(200, {
                        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                        "metadata": {"name": name, "namespace": namespace},
                        "spec": {"accessModes": api.claims[name]}})
                match = TFJOBS.match(path)
                if not match or match.group(1) != api.namespace:
                    return self.status(404, "NotFound", f"no route {method} {path}")
                name = match.group(2)
                if method == "POST" and name is None:
                    if api.fail_create:
                        code, api.fail_create = api.fail_create, 0
                        return self.status(code, "Forbidden", "tfjobs is forbidden: User "
                                           "cannot create resource tfjobs")
                    name = body["metadata"]["name"]
                    if name in api.jobs:
                        return self.status(409, "AlreadyExists", f"tfjobs {name} exists")
                    api.created.append(body)
                    api.jobs[name] = json.loads(json.dumps(body))
                    api.steps[name] = 0
                    return self.reply(201, api.jobs[name])
                if name is None or name not in api.jobs:
                    return self.status(404, "NotFound", f'tfjobs.kubeflow.org "{name}" not '
                                       "found")
                if method == "GET" and api.unavailable_gets:
                    api.unavailable_gets -= 1
                    return self.status(503, "ServiceUnavailable", "etcd leader changed")
                if method == "GET":
                    return self.reply(200, api.advance(name))
                if method == "DELETE":
                    del api.jobs[name]
                    return self.reply(200, {"kind": "Status", "status": "Success"})
                return self.status(405, "MethodNotAllowed", method)

        def do_GET(self):  # noqa: N802 - http.server's names
            self.handle_any("GET")

        def do_POST(self):  # noqa: N802
            self.handle_any("POST")

        def do_DELETE(self):  # noqa: N802
            self.handle_any("DELETE")

    return Handler


@contextlib.contextmanager
def fake_kubernetes(token: str = "test-token") -> Iterator[FakeKubernetes]:
    api = FakeKubernetes(token=token)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(api))
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
