"""``layerstream serve --step-log FILE``: one JSON line per engine step (one pass over the layers), for
reading a load test afterwards: when each pass ran, how long it took, how many sequences it carried,
how many tokens it fed (prompt slices and decode rows together) and how many sequences still waited;
``mono_s``, its end on ``time.monotonic()``, matches a load test's request times (tools/ttft_breakdown.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from engine.serving.scheduler import StepStats


class StepLog:
    """Appends a line per step to ``path`` (opened now: a bad path fails before the model loads)."""

    def __init__(self, path: str | Path) -> None:
        try:  # line-buffered: a killed server keeps the lines of its steps
            self._file = open(path, "a", buffering=1, encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--step-log {path}: cannot open it for writing ({e.strerror}); give a writable path") \
                from None
        self._t0 = time.monotonic()

    def __call__(self, st: StepStats) -> None:
        end = time.monotonic() - self._t0
        self._file.write(json.dumps({"step": st.steps, "start_s": round(end - st.last_step_s, 6),
                                     "mono_s": round(self._t0 + end, 6),  # time.monotonic() at its end
                                     "step_s": round(st.last_step_s, 6), "batch": st.last_batch,
                                     "tokens": st.last_tokens, "waiting": st.last_waiting,
                                     "generated_total": st.generated_tokens}) + "\n")

    def close(self) -> None:
        self._file.close()
