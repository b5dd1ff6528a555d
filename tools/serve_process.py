"""Start ``python -m engine.serve`` on a free localhost port and wait until ``/health`` says ready
(tools/bench_serve.py and tools/chat_page_check.py)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # engine is importable from here


def start_server(flags: list[str], timeout: float | None = None, env: dict[str, str] | None = None,
                 keep_stderr: bool = False, log: Path | None = None) -> tuple[subprocess.Popen, str]:
    """(process, base URL) of a server started with ``flags`` once it is ready. ``keep_stderr`` pipes the
    server's stderr into the error raised when it exits early; ``log`` appends it to that file (for a
    server that runs on: a pipe nobody reads would stall it); else it is discarded. ``timeout``
    seconds (None: no limit while the process lives) before it is killed and TimeoutError raised."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert not (keep_stderr and log), "one place for the server's stderr"
    err = subprocess.PIPE if keep_stderr else open(log, "a") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "engine.serve", "--port", str(port), *flags],
                            env={**os.environ, "PYTHONPATH": _pythonpath(), **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=err, text=True)
    if log:
        err.close()  # the child holds its own descriptor
    url = f"http://127.0.0.1:{port}"
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        if proc.poll() is not None:
            why = proc.stderr.read() if keep_stderr else f"see {log}" if log else "run it by hand to see why"
            raise RuntimeError(f"the server exited with {proc.returncode}: {why}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s")


def _pythonpath() -> str:
    """The repository first, then what PYTHONPATH named already (e.g. bench/oomsite's diagnostic hook)."""
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys([str(ROOT), *given]))
