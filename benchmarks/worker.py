"""A worker process: one task each, so a backend's peak memory is its own and nothing leaks between them.

    python -m benchmarks.worker REQUEST.json RESULT.json

REQUEST is {"task": "prepare", ...} (build the model, export it) or {"task": "measure", "job": {...}}
(with "turn_fds" when the parent interleaves it with other workers, see run.py).
RESULT is {"status": "ok", ...} or {"status": "failed", "reason": one line}.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from sdtrt.engine.errors import SdtrtError
from sdtrt.engine.fsutil import write_json_atomic


def prepare(request: dict[str, Any]) -> dict[str, Any]:
    """The model folder and, per precision, its sdtrt export or the reason there is none."""
    from benchmarks.prepare import ensure_export, ensure_int8, ensure_latency_graphs, ensure_model

    model, root, seed = request["model"], request["root"], request["seed"]
    model_dir, build_s = ensure_model(model, root, seed)
    exports: dict[str, dict[str, Any]] = {}
    for precision in request["precisions"]:
        try:
            out, export_s, cached = ensure_export(model, model_dir, root, precision, seed, request["export"])
        except SdtrtError as exc:  # a family the export stage does not support yet, a precision not exported
            exports[precision] = {"error": str(exc)}
            continue
        ensure_latency_graphs(out, root, request.get("step_cache", False), request.get("tiny_vae", False))
        exports[precision] = {"dir": str(out), "export_s": export_s, "cached": cached}
        if precision == "fp32" and request.get("int8") is not None:
            exports[precision]["quantize_s"] = ensure_int8(out, **request["int8"])
    return {"model_dir": str(model_dir), "build_s": build_s, "exports": exports}


def measure(request: dict[str, Any]) -> dict[str, Any]:
    """One backend's row; with "turn_fds" (grant, done) each unit of work waits for the parent's turn."""
    from benchmarks.harness import TORCH_BACKENDS, Job
    from benchmarks.harness import measure as run_measurement

    job = Job(**request["job"])
    turn = contextlib.nullcontext if request.get("turn_fds") is None else functools.partial(_turn, *request["turn_fds"])
    if job.backend in TORCH_BACKENDS:
        from benchmarks.torch_bench import TorchRunner

        return run_measurement(job, TorchRunner(job), turn)
    from benchmarks.sdtrt_bench import SdtrtRunner  # no torch in this process

    return run_measurement(job, SdtrtRunner(job), turn)


@contextlib.contextmanager
def _turn(grant_fd: int, done_fd: int) -> Iterator[None]:
    """Wait for the parent's go (one byte), do the work, then say done (one byte)."""
    os.read(grant_fd, 1)
    try:
        yield
    finally:
        os.write(done_fd, b"d")


TASKS = {"prepare": prepare, "measure": measure}


def main(argv: Sequence[str] | None = None) -> int:
    request_path, result_path = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    try:
        result = {"status": "ok", **TASKS[request["task"]](request)}
    except Exception as exc:  # any failure becomes the row's reason; the traceback goes to stderr
        traceback.print_exc()
        lines = str(exc).strip().splitlines() or [""]
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {lines[0]}"}
    write_json_atomic(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
