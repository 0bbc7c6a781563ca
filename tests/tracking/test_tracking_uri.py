"""A tracking URI that cannot work is refused up front, in one line and within seconds."""
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from recbench.tracking.mlflow_tracker import StoreError, check_tracking_uri


class _Server:
    def __init__(self, health_status: int):
        status = health_status

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the http.server API)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_sqlite_uris(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")  # an existing folder: a new store may be made there
    with pytest.raises(StoreError, match="is not a SQLite URI MLflow reads; allowed: sqlite:///relative"):
        check_tracking_uri("sqlite:relative.db")
    with pytest.raises(StoreError, match=f"the folder {tmp_path}/missing of the MLflow store .* does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/missing/mlflow.db")


def test_servers():
    good, auth, other = _Server(200), _Server(401), _Server(404)
    try:
        check_tracking_uri(good.uri)
        check_tracking_uri(auth.uri)  # an authentication wall answers: a server is there
        with pytest.raises(StoreError, match="answered but is not an MLflow tracking server"):
            check_tracking_uri(other.uri)
    finally:
        for server in (good, auth, other):
            server.close()
    start = time.perf_counter()
    with pytest.raises(StoreError, match=r"http://127.0.0.1:9 does not answer \(.*refused"):
        check_tracking_uri("http://127.0.0.1:9")
    assert time.perf_counter() - start < 6


def test_the_command_refuses_a_bad_store_before_importing_torch(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/nosuch/mlflow.db"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "recbench.cli.train", "method=full"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "does not exist" in out.stderr and not (tmp_path / "nosuch").exists()
    assert time.perf_counter() - start < 30
