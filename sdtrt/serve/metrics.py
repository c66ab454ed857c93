"""The server's Prometheus metrics, in a registry of its own (one per app, so tests can start several)."""

from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds: from a tiny model's tens of milliseconds to SDXL's minutes
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)
THROUGHPUT_WINDOW_S = 60.0


class Metrics:
    """Queue depth, in-flight requests, latencies per route and per stage, images/s, errors by kind, batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge(
            "sdtrt_queue_depth", "Requests waiting for their model's worker", ["model"], registry=r
        )
        self.in_flight = Gauge("sdtrt_in_flight", "Requests being generated", ["model"], registry=r)
        self.request_seconds = Histogram(
            "sdtrt_request_seconds",
            "HTTP request latency, arrival to answer",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "sdtrt_stage_seconds",
            "Seconds per generation stage (queue, text_encoder, unet, scheduler, vae_decode, total)",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preview_seconds = Histogram(
            "sdtrt_preview_seconds",
            "Seconds per progress preview the tiny VAE decoded in the worker (watched jobs only, one per step)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("sdtrt_images", "Images generated", ["model"], registry=r)
        self.errors = Counter("sdtrt_errors", "Requests that ended in an error, by kind", ["kind"], registry=r)
        self.batch_size = Histogram(
            "sdtrt_unet_batch_size",
            "Samples per UNet call (doubled under guidance), dynamic batching included",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        throughput = Gauge(
            "sdtrt_images_per_second", f"Images per second over the last {THROUGHPUT_WINDOW_S:g} s", registry=r
        )
        throughput.set_function(self._images_per_second)
        self._finished: deque[tuple[float, int]] = deque()  # (monotonic time, images) of recent results
        self._lock = threading.Lock()

    def record_images(self, model: str, count: int) -> None:
        self.images.labels(model).inc(count)
        with self._lock:
            self._finished.append((time.monotonic(), count))

    def _images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._finished and self._finished[0][0] < now - THROUGHPUT_WINDOW_S:
                self._finished.popleft()
            return sum(count for _, count in self._finished) / THROUGHPUT_WINDOW_S

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
