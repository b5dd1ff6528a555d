"""A live ``python -m engine.serve`` subprocess on 127.0.0.1 for the server tests."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lower(headers) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def get(url: str, headers: dict | None = None) -> tuple[int, str, dict]:
    """(status, body, headers) of a GET, errors included."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode(), _lower(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), _lower(e.headers)


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a POST, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), _lower(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), _lower(e.headers)


def open_stream(url: str, body: dict, headers: dict | None = None):
    """An open streaming POST response (iterate its lines; closing it disconnects)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    return urllib.request.urlopen(req, timeout=60)


@contextlib.contextmanager
def app_server(loop, name: str = "m", **app_options):
    """``loop``'s (an ``engine.serving.loop.EngineLoop``) app served by uvicorn in a thread of this process
    on 127.0.0.1: yields its URL once it listens; on exit stops the server, then the loop."""
    import uvicorn

    from engine.serving.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(loop, name, **app_options), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the in-process server did not start within 30 s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        loop.close()


class Server:
    """Starts the server, waits for /health to say ready; ``stop`` sends SIGTERM and returns the exit code."""

    def __init__(self, model_dir: Path, *flags: str, ready_timeout: float = 120.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # 2 shared cores: no spinning
        cmd = [sys.executable, "-m", "engine.serve", "--model", str(model_dir), "--device", "cpu",
               "--port", str(self.port), *flags]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if get(self.url + "/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.proc.kill()
        raise RuntimeError("server did not become ready")

    def metric(self, name: str) -> float:
        """The value of an unlabelled sample in /metrics."""
        for line in get(self.url + "/metrics")[1].splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM; (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err
