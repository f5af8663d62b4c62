"""The coordinator's HTTP endpoint on a real socket: every route, and bad requests that change nothing."""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request

import pytest

from swarmnet.config import RunManifest
from swarmnet.coordinator.http import StatusServer
from swarmnet.coordinator.view import SwarmHistory, build_view
from swarmnet.errors import ConfigError

from ..unit.test_swarm_view import server, trainer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def status():
    history = SwarmHistory()
    history.update(build_view(RunManifest(name="http"), stages=[[server("a", 0, 3.0)], []], trainers=[trainer("t", 2, 1.5)]))
    running = StatusServer(history, "127.0.0.1", 0).start()
    try:
        yield running
    finally:
        running.close()


def fetch(status: StatusServer, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"http://{status.address}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_routes(status):
    code, kind, body = fetch(status, "/")
    assert code == 200 and kind.startswith("text/html") and b'id="stages"' in body
    code, kind, body = fetch(status, "/api/swarm?x=1")
    swarm = json.loads(body)
    assert swarm["view"]["bottleneck"] == 1 and [p["step"] for p in swarm["loss"]] == [2]
    assert [e["kind"] for e in swarm["events"]] == ["peer_joined", "trainer_joined"]
    code, kind, body = fetch(status, "/sd")
    assert [g["targets"] for g in json.loads(body)] == [["127.0.0.1:9001"], ["127.0.0.1:9500"]]
    code, kind, body = fetch(status, "/metrics")
    assert code == 200 and kind.startswith("text/plain") and b"python_gc" in body
    assert fetch(status, "/healthz")[2] == b"ok\n"
    assert fetch(status, "/bootstrap")[0] == 503  # the DHT node is not up yet
    status.bootstrap = {"run_id": "r", "peer_id": "p", "maddrs": ["/ip4/127.0.0.1/tcp/1/p2p/p", "/ip4/10.0.0.2/tcp/1/p2p/p"]}
    assert json.loads(fetch(status, "/bootstrap")[2])["maddrs"][0] == "/ip4/127.0.0.1/tcp/1/p2p/p"  # a local client


def test_bad_requests_get_an_error_and_the_server_keeps_serving(status):
    assert fetch(status, "/nope")[0] == 404
    assert fetch(status, "/sd", method="POST")[0] == 501
    host, port = status.address.split(":")
    for garbage in (b"\x00\xff garbage\r\n\r\n", b"GET " + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(garbage)
            reply = raw.recv(200)
        # An HTTP 4xx/5xx status line, or (for a line that is not HTTP/1.x at all) a bare error page.
        assert re.match(rb"HTTP/1\.[01] [45]\d\d ", reply) or reply.startswith(b"<!DOCTYPE HTML>"), reply
    assert fetch(status, "/healthz")[0] == 200
    with pytest.raises(ConfigError, match="cannot serve the status page"):
        StatusServer(SwarmHistory(), "127.0.0.1", int(port))  # the port is taken
