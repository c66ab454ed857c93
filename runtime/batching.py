"""Several requests to one Pipeline as one UNet batch: dynamic batching for a server.

Each request is a Plan (``Pipeline.plan``) and runs the Pipeline's own code (``Pipeline.execute``: noise from
its own seed, its own scheduler, guidance, VAE) in a thread of its own, with a ``BatchMember`` as its network
runner (runtime/runner.py). Every member's UNet call waits at a rendezvous until each member still running has
made its call; then one UNet call runs on the inputs of all of them, concatenated on the batch axis,
and each member takes its own rows of the output back. Every other network runs one call at a time,
as the member asks. So a request's noise, steps and arithmetic are its own; only the UNet's batch is
shared. The timestep is a per-sample input, so members need not even be at the same step: the
server still groups only plans with one batch key (size, step count, scheduler, guidance on/off, the task's
own options that change the steps run), which keeps the members in step and the batch full.

A member that finishes early, fails or is cancelled (its progress callback raises) leaves the
rendezvous, and the others go on without it.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sdtrt.runtime.generation import GenerationResult, ProgressCallback
from sdtrt.runtime.pipeline import Pipeline
from sdtrt.runtime.plan import Plan
from sdtrt.runtime.runner import NetworkRunner

BATCHED_NETWORK = "unet"
# sees each UNet call's (B or 2B, C, h, w) float32 sample input, before the call, and a runner it may run networks
# on in the meantime (one call at a time with the batch's other members: e.g. a preview's decode)
SampleHook = Callable[[np.ndarray, NetworkRunner], None]


@dataclass
class BatchCall:
    """One request of a batch: its plan, its progress callback, and an optional hook that sees its UNet inputs."""

    plan: Plan
    progress: ProgressCallback | None = None
    on_sample: SampleHook | None = None
    context: contextvars.Context | None = None  # what the call runs in (e.g. a request id its logs carry)


class Rendezvous:
    """Gathers the members' UNet calls into one call on ``runner``; every network call runs under one lock."""

    def __init__(self, runner: NetworkRunner, members: int, pad_to: int | None = None) -> None:
        self.runner = runner
        self.pad_to = pad_to  # rows a gathered call is padded to (repeating its last), so its shape is always one
        self.lock = threading.Lock()  # one session call at a time: a Pipeline's sessions are not shared
        self._cond = threading.Condition()
        self._active = members  # members still running
        self._waiting: dict[int, dict[str, np.ndarray]] = {}  # member -> its UNet feeds, this round
        self._results: dict[int, dict[str, np.ndarray] | BaseException] = {}
        self.unet_batches: list[int] = []  # the UNet batch of each gathered call, for metrics and tests

    def run(self, member: int, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The UNet's outputs for ``member``'s ``feeds``, computed in one call with the other members' feeds."""
        with self._cond:
            self._waiting[member] = feeds
            if len(self._waiting) == self._active:
                self._run_round()
            while member not in self._results:
                self._cond.wait()
            result = self._results.pop(member)
        if isinstance(result, BaseException):
            raise result
        return result

    def leave(self) -> None:
        """A member is done (or failed): the round no longer waits for it."""
        with self._cond:
            self._active -= 1
            if self._waiting and len(self._waiting) == self._active:
                self._run_round()

    def _run_round(self) -> None:
        """Run the waiting members' feeds as one batch and hand each its rows (called holding the condition)."""
        members = sorted(self._waiting)
        feeds = [self._waiting.pop(m) for m in members]
        sizes = [len(f["sample"]) for f in feeds]
        padding = max(0, self.pad_to - sum(sizes)) if self.pad_to and len(members) > 1 else 0
        try:
            batched = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
            if padding:  # (rows + padding, ...): copies of the last row, whose outputs are dropped
                batched = {name: np.concatenate([v, np.repeat(v[-1:], padding, axis=0)]) for name, v in batched.items()}
            with self.lock:
                outputs = self.runner.run_all(BATCHED_NETWORK, **batched)
            self.unet_batches.append(sum(sizes))
            bounds = np.cumsum(sizes)  # the last part: the padding's rows (or none)
            rows = {name: np.split(value, bounds) for name, value in outputs.items()}
            for i, m in enumerate(members):
                self._results[m] = {name: parts[i] for name, parts in rows.items()}
        except Exception as exc:  # every member of the round sees the failure (e.g. NaN in the output)
            for m in members:
                self._results[m] = exc
        self._cond.notify_all()


class BatchMember:
    """One member's NetworkRunner: its UNet calls go through the rendezvous, the rest straight through (locked)."""

    def __init__(self, rendezvous: Rendezvous, member: int, on_sample: SampleHook | None = None) -> None:
        self._rendezvous = rendezvous
        self._member = member
        self._on_sample = on_sample

    def run_all(self, network: str, **feeds: np.ndarray) -> dict[str, np.ndarray]:
        if self._on_sample is not None and network.startswith("unet"):  # unet, or unet_controlnet
            self._on_sample(feeds["sample"], self)
        if network == BATCHED_NETWORK:
            return self._rendezvous.run(self._member, feeds)
        with self._rendezvous.lock:
            return self._rendezvous.runner.run_all(network, **feeds)

    def run(self, network: str, **feeds: np.ndarray) -> np.ndarray:
        (output,) = self.run_all(network, **feeds).values()
        return output


def run_batch(
    pipe: Pipeline, calls: Sequence[BatchCall], pad_to: int | None = None
) -> tuple[list[GenerationResult | Exception], list[int]]:
    """Run ``calls`` on ``pipe`` with their UNet calls batched together; a gathered call of several members is
    padded to ``pad_to`` samples where given (a backend that compiles each input shape then compiles one).

    Returns each call's result or the exception it raised (in the order of ``calls``), and the UNet batch
    size of each gathered UNet call. With one call it runs on the caller's thread. Each result is the one
    ``pipe.execute`` gives for that plan alone, up to the UNet's arithmetic at another batch size.
    """
    rendezvous = Rendezvous(pipe.sessions, len(calls), pad_to)

    def one(member: int) -> GenerationResult | Exception:
        call = calls[member]
        runner = BatchMember(rendezvous, member, call.on_sample)
        context = contextvars.copy_context() if call.context is None else call.context
        try:
            return context.run(pipe.execute, call.plan, progress=call.progress, runner=runner)
        except Exception as exc:
            return exc
        finally:
            rendezvous.leave()

    if len(calls) == 1:
        return [one(0)], rendezvous.unet_batches
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="sdtrt-batch") as pool:
        results = list(pool.map(one, range(len(calls))))
    return results, rendezvous.unet_batches
