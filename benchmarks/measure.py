"""What every benchmark row records about its machine and process: device names, versions, memory, statistics.

Nothing here imports torch or onnxruntime: a worker's peak RSS must be its backend's alone.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import shutil
import subprocess
from collections.abc import Sequence

import numpy as np

LIBRARIES = (
    "sdtrt",
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "tensorrt",
    "torch",
    "diffusers",
    "transformers",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a row may depend on (read from metadata, nothing imported)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first NVIDIA GPU's name, or None where there is none (asks nvidia-smi: no CUDA context is made)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def peak_rss_mib() -> float:
    """This process's peak resident set: VmHWM from /proc (ru_maxrss where there is no /proc)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def device_used_mib() -> float | None:
    """Memory in use on GPU 0, device-wide, through NVML (nvidia-ml-py); None without it.

    Every GPU backend here keeps what it allocates (caching allocators, TensorRT's activation memory,
    ORT's arena), so the value read after a run, less the one read before, is that run's peak.
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
    except pynvml.NVMLError:
        return None


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Median, 90th percentile and minimum of per-step times, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "min": float(ms.min()),
    }
