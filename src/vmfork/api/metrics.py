"""Prometheus text exposition: instances by state, and latency histograms of the operations."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
GAUGES = {
    "exec_streams": "WebSocket execs open (their server task runs).",
    "exec_stdin_full": "WebSocket execs whose stdin window is full (the server reads nothing from them).",
}
OPERATIONS = ("run", "start", "stop", "rm", "fork", "standby", "restore", "exec", "snapshot", "pull")


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, v: float) -> None:
        for i, b in enumerate(BUCKETS):
            if v <= b:
                self.counts[i] += 1
        self.total += 1
        self.sum += v


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latency: dict[tuple[str, str], Histogram] = {}  # (operation, outcome)
        self.requests: dict[tuple[str, int], int] = {}  # (method, status)
        self.gauges = dict.fromkeys(GAUGES, 0)

    @contextmanager
    def counted(self, gauge: str) -> Iterator[None]:
        """``gauge`` is one more for the duration of the block."""
        with self._lock:
            self.gauges[gauge] += 1
        try:
            yield
        finally:
            with self._lock:
                self.gauges[gauge] -= 1

    @contextmanager
    def timed(self, op: str) -> Iterator[None]:
        t0 = time.monotonic()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.observe(op, outcome, time.monotonic() - t0)

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self.latency.setdefault((op, outcome), Histogram()).observe(seconds)

    def count_request(self, method: str, status: int) -> None:
        with self._lock:
            key = (method, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, states: dict[str, int]) -> str:
        out = ["# HELP vmfork_instances Instances by state.", "# TYPE vmfork_instances gauge"]
        out += [f'vmfork_instances{{state="{s}"}} {n}' for s, n in sorted(states.items())]
        out += ["# HELP vmfork_operation_seconds Latency of API operations.",
                "# TYPE vmfork_operation_seconds histogram"]
        with self._lock:
            for (op, outcome), h in sorted(self.latency.items()):
                labels = f'operation="{op}",outcome="{outcome}"'
                out += [f'vmfork_operation_seconds_bucket{{{labels},le="{b}"}} {c}' for b, c in zip(BUCKETS, h.counts, strict=True)]
                out.append(f'vmfork_operation_seconds_bucket{{{labels},le="+Inf"}} {h.total}')
                out.append(f"vmfork_operation_seconds_sum{{{labels}}} {h.sum:.6f}")
                out.append(f"vmfork_operation_seconds_count{{{labels}}} {h.total}")
            for name, text in GAUGES.items():
                out += [f"# HELP vmfork_{name} {text}", f"# TYPE vmfork_{name} gauge",
                        f"vmfork_{name} {self.gauges[name]}"]
            out += ["# HELP vmfork_http_requests_total HTTP requests answered.",
                    "# TYPE vmfork_http_requests_total counter"]
            out += [f'vmfork_http_requests_total{{method="{m}",status="{s}"}} {n}'
                    for (m, s), n in sorted(self.requests.items())]
        return "\n".join(out) + "\n"
