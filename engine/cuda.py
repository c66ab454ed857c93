"""CUDA through cuda-bindings: device info, device buffers, pinned host staging, streams, graphs.

Every object here owns one CUDA resource and frees it in ``close()`` (idempotent), so a session
can release its memory deterministically instead of waiting for the garbage collector.
cuda-bindings is imported on first use: a CPU-only install never needs it.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from sdtrt.engine.errors import BackendUnavailableError, SdtrtError

log = logging.getLogger(__name__)


class CudaError(SdtrtError):
    """A CUDA runtime call failed (no device, out of memory, a failed launch, ...)."""


def cudart() -> ModuleType:
    """The CUDA runtime bindings; a clear error when cuda-bindings is not installed."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        raise BackendUnavailableError("cuda-bindings is not installed: pip install 'sdtrt[gpu]'") from None
    return runtime


def check(result: tuple, what: str):
    """Unpack a cuda-bindings result ``(error, *values)``; raise CudaError unless it succeeded."""
    rt = cudart()
    error, *values = result
    if error != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(error)
        _, text = rt.cudaGetErrorString(error)
        raise CudaError(f"{what} failed: {name.decode()}: {text.decode()}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory: int  # bytes


def device_count() -> int:
    """How many CUDA devices this process sees; CudaError when the driver is missing or broken."""
    return check(cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")


def device_info(index: int = 0) -> Device:
    props = check(cudart().cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
    return Device(index, name.rstrip("\0"), (props.major, props.minor), props.totalGlobalMem)


class DeviceBuffer:
    """``nbytes`` of device memory at a fixed address (``ptr``) until closed."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr: int = check(cudart().cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})")

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """``nbytes`` of page-locked host memory: the staging area of asynchronous copies."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.ptr: int = check(cudart().cudaMallocHost(max(nbytes, 1)), f"cudaMallocHost({nbytes})")

    def array(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A NumPy view of the first bytes (valid until close; copy before handing it out)."""
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = count * np.dtype(dtype).itemsize
        if nbytes > self.nbytes:
            raise ValueError(f"a {shape} {np.dtype(dtype)} array needs {nbytes} bytes, the buffer has {self.nbytes}")
        raw = (ctypes.c_uint8 * nbytes).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


class Stream:
    """A non-blocking CUDA stream (it does not synchronize with the legacy default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        """The cudaStream_t as an integer, as TensorRT's execute_async_v3 takes it."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def copy_to_device(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync (to device)")


def copy_to_host(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync (to host)")


class CudaGraph:
    """The work one call enqueues on a stream, captured once and replayed with a single launch.

    The captured kernels keep the device addresses they were captured with: inputs must be copied
    into the same buffers before each launch, and a graph is only valid for the shapes it saw.
    """

    def __init__(self, stream: Stream, enqueue: Callable[[], None]) -> None:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        try:
            enqueue()
        except BaseException:  # still end the capture, or the stream stays unusable, and free what it made
            error, graph = rt.cudaStreamEndCapture(stream.handle)
            if error == rt.cudaError_t.cudaSuccess:
                rt.cudaGraphDestroy(graph)  # best effort: the enqueue's error is the one to report
            raise
        error, graph = rt.cudaStreamEndCapture(stream.handle)
        check((error,), "cudaStreamEndCapture")
        try:
            self.handle = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            check(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self.handle, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaGraphExecDestroy(self.handle), "cudaGraphExecDestroy")
            self.handle = None


class GraphCache:
    """One CUDA graph per key (the input shapes), captured on first use after an eager warm-up.

    ``run(key, enqueue)`` runs ``enqueue`` eagerly the first time a key is seen (TensorRT and
    friends allocate and tune on the first run of a shape), then captures it; every later call
    with that key launches the graph. A key whose capture fails stays eager, logged once.
    """

    def __init__(self, stream: Stream, name: str) -> None:
        self.stream = stream
        self.name = name
        self._graphs: dict[Hashable, CudaGraph | None] = {}

    def __len__(self) -> int:
        return sum(graph is not None for graph in self._graphs.values())

    def run(self, key: Hashable, enqueue: Callable[[], None]) -> None:
        if key not in self._graphs:
            enqueue()  # the eager warm-up; its results are this call's results
            try:
                self._graphs[key] = CudaGraph(self.stream, enqueue)
            except CudaError as exc:
                log.warning("%s: no CUDA graph for shapes %s, running eagerly (%s)", self.name, key, exc)
                self._graphs[key] = None
            return
        graph = self._graphs[key]
        if graph is None:
            enqueue()
        else:
            graph.launch(self.stream)

    def clear(self) -> None:
        """Drop every graph (after the buffers they captured moved)."""
        for graph in self._graphs.values():
            if graph is not None:
                graph.close()
        self._graphs.clear()

    close = clear


class SharedActivations:
    """One device buffer for the scratch memory of several engines that never run at the same time.

    Engines on one stream run one after another, so their activations can share one allocation
    sized to the largest. ``reserve`` grows it; a growth moves it, and ``generation`` tells the
    users to point their contexts at the new address (and drop graphs that captured the old one).
    """

    def __init__(self) -> None:
        self._buffer: DeviceBuffer | None = None
        self.generation = 0

    @property
    def ptr(self) -> int:
        return self._buffer.ptr if self._buffer else 0

    @property
    def nbytes(self) -> int:
        return self._buffer.nbytes if self._buffer else 0

    def reserve(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        if self._buffer is not None:
            self._buffer.close()
        self._buffer = DeviceBuffer(nbytes)
        self.generation += 1
        log.debug("shared activation memory: %.1f MiB", nbytes / 2**20)

    def close(self) -> None:
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class DeviceScope:
    """What one pipeline's GPU sessions share: one stream and one activation buffer.

    Created without touching CUDA (a BackendChoice carries one); sessions ``acquire`` it when they
    open and ``release`` it when they close, and the last release frees the stream and the memory.
    """

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self._users = 0
        self.stream: Stream | None = None
        self.activations = SharedActivations()

    def acquire(self) -> Stream:
        if self._users == 0:
            check(cudart().cudaSetDevice(self.device), "cudaSetDevice")
            self.stream = Stream()
        self._users += 1
        return self.stream

    def release(self) -> None:
        self._users -= 1
        if self._users == 0:
            self.stream.synchronize()
            self.activations.close()
            self.stream.close()
            self.stream = None
