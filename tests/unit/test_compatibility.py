"""The supported Kubernetes window: the operator refuses an apiserver older than 1.30, by its own
``/version``, before it watches anything (the real 1.37 apiserver is accepted by every
integration test)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from dmr_operator.reconcile import compatibility


@pytest.mark.parametrize(
    ("info", "problem"),
    [
        ({"major": "1", "minor": "37", "gitVersion": "v1.37.2"}, False),
        ({"major": "1", "minor": "30", "gitVersion": "v1.30.0"}, False),
        ({"major": "1", "minor": "29+", "gitVersion": "v1.29.8-eks-a737599"}, True),
        ({"gitVersion": "v1.20.2"}, True),
        ({"major": "2", "minor": "0"}, False),
        ({}, True),
    ],
)
def test_versions(info: dict[str, str], problem: bool) -> None:
    assert (compatibility.version_problem(info) is not None) == problem


class _OldApiserver(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"major": "1", "minor": "29", "gitVersion": "v1.29.4"}'
        self.send_response(200 if self.path == "/version" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def old_apiserver() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _OldApiserver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_operator_refuses_to_start_on_an_old_apiserver(
    old_apiserver: str, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "old", "cluster": {"server": old_apiserver}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "old", "context": {"cluster": "old", "user": "u"}}],
                "current-context": "old",
            }
        )
    )
    finished = subprocess.run(
        [sys.executable, "-m", "dmr_operator", "run", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 1, finished.stderr[-2000:]
    output = finished.stdout + finished.stderr
    assert "refusing to start: Kubernetes 1.29 (v1.29.4) is older than 1.30" in output
