"""The serving row: `sdtrt serve` under load, with dynamic batching on and off.

    python -m benchmarks.serving                       # the demo model, concurrency 1 4 16, batching 4 vs 1
    python -m benchmarks.run --serving                 # the same from the bench runner

For each batching setting a real server process starts on a free loopback port (both at once). At each
concurrency level C, C clients send requests back to back (--requests in all, distinct seeds), the two
settings taking turns round by round so that both meet the machine's load alike. A row records images/s
(completed images over the wall time), p50/p99 latency and the mean UNet batch the server ran. Rows are
appended to benchmarks/results/serving.jsonl; a markdown table is printed and written beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.measure import cpu_cores, cpu_name, gpu_name, library_versions

DEFAULT_OUT = Path("benchmarks/results/serving.jsonl")
DEMO_EXPORT = Path("artifacts/tiny-sd-onnx")  # where `sdtrt demo` and `make serve` keep the demo model


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving", description=__doc__.splitlines()[0])
    p.add_argument("--export", type=Path, default=None, help=f"an artifact folder (default: the demo, {DEMO_EXPORT})")
    p.add_argument("--backend", default="auto", help="the server's backend (default: auto)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="clients at once (default 1 4 16)")
    p.add_argument("--requests", type=int, default=32, help="requests per level and setting, at least one per client")
    p.add_argument("--rounds", type=int, default=2, help="turns each setting takes per level (default 2)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps per request (default 20)")
    p.add_argument("--size", type=int, default=None, help="pixels per side (default: the model's native size)")
    p.add_argument("--max-batch", type=int, default=4, help="images per UNet batch with batching on (default 4)")
    p.add_argument("--threads", type=int, default=None, help="SDTRT_NUM_THREADS of the server (default: all cores)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSONL file to append to (default {DEFAULT_OUT})")
    return p


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo_export() -> Path:
    """The demo model's export, made once where it is missing."""
    if not (DEMO_EXPORT / "manifest.json").is_file():
        from sdtrt.demo import demo_model_dir
        from sdtrt.export.exporter import export_model

        export_model(demo_model_dir(), DEMO_EXPORT, overwrite=True, progress=False)
    return DEMO_EXPORT


class ServerProcess:
    """`sdtrt serve ARGS` in a process of its own on a free loopback port, ready (/readyz) when constructed; its
    output is drained into ``log`` (so a chatty server never stalls on a full pipe); stopped at close."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str] | None = None, ready_timeout: float = 120.0, threads: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = io.StringIO()
        command = [sys.executable, "-m", "sdtrt", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        env = {**os.environ, "SDTRT_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), **(env or {})}
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=lambda: [self.log.write(line) for line in self.proc.stdout], daemon=True)
        self._reader.start()
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited:\n{self.log.getvalue()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"the server was not ready in {ready_timeout} s:\n{self.log.getvalue()}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _unet_batch(url: str) -> tuple[float, float]:
    """(sum, count) of the server's UNet batch-size histogram so far."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = re.search(r"^sdtrt_unet_batch_size_sum\{.*\} (\S+)$", text, re.MULTILINE)
    count = re.search(r"^sdtrt_unet_batch_size_count\{.*\} (\S+)$", text, re.MULTILINE)
    return (float(total[1]), float(count[1])) if total and count else (0.0, 0.0)


async def _level(url: str, clients: int, per_client: int, body: dict[str, Any]) -> dict[str, Any]:
    """``clients`` clients sending ``per_client`` requests each, back to back: latencies, errors, images, wall."""
    latencies: list[float] = []
    errors: list[int] = []
    images = 0

    async def client(c: httpx.AsyncClient, index: int) -> None:
        nonlocal images
        for i in range(per_client):
            t0 = time.perf_counter()
            r = await c.post("/v1/txt2img", json={**body, "seed": index * per_client + i})
            latencies.append(time.perf_counter() - t0)
            if r.status_code == 200:
                images += len(r.json()["images"])
            else:
                errors.append(r.status_code)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c, i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"latencies": latencies, "errors": len(errors), "images": images, "wall_s": wall}


