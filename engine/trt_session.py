"""TensorRT sessions: one deserialized plan on fixed device buffers, a CUDA graph per input shape.

The plan is deserialized once. Its execution context has no scratch memory of its own: the
sessions of one pipeline share one activation buffer (DeviceScope) sized to the largest, which is
safe because they run one after another on the pipeline's one stream. Inputs and outputs live in
device buffers allocated once at the profile's largest shapes, so their addresses never change and
a CUDA graph captured for one set of shapes stays valid: each call copies the inputs into those
buffers through pinned staging, replays (or, the first time a shape is seen, runs eagerly and
then captures), and copies the outputs back.

Plans of networks with a weight map are refittable (engine/trt_build.py): set_weights refits the
changed weights in place and drops the CUDA graphs captured before, which are captured afresh.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sdtrt.engine import cuda
from sdtrt.engine.errors import BackendUnavailableError
from sdtrt.engine.manifest import Manifest
from sdtrt.engine.profiles import ProfileSpec, bound_dims, check_in_profile, dynamic_profile, suggest_profile
from sdtrt.engine.session import TensorSpec, check_feeds
from sdtrt.engine.trt_build import ensure_plan
from sdtrt.engine.trt_plans import PlanMeta, find_plan, import_tensorrt, runtime_info, trt_logger
from sdtrt.engine.weights import WeightMap

log = logging.getLogger(__name__)


def open_trt_session(
    folder: str | os.PathLike[str],
    manifest: Manifest,
    component: str,
    precision: str,
    scope: cuda.DeviceScope,
    *,
    weight_map: WeightMap | None = None,
    profile: ProfileSpec | None = None,
    build: bool = True,
) -> TensorRTSession:
    """A session on the plan of ``component``: the newest loadable one, or the one for ``profile``.

    When no plan fits and ``build`` is true, one is built first (the default dynamic profile when
    no ``profile`` is given); otherwise that is an error naming the command that builds it.
    """
    runtime = runtime_info(scope.device)
    found = find_plan(folder, manifest, component, precision, runtime) if profile is None else None
    if found is None:
        spec = profile or dynamic_profile(manifest)
        if profile is None and build:
            log.warning(
                "no TensorRT plan for %s here yet: building %s now, once (ahead of time: %s)",
                component,
                spec.describe(),
                spec.command(folder),
            )
        found = ensure_plan(folder, manifest, component, precision, spec, runtime, build=build)
    path, meta = found
    return TensorRTSession(path, meta, folder, manifest, scope, weight_map)


class TensorRTSession:
    """One TensorRT plan behind the Session interface."""

    def __init__(
        self,
        plan_path: Path,
        meta: PlanMeta,
        folder: str | os.PathLike[str],
        manifest: Manifest,
        scope: cuda.DeviceScope,
        weight_map: WeightMap | None = None,
    ) -> None:
        self.name = meta.component
        self._weight_map = weight_map  # the plan's refittable weights (None: it has none)
        self._meta = meta
        self._folder = folder
        self._manifest = manifest
        self._scope = scope
        self._resources = contextlib.ExitStack()  # everything acquired, released in reverse order
        try:
            self._open(plan_path)
        except BaseException:
            self._resources.close()
            raise

    def _open(self, plan_path: Path) -> None:
        trt = import_tensorrt()
        self._stream = self._scope.acquire()
        self._resources.callback(self._scope.release)
        runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if engine is None:
            raise BackendUnavailableError(
                f"TensorRT could not load {plan_path}; rebuild it: {self._meta.profile.command(self._folder)} --force"
            )
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendUnavailableError(
                f"TensorRT could not create an execution context for {plan_path} (its log above says why)"
            )
        self._resources.callback(self._drop_trt_objects)  # context before engine before runtime
        self._runtime, self._engine, self._context = runtime, engine, context
        self._scope.activations.reserve(engine.device_memory_size_v2)
        self._activations_generation = -1  # pointed at the shared buffer on the first run

        declared = self._manifest.component_file(self.name, self._meta.precision)
        self._refitted: set[str] = set()  # the weights that differ from the export now
        declared_specs = {s.name: s for s in declared.inputs + declared.outputs}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(declared_specs):
            raise BackendUnavailableError(
                f"{plan_path} has tensors {sorted(names)}, the manifest {sorted(declared_specs)}: rebuild it with "
                f"{self._meta.profile.command(self._folder)} --force"
            )
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        # the manifest's named dimensions (the runtime's view), the engine's element types
        self.inputs = {n: TensorSpec(n, dtypes[n].name, declared_specs[n].shape) for n in names if is_input[n]}
        self.outputs = {n: TensorSpec(n, dtypes[n].name, declared_specs[n].shape) for n in names if not is_input[n]}
        self._dtypes = dtypes
        self._ranges = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}

        # fixed buffers at the largest shapes the profile allows
        for n in self.inputs:
            self._set_input_shape(n, self._ranges[n][2])
        self._device: dict[str, cuda.DeviceBuffer] = {}
        self._host: dict[str, cuda.PinnedBuffer] = {}
        for n in names:
            nbytes = int(np.prod(tuple(context.get_tensor_shape(n)), dtype=np.int64)) * dtypes[n].itemsize
            self._device[n] = self._own(cuda.DeviceBuffer(nbytes))
            self._host[n] = self._own(cuda.PinnedBuffer(nbytes))
            if not context.set_tensor_address(n, self._device[n].ptr):
                raise BackendUnavailableError(f"{self.name}: TensorRT refused the address of {n!r}")
        self._context_key: tuple | None = None  # the input shapes the context is set to
        self._output_shapes: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self._graphs = self._own(cuda.GraphCache(self._stream, self.name))
        self._resources.callback(self._stream.synchronize)  # on close: nothing in flight before freeing
        log.debug("loaded %s (%s, %s)", plan_path, self._meta.precision, self._meta.profile.describe())

    @property
    def profile(self) -> ProfileSpec:
        """The profile the plan was built for."""
        return self._meta.profile

    def _own(self, resource):
        self._resources.callback(resource.close)
        return resource

    def _drop_trt_objects(self) -> None:
        self._context = self._engine = self._runtime = None

    def _set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._context.set_input_shape(name, shape):
            raise BackendUnavailableError(f"{self.name}: TensorRT refused shape {shape} for {name!r}")

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.ptr):
            raise cuda.CudaError(f"{self.name}: TensorRT execute_async_v3 failed (its log above says why)")

    def _hint(self, shapes: Mapping[str, tuple[int, ...]]) -> str:
        dims = bound_dims(self.inputs, shapes)
        return suggest_profile(self._manifest, self.name, dims, self._meta.profile).command(self._folder)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        shapes = {n: tuple(feeds[n].shape) for n in self.inputs}
        check_in_profile(self.name, shapes, self._ranges, self._meta.profile, lambda: self._hint(shapes))
        activations = self._scope.activations
        if self._activations_generation != activations.generation:  # first run, or the shared buffer moved
            self._context.set_device_memory(activations.ptr, activations.nbytes)
            self._activations_generation = activations.generation
            self._graphs.clear()
        key = tuple(shapes.values())
        if self._context_key != key:
            for n, shape in shapes.items():
                self._set_input_shape(n, shape)
            self._context_key = key
            if key not in self._output_shapes:
                self._output_shapes[key] = {n: tuple(self._context.get_tensor_shape(n)) for n in self.outputs}

        for n, shape in shapes.items():
            staged = self._host[n].array(shape, self._dtypes[n])
            np.copyto(staged, feeds[n])
            cuda.copy_to_device(self._device[n], self._host[n], staged.nbytes, self._stream)
        self._graphs.run(key, self._enqueue)
        results = {}
        for n, shape in self._output_shapes[key].items():
            results[n] = self._host[n].array(shape, self._dtypes[n])
            cuda.copy_to_host(self._host[n], self._device[n], results[n].nbytes, self._stream)
        self._stream.synchronize()
        return {n: staged.copy() for n, staged in results.items()}  # the caller owns them

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Refit the plan: ``weights`` take these values, and every weight refitted before and not named now
        goes back to its exported value (read from the weight map's data file)."""
        if self._weight_map is None:
            if weights:
                raise BackendUnavailableError(f"{self.name} has no weight map: its weights cannot be changed")
            return
        self._weight_map.check(weights, self.name)
        values = {name: self._weight_map.base(name) for name in self._refitted - weights.keys()}
        values.update(weights)
        if not values:
            return
        rebuild = f"{self._meta.profile.command(self._folder)} --force"
        if not self._engine.refittable:
            raise BackendUnavailableError(f"the TensorRT plan of {self.name} is not refittable: rebuild it: {rebuild}")
        trt = import_tensorrt()
        refitter = trt.Refitter(self._engine, trt_logger())
        held = []  # TensorRT reads these host arrays until the refit is done

        def supply(name: str, array: np.ndarray) -> None:
            held.append(np.ascontiguousarray(array))
            if not refitter.set_named_weights(name, trt.Weights(held[-1])):
                raise BackendUnavailableError(
                    f"{self.name}: TensorRT refused new values for weight {name!r} (its log above says why); "
                    f"a plan built before weight maps cannot refit it: {rebuild}"
                )

        for name, array in values.items():
            supply(name, array)
        for name in refitter.get_missing_weights():  # weights TensorRT combined with changed ones: unchanged
            if name not in self._weight_map.weights:
                raise BackendUnavailableError(f"{self.name}: refitting needs weight {name!r}, which has no map entry")
            supply(name, self._weight_map.base(name))
        self._stream.synchronize()  # no run in flight reads the old weights
        if not refitter.refit_cuda_engine():
            raise BackendUnavailableError(f"{self.name}: TensorRT could not refit the plan (its log above says why)")
        self._refitted = set(weights)
        self._graphs.clear()  # graphs captured before the refit: captured again on the next run of each shape
        log.debug("%s: refitted %d weights", self.name, len(values))

    def close(self) -> None:
        self._resources.close()
