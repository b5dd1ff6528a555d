"""Prometheus metrics of the server: requests, tokens, queue, batch, step time, KV use, streamed bytes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.serving.loop import EngineLoop
from engine.serving.scheduler import StepStats

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """One registry per server (tests start several servers in one process)."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.registry = CollectorRegistry()
        self.requests = Counter("layerstream_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.step_seconds = Histogram("layerstream_step_seconds", "Wall time of one engine step (one pass)",
                                      buckets=_STEP_BUCKETS, registry=self.registry)
        self.ttft = Histogram("layerstream_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_STEP_BUCKETS + (30.0, 60.0), registry=self.registry)
        self.registry.register(_EngineCollector(loop))

    def on_step(self, stats: StepStats) -> None:
        """Called on the engine thread after every step."""
        self.step_seconds.observe(stats.last_step_s)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Reads the scheduler's counters at scrape time."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop

    def describe(self):
        return []

    def collect(self):
        sched, eng = self.loop.scheduler, self.loop.engine
        st = sched.stats if sched is not None else StepStats()
        running = list(sched.running) if sched is not None else []
        slots = eng.opts.batch if eng is not None else 0
        streamed = eng.plan.streamed_bytes_per_step if eng is not None else 0
        yield CounterMetricFamily("layerstream_prompt_tokens", "Prompt tokens admitted", value=st.prompt_tokens)
        yield CounterMetricFamily("layerstream_generation_tokens", "Tokens generated", value=st.generated_tokens)
        yield CounterMetricFamily("layerstream_steps", "Engine steps (forward passes)", value=st.steps)
        yield CounterMetricFamily("layerstream_streamed_bytes", "Weight bytes streamed to the GPU: the plan's "
                                  "non-resident bytes per pass times the passes run", value=st.steps * streamed)
        yield GaugeMetricFamily("layerstream_requests_waiting", "Sequences waiting for a KV slot",
                                value=len(sched.waiting) if sched is not None else 0)
        yield GaugeMetricFamily("layerstream_requests_running", "Sequences in the running batch", value=len(running))
        yield GaugeMetricFamily("layerstream_batch_size", "Sequences in the last step", value=st.last_batch)
        yield GaugeMetricFamily("layerstream_step_tokens", "Tokens fed in the last step", value=st.last_tokens)
        yield GaugeMetricFamily("layerstream_kv_slots_total", "KV-cache slots (sequences at once)", value=slots)
        yield GaugeMetricFamily("layerstream_kv_slots_in_use", "KV-cache slots held by sequences", value=len(running))
        yield GaugeMetricFamily("layerstream_kv_tokens_in_use", "Token positions held in the KV cache",
                                value=sum(s.num_computed for s in running))
        blocks = sched.blocks if sched is not None else None
        yield GaugeMetricFamily("layerstream_kv_blocks_total", "Paged KV blocks (0: slot cache)",
                                value=blocks.alloc.num_blocks if blocks else 0)
        yield GaugeMetricFamily("layerstream_kv_blocks_in_use", "Paged KV blocks held by running sequences",
                                value=blocks.alloc.in_use if blocks else 0)
        yield GaugeMetricFamily("layerstream_kv_blocks_cached", "Unused blocks kept for prefix reuse",
                                value=len(blocks.alloc.lru) if blocks else 0)
        yield CounterMetricFamily("layerstream_prefix_cache_hit_tokens", "Prompt tokens served from cached blocks",
                                  value=st.cached_prompt_tokens)
        yield GaugeMetricFamily("layerstream_model_ready", "1 once the model is loaded",
                                value=float(self.loop.ready.is_set() and self.loop.error is None))