def _summary(parts: Sequence[dict[str, Any]], unet: tuple[float, float]) -> dict[str, Any]:
    """One row's numbers from the rounds of one setting: images over wall time, latency percentiles."""
    latencies = [x for part in parts for x in part["latencies"]]
    images, wall = sum(p["images"] for p in parts), sum(p["wall_s"] for p in parts)
    p50, p99 = np.percentile(latencies, [50, 99])
    return {
        "requests": len(latencies),
        "errors": sum(p["errors"] for p in parts),
        "images": images,
        "wall_s": wall,
        "images_per_s": images / wall,
        "p50_ms": p50 * 1000,
        "p99_ms": p99 * 1000,
        "unet_batch_mean": unet[0] / unet[1] if unet[1] else None,
    }


def run(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Both servers up at once; at each concurrency level they take turns, round by round, so that both meet
    the machine's load alike (on a shared machine it drifts within minutes)."""
    args = _parser().parse_args(argv)
    export = args.export or _demo_export()
    manifest = json.loads((export / "manifest.json").read_text())
    threads = args.threads or cpu_cores()
    body: dict[str, Any] = {"prompt": "a red circle on a blue background", "num_inference_steps": args.steps}
    if args.size:
        body.update(height=args.size, width=args.size)
    base = {
        "schema": 1,
        "kind": "serving",
        "run_id": f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_cores": cpu_cores(),
        "gpu": gpu_name(),
        "versions": library_versions(),
        "model": export.name,
        "family": manifest.get("family"),
        "steps": args.steps,
        "size": args.size,
        "threads": threads,
        "rounds": args.rounds,
    }
    servers: dict[int, ServerProcess] = {}
    rows = []
    try:
        for max_batch in (args.max_batch, 1):
            limits = ["--max-batch", str(max_batch), "--queue-size", "256", "--max-images", "16"]
            server = ServerProcess(
                ["-q", str(export), "--backend", args.backend, *limits], ready_timeout=300, threads=threads
            )
            servers[max_batch] = server
            asyncio.run(_level(server.url, max_batch, 2, body))  # warm-up: the batch shapes compiled, caches filled
        base["backend"] = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=600).json()["backend"]
        for clients in args.concurrency:
            per_client = max(1, -(-args.requests // (clients * args.rounds)))
            parts: dict[int, list[dict[str, Any]]] = {mb: [] for mb in servers}
            before = {mb: _unet_batch(server.url) for mb, server in servers.items()}
            for round_ in range(args.rounds):
                for max_batch, server in servers.items():
                    print(f"{clients} client(s), round {round_ + 1}, max batch {max_batch} ...", flush=True)
                    parts[max_batch].append(asyncio.run(_level(server.url, clients, per_client, body)))
            for max_batch, server in servers.items():
                after = _unet_batch(server.url)
                unet = (after[0] - before[max_batch][0], after[1] - before[max_batch][1])
                row = {**base, "max_batch": max_batch, "concurrency": clients}
                rows.append(row | _summary(parts[max_batch], unet))
    finally:
        for server in servers.values():
            server.close()
    rows.sort(key=lambda row: (-row["max_batch"], row["concurrency"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    print(f"rows appended to {args.out}; table {args.out.with_suffix('.md')}")
    return rows


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    first = rows[0]
    size = f"{first['size']}²" if first["size"] else "native size"
    lines = [
        f"`sdtrt serve` on `{first['model']}` ({first['backend']}), {first['steps']} steps at {size}, one image per "
        "request, "
        f"run {first['run_id']}; CPU: {first['cpu']} ({first['cpu_cores']} cores, {first['threads']} thread(s)); "
        f"GPU: {first['gpu'] or 'none'}. UNet batch: samples per UNet call (2 per image under guidance).",
        "",
        "| batching | clients | requests | images/s | p50 ms | p99 ms | mean UNet batch | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        batching = f"on (≤ {r['max_batch']} images)" if r["max_batch"] > 1 else "off"
        mean = "–" if r["unet_batch_mean"] is None else f"{r['unet_batch_mean']:.1f}"
        lines.append(
            f"| {batching} | {r['concurrency']} | {r['requests']} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {mean} | {r['errors']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
