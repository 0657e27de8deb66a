"""``GET /metrics`` of ``gptoss serve``, in Prometheus's text exposition format (version 0.0.4).

What a deployment watches: requests by route and status, the queue and the engine's one slot,
prompt, cached and generated tokens, and the latencies the clients feel (time to first token
from the moment the request was accepted, the gap between tokens, the whole request) as
histograms. Names follow vLLM's where there is one (``gptoss:`` instead of ``vllm:``).

The engine thread records tokens and latencies, the event loop records requests and reads
everything: one lock, held for a few additions. Written out by hand: the format is a few lines
per metric, not worth a dependency.
"""

from __future__ import annotations

import bisect
import threading

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Histogram:
    """Cumulative buckets with upper bounds ``bounds`` (+Inf implied), sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            running += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{braces} {self.sum!r}", f"{name}_count{braces} {running}"]


class Metrics:
    """The server's counters and histograms (thread-safe)."""

    def __init__(self, model: str):
        self.model = model
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}     # (route, status) -> count
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    def prompt(self, tokens: int, cached: int) -> None:
        with self._lock:
            self.prompt_tokens += tokens
            self.cached_tokens += cached

    def token(self, first_after: float | None, gap: float | None) -> None:
        """One generated token: ``first_after`` seconds since its request was accepted if it is
        the request's first, else ``gap`` seconds since the one before."""
        with self._lock:
            self.generation_tokens += 1
            if first_after is not None:
                self.ttft.observe(first_after)
            if gap is not None:
                self.itl.observe(gap)

    def finished(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def render(self, queued: int, running: int) -> str:
        m = f'model_name="{_escape(self.model)}"'
        with self._lock:
            lines = [
                "# HELP gptoss:requests_total HTTP requests answered, by route and status.",
                "# TYPE gptoss:requests_total counter",
                *(f'gptoss:requests_total{{{m},route="{_escape(r)}",status="{s}"}} {n}'
                  for (r, s), n in sorted(self.requests.items())),
                "# HELP gptoss:num_requests_waiting Requests in the queue.",
                "# TYPE gptoss:num_requests_waiting gauge",
                f"gptoss:num_requests_waiting{{{m}}} {queued}",
                "# HELP gptoss:num_requests_running Requests the engine is generating for (it has one slot).",
                "# TYPE gptoss:num_requests_running gauge",
                f"gptoss:num_requests_running{{{m}}} {running}",
                "# HELP gptoss:slots Requests the engine can generate for at once.",
                "# TYPE gptoss:slots gauge",
                f"gptoss:slots{{{m}}} 1",
                "# HELP gptoss:prompt_tokens_total Prompt tokens of generation requests.",
                "# TYPE gptoss:prompt_tokens_total counter",
                f"gptoss:prompt_tokens_total{{{m}}} {self.prompt_tokens}",
                "# HELP gptoss:prompt_tokens_cached_total Prompt tokens whose KV came from the cache.",
                "# TYPE gptoss:prompt_tokens_cached_total counter",
                f"gptoss:prompt_tokens_cached_total{{{m}}} {self.cached_tokens}",
                "# HELP gptoss:generation_tokens_total Generated tokens.",
                "# TYPE gptoss:generation_tokens_total counter",
                f"gptoss:generation_tokens_total{{{m}}} {self.generation_tokens}",
                "# HELP gptoss:time_to_first_token_seconds From accepting a request to its first token.",
                "# TYPE gptoss:time_to_first_token_seconds histogram",
                *self.ttft.lines("gptoss:time_to_first_token_seconds", m),
                "# HELP gptoss:inter_token_latency_seconds Between consecutive tokens of a reply.",
                "# TYPE gptoss:inter_token_latency_seconds histogram",
                *self.itl.lines("gptoss:inter_token_latency_seconds", m),
                "# HELP gptoss:e2e_request_latency_seconds From accepting a request to its last token.",
                "# TYPE gptoss:e2e_request_latency_seconds histogram",
                *self.e2e.lines("gptoss:e2e_request_latency_seconds", m),
            ]
        return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
