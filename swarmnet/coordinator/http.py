"""The coordinator's HTTP endpoint: status page, JSON view, Prometheus metrics and service discovery.

| path | content |
|---|---|
| `/` | the HTML status page (self-contained, refreshes itself) |
| `/api/swarm` | the latest swarm view, its loss history and recent events as JSON |
| `/sd` | Prometheus HTTP service discovery: every live peer's and trainer's metrics address |
| `/metrics` | the coordinator's own metrics and the `swarmnet_swarm_*` view |
| `/bootstrap` | the coordinator's multiaddrs and peer id (`--initial-peers http://host:8470` reads them) |
| `/healthz` | `ok` while the coordinator runs |

A standard-library threading HTTP server in daemon threads: handlers only read the immutable
latest view from `SwarmHistory`, so they never touch the event loop.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from swarmnet.coordinator.render import render_html
from swarmnet.coordinator.view import SwarmHistory, finite_or_none, sd_targets
from swarmnet.errors import ConfigError

logger = logging.getLogger(__name__)


class StatusServer:
    def __init__(self, history: SwarmHistory, host: str, port: int, *, refresh: int = 5):
        self.history = history
        self.refresh = refresh
        self.bootstrap: dict | None = None
        """`{"run_id", "peer_id", "maddrs"}` once the DHT node is up."""
        handler = type("Handler", (_Handler,), {"status": self})
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as e:
            raise ConfigError(f"cannot serve the status page on {host}:{port}: {e}") from e
        self.httpd.daemon_threads = True
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="status-http", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "StatusServer":
        self._thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    status: StatusServer
    server_version = "swarmnet"

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            if path in ("/", "/status"):
                view, points, events = self.status.history.snapshot()
                self._send(200, "text/html; charset=utf-8", render_html(view, points, events, refresh=self.status.refresh))
            elif path == "/api/swarm":
                view, points, events = self.status.history.snapshot()
                body = {
                    "view": view.to_json() if view else None,
                    "loss": [{"at": p.at, "trainer": p.trainer, "step": p.step, "loss": finite_or_none(p.loss)} for p in points],
                    "events": [{"at": e.at, "kind": e.kind, "failure": e.failure, "message": e.message} for e in events],
                }
                self._send(200, "application/json", json.dumps(body))
            elif path == "/sd":
                view, _, _ = self.status.history.snapshot()
                self._send(200, "application/json", json.dumps(sd_targets(view)))
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path == "/bootstrap":
                if self.status.bootstrap is None:
                    self._send(503, "text/plain; charset=utf-8", "the coordinator is starting\n")
                else:
                    self._send(200, "application/json", json.dumps(self._bootstrap()))
            elif path == "/healthz":
                self._send(200, "text/plain; charset=utf-8", "ok\n")
            else:
                self._send(404, "text/plain; charset=utf-8", f"no such page: {path}\n")
        except (ConnectionError, TimeoutError):
            pass  # the client went away
        except Exception:  # one bad request never stops the server
            logger.exception("internal error serving %s", self.path)
            self._send(500, "text/plain; charset=utf-8", "internal error\n")

    def _bootstrap(self) -> dict:
        """The coordinator's addresses; loopback ones only for a client on this machine."""
        answer = dict(self.status.bootstrap or {})
        if not self.client_address[0].startswith(("127.", "::1")):
            remote = [m for m in answer.get("maddrs", []) if not m.startswith(("/ip4/127.", "/ip6/::1/"))]
            answer["maddrs"] = remote or answer.get("maddrs", [])
        return answer

    def do_HEAD(self) -> None:  # noqa: N802
        self.send_response(200 if urlsplit(self.path).path in ("/", "/healthz") else 404)
        self.end_headers()

    def _send(self, code: int, content_type: str, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the http.server API
        logger.debug("http %s - %s", self.address_string(), format % args)

