"""The NumPy schedulers against the diffusers classes they mirror, step by step.

Each step feeds both sides the same sample and the same model output, so a difference is that step's alone.
The stand-in model output is the UNet input plus seeded noise (0.1 * N(0, 1)): like a real UNet's, its
implied x0 stays of order one. diffusers computes in float32, so its own rounding grows with the size of the
numbers involved (latents at sigma = 14.6 reach +-60, where one float32 ulp is 3.8e-6): the tolerance is
1e-5 plus 4 ulps of the largest value in play (the input sample or diffusers' result).
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.schedulers import scheduling_lms_discrete  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from sdtrt.engine.errors import InvalidInputError  # noqa: E402
from sdtrt.runtime.schedulers import SCHEDULERS, Scheduler, make_scheduler  # noqa: E402

SHAPE = (2, 4, 8, 8)
EDGE_SHAPE = (1, 4, 4, 4)  # the thousand-step runs at the top of the step range

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
    "sd15_linspace": {**SD15, "timestep_spacing": "linspace"},
    "linear": {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
}
# What each name pins on the diffusers class.
DIFFUSERS_KWARGS: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
    "dpmpp_2m_karras": {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
}


@pytest.fixture(scope="module", autouse=True)
def _quiet_diffusers_lms() -> Iterator[None]:
    """Silence diffusers' warnings; without scipy, give its LMS an exact quadrature for scipy.integrate.quad.

    diffusers' LMS integrates a cubic with quad; 8-point Gauss-Legendre integrates it exactly too (and
    independently of the polynomial integration under test).
    """
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def quad(func: Any, a: float, b: float, **_: Any) -> tuple[float, float]:
        half, mid = (b - a) / 2, (a + b) / 2
        return half * sum(w * float(func(half * x + mid)) for x, w in zip(nodes, weights, strict=True)), 0.0

    with pytest.MonkeyPatch.context() as mp:
        if not hasattr(scheduling_lms_discrete, "integrate"):
            mp.setattr(scheduling_lms_discrete, "integrate", types.SimpleNamespace(quad=quad), raising=False)
        yield
    diffusers_logging.set_verbosity(verbosity)


def diffusers_scheduler(name: str, config: dict[str, Any], **kwargs: Any) -> Any:
    class_name = SCHEDULERS[name].diffusers_class
    cls = getattr(scheduling_lms_discrete, class_name, None) or getattr(diffusers, class_name)
    return cls.from_config(config, **DIFFUSERS_KWARGS.get(name, {}), **kwargs)


def assert_close(ours: np.ndarray, theirs: np.ndarray, given: np.ndarray, what: str) -> None:
    """Max abs difference within 1e-5 + 4 float32 ulps of the largest value in play."""
    assert ours.dtype == np.float32 and ours.shape == theirs.shape, what
    err = float(np.abs(ours.astype(np.float64) - theirs).max())
    scale = max(float(np.abs(given).max()), float(np.abs(theirs).max()))
    assert err <= 1e-5 + 5e-7 * scale, f"{what}: max abs error {err:.3g} at scale {scale:.3g}"


def compare(
    name: str, config: dict[str, Any], steps: int, begin: int = 0, eta: float = 0.0, edge: bool = False
) -> bool:
    """Run ours and diffusers side by side from step ``begin``, asserting that every step matches.

    ``edge``: a step count at the top of the range, where diffusers may index past its tables or divide by zero.
    There a diffusers step that raises or is not finite ends the comparison: what differed before it is
    forgiven (our schedule differs exactly where diffusers' breaks), and ours runs on alone and must stay finite.
    Returns whether diffusers ran the whole schedule.
    """
    shape = EDGE_SHAPE if edge else SHAPE
    ours = make_scheduler(name, config, **({"eta": eta} if eta else {}))
    theirs = diffusers_scheduler(name, config)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    if edge and name == "euler_a":
        # The sigma tables agree to an ulp, but sigma_up takes sigma**2 - sigma_next**2, which a thousand steps
        # make neighbours so close that the ulp grows a hundredfold: here diffusers steps on our table, in float64.
        theirs.sigmas = torch.from_numpy(ours.sigmas.astype(np.float64))
    differences: list[str] = []

    def check(assertion: Callable[..., None], *args: Any) -> None:
        try:
            assertion(*args)
        except AssertionError as exc:
            if not edge:
                raise
            differences.append(str(exc))

    check(assert_same_timesteps, ours, theirs)
    check(_assert_approx, ours.init_noise_sigma, float(theirs.init_noise_sigma))

    # Index-based stepping, like ours (else diffusers starts at the second of two equal first timesteps).
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(begin)
    rng = np.random.default_rng(0)
    if begin:  # img2img: noise a clean latent to the starting step, diffusers-pipeline style
        original = rng.standard_normal(shape).astype(np.float32)
        noise = rng.standard_normal(shape).astype(np.float32)
        sample = ours.add_noise(original, noise, begin)
        reference = theirs.add_noise(
            torch.from_numpy(original), torch.from_numpy(noise), theirs.timesteps[begin : begin + 1]
        )
        assert_close(sample, reference.numpy(), sample, f"{name} add_noise")
    else:
        sample = (rng.standard_normal(shape) * ours.init_noise_sigma).astype(np.float32)

    diffusers_works = True
    for i in range(begin, len(ours.timesteps)):
        model_input = ours.scale_model_input(sample, i)
        model_output = (model_input + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        kwargs: dict[str, Any] = {"eta": eta} if eta else {}
        noise = None
        if ours.needs_noise(i):
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(i)).numpy()
            kwargs["generator"] = torch.Generator().manual_seed(i)
        prev = ours.step(model_output, i, sample, noise)
        if diffusers_works:
            try:
                t = theirs.timesteps[i]
                reference_input = theirs.scale_model_input(torch.from_numpy(sample), t).numpy()
                reference = theirs.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), **kwargs)
                reference = reference.prev_sample.numpy()
                diffusers_works = bool(np.isfinite(reference).all())
            except Exception:  # at the edges: IndexError, ZeroDivisionError
                if not edge:
                    raise
                diffusers_works = False
        if diffusers_works:
            check(assert_close, model_input, reference_input, sample, f"{name} scale_model_input[{i}]")
            check(assert_close, prev, reference, sample, f"{name} step[{i}]")
            sample = reference
        else:
            assert edge, f"{name} step[{i}]: diffusers' result is not finite"
            assert np.isfinite(prev).all(), f"{name} step[{i}] of {steps}: not finite"
            sample = prev
    assert not (diffusers_works and differences), differences[:3]
    return diffusers_works


def assert_same_timesteps(ours: Scheduler, theirs: Any) -> None:
    expected = theirs.timesteps.numpy()
    assert ours.timesteps.dtype == expected.dtype
    if expected.dtype.kind == "f":  # Karras / continuous timesteps come from ulp-close sigma tables
        np.testing.assert_allclose(ours.timesteps, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(ours.timesteps, expected)


def _assert_approx(ours: float, theirs: float) -> None:
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("config_id", CONFIGS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name: str, prediction_type: str, config_id: str) -> None:
    config = {**CONFIGS[config_id], "prediction_type": prediction_type}
    prk = name == "pndm" and not config.get("skip_prk_steps")  # PRK warm-up needs 4 steps (as in diffusers)
    for steps in (4, 10, 25) if prk else (1, 4, 10, 25):
        compare(name, config, steps)


SPECIAL_CASES = [
    ("ddim", {"clip_sample": True, "clip_sample_range": 0.5, "set_alpha_to_one": True}),
    ("ddim", {"prediction_type": "sample"}),
    ("ddim", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("ddim", {"beta_schedule": "squaredcos_cap_v2", "steps_offset": 0}),
    ("pndm", {"skip_prk_steps": False}),
    ("pndm", {"skip_prk_steps": False, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}),
    ("pndm", {"set_alpha_to_one": True, "trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}),
    ("euler", {"use_karras_sigmas": True}),
    ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    ("euler", {"final_sigmas_type": "sigma_min", "prediction_type": "sample"}),
    ("euler", {"interpolation_type": "log_linear"}),
    ("euler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}),
    ("euler", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    ("euler_a", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    # (euler_a, not here: diffusers' float32 sigma_down goes NaN on this schedule's first, 4-step interval.)
    ("euler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    ("dpmpp_2m", {"solver_type": "heun"}),
    ("dpmpp_2m", {"solver_type": "bh2", "prediction_type": "sample"}),
    ("dpmpp_2m", {"euler_at_final": True, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    ("dpmpp_2m", {"lambda_min_clipped": -2.0, "timestep_spacing": "trailing"}),
    ("dpmpp_2m", {"lambda_min_clipped": -2.0}),
    ("dpmpp_2m", {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    # (v_prediction: with epsilon, x0 = (x - sigma * eps) / alpha at alpha = 5e-5 loses diffusers' float32.)
    ("dpmpp_2m_karras", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}),
    ("dpmpp_2m_karras", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("lms", {"use_karras_sigmas": True}),
    ("lms", {"prediction_type": "sample", "timestep_spacing": "leading"}),
]


@pytest.mark.parametrize(("name", "extra"), SPECIAL_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_diffusers_options(name: str, extra: dict[str, Any]) -> None:
    config = {**SD15, **extra}
    for steps in (4, 10, 25):
        compare(name, config, steps)


EDGE_CONFIGS = {  # each scheduler's default spacing, and leading (steps_offset 1) and trailing for all
    "sd15": SD15,
    "sd15_leading": {**SD15, "timestep_spacing": "leading"},
    "sd15_trailing": {**SD15, "timestep_spacing": "trailing"},
}


@pytest.fixture
def gauss_lms_quadrature(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' LMS integrates its cubic with scipy's adaptive quad: seconds per thousand steps. Gauss-Legendre
    integrates it exactly too, in a fraction of the time."""
    nodes, weights = np.polynomial.legendre.leggauss(8)

    def quad(func: Any, a: float, b: float, **_: Any) -> tuple[float, float]:
        half, mid = (b - a) / 2, (a + b) / 2
        return half * sum(w * float(func(half * x + mid)) for x, w in zip(nodes, weights, strict=True)), 0.0

    monkeypatch.setattr(scheduling_lms_discrete, "integrate", types.SimpleNamespace(quad=quad), raising=False)


@pytest.mark.parametrize("config_id", EDGE_CONFIGS)
@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_range_edges(name: str, config_id: str, gauss_lms_quadrature: None) -> None:
    """1, 2, N - 1 and N steps (N = num_train_timesteps) run and stay finite, matching diffusers wherever
    diffusers itself runs (at N it indexes past its tables or divides by zero on some spacings); a count diffusers
    refuses (lcm past original_inference_steps) and N + 1 are one-line errors."""
    config = EDGE_CONFIGS[config_id]
    top = config["num_train_timesteps"]
    for steps in (1, 2, top - 1, top):
        try:
            diffusers_scheduler(name, config).set_timesteps(steps)
        except ValueError:
            refusal = rf"^scheduler '{name}' takes at most \d+ steps .*, got {steps}$"
            with pytest.raises(InvalidInputError, match=refusal):
                make_scheduler(name, config).set_timesteps(steps)
            continue
        compare(name, config, steps, edge=True)
    with pytest.raises(InvalidInputError, match=rf"^num_inference_steps must be an integer from 1 to {top}, got"):
        make_scheduler(name, config).set_timesteps(top + 1)


def test_step_range_ends_where_the_schedule_does() -> None:
    """DPM-Solver with lambda_min_clipped has fewer distinct timesteps than training timesteps: past them its
    second-order step would divide by a step of length 0 (diffusers: NaN). One line names the largest count."""
    config = {**SD15, "lambda_min_clipped": -2.0}
    for steps in (878, 1000):
        with pytest.raises(InvalidInputError, match=r"^scheduler 'dpmpp_2m' takes at most 877 steps .*, got \d+$"):
            make_scheduler("dpmpp_2m", config).set_timesteps(steps)
    assert compare("dpmpp_2m", config, 876, edge=True)  # diffusers' last count: its n + 1 points still distinct
    assert not compare("dpmpp_2m", config, 877, edge=True)  # ours spreads 877 without the extra point; diffusers NaN


def test_ddim_eta_uses_given_noise() -> None:
    assert make_scheduler("ddim", SD15, eta=0.7).stochastic
    assert not make_scheduler("ddim", SD15).stochastic
    for steps in (1, 10, 25):
        compare("ddim", SD15, steps, eta=0.7)


def test_config_use_default_values() -> None:
    """Keys listed in _use_default_values take the target class's default, as diffusers' from_config does."""
    config = {**SD15, "timestep_spacing": "trailing", "_use_default_values": ["timestep_spacing"]}
    assert make_scheduler("euler", config).config["timestep_spacing"] == "linspace"
    compare("euler", config, 10)


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("config_id", ["sd15", "sd15_trailing"])
def test_begin_index_matches_diffusers(name: str, config_id: str) -> None:
    """An img2img loop: add_noise at step k, then step from k with empty history (diffusers' set_begin_index;
    the PNDM and DDIM pipelines simply start at timesteps[k])."""
    for begin in (1, 3, 7):
        compare(name, CONFIGS[config_id], 10, begin=begin)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers(name: str) -> None:
    ours, theirs = make_scheduler(name, SD15), diffusers_scheduler(name, SD15)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(1)
    original, noise = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    for i in range(len(ours.timesteps)):
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(i)
        reference = theirs.add_noise(torch.from_numpy(original), torch.from_numpy(noise), theirs.timesteps[i : i + 1])
        noisy = ours.add_noise(original, noise, i)
        assert_close(noisy, reference.numpy(), noisy, f"{name} add_noise[{i}]")


SPLIT_STEPS = (1, 4, 10, 25)
STRENGTHS = (0.05, 0.3, 0.5, 0.75, 0.99, 1.0)
FRACTIONS = (0.05, 0.3, 0.5, 0.75, 0.8, 0.95)


def scheduler_pair(name: str, steps: int) -> tuple[Scheduler, Any]:
    """Ours and diffusers' scheduler after set_timesteps(steps). "heun" stands for a second-order scheduler:
    ours (euler) takes the timesteps and order of diffusers' HeunDiscreteScheduler."""
    heun = name == "heun"
    ours = make_scheduler("euler" if heun else name, SD15)
    theirs = diffusers.HeunDiscreteScheduler.from_config(SD15) if heun else diffusers_scheduler(name, SD15)
    ours.set_timesteps(steps)
    theirs.set_timesteps(steps)
    if heun:
        ours.timesteps, ours.order = theirs.timesteps.numpy(), theirs.order
    return ours, theirs


@pytest.mark.parametrize("name", [*SCHEDULERS, "heun"])
def test_strength_start_matches_diffusers(name: str) -> None:
    """diffusers' img2img get_timesteps: only the last int(steps * strength) steps (times the order) run."""
    get_timesteps = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps
    for steps in SPLIT_STEPS:
        ours, theirs = scheduler_pair(name, steps)
        for strength in STRENGTHS:
            start = ours.strength_start(steps, strength)
            if int(steps * strength) == 0:  # no step (diffusers would still run PNDM's repeated first timestep)
                assert start == len(ours.timesteps)
            else:
                timesteps, _ = get_timesteps(types.SimpleNamespace(scheduler=theirs), steps, strength, "cpu")
                assert len(ours.timesteps) - start == len(timesteps), (steps, strength)


@pytest.mark.parametrize("name", [*SCHEDULERS, "heun"])
def test_split_indices_match_diffusers(name: str) -> None:
    """The refiner continues where diffusers' SDXL img2img get_timesteps with denoising_start does; with a
    first-order scheduler that is exactly where the base stopped at denoising_end = the same fraction."""
    get_timesteps = diffusers.StableDiffusionXLImg2ImgPipeline.get_timesteps
    for steps in SPLIT_STEPS:
        ours, theirs = scheduler_pair(name, steps)
        for fraction in FRACTIONS:
            pipeline = types.SimpleNamespace(scheduler=theirs)
            _, count = get_timesteps(pipeline, steps, 1.0, "cpu", denoising_start=fraction)
            start = ours.continue_index(fraction)
            assert start == len(ours.timesteps) - count, (steps, fraction)
            if ours.order == 1:
                assert ours.end_index(fraction) == start, (steps, fraction)


def test_split_points_hand_worked() -> None:
    ddim = make_scheduler("ddim", SD15)
    ddim.set_timesteps(10)  # leading spacing, steps_offset 1: 901, 801, ..., 1
    # round(1000 - 1000 * fraction); 999.5 rounds to even, as in diffusers.
    assert [ddim.cutoff(f) for f in (0.8, 0.5, 0.25, 0.0005)] == [200, 500, 750, 1000]
    assert all(type(ddim.cutoff(f)) is int for f in (0.8, 0.0005))
    assert ddim.end_index(None) == 10
    assert [ddim.end_index(f) for f in (0.8, 0.5, 0.25, 0.05)] == [8, 5, 2, 0]
    assert [ddim.continue_index(f) for f in (0.8, 0.5, 0.25, 0.05)] == [8, 5, 2, 0]
    assert [ddim.strength_start(10, s) for s in (1.0, 0.8, 0.55, 0.1, 0.09, 0.0)] == [0, 2, 5, 9, 10, 10]

    pndm = make_scheduler("pndm", SD15)
    pndm.set_timesteps(10)  # skip_prk_steps: 11 timesteps, the second one repeated
    assert [pndm.strength_start(10, s) for s in (1.0, 0.8, 0.09)] == [0, 2, 11]

    # Second order (Heun's layout): index 2k + 1 finishes the step index 2k began.
    heun = make_scheduler("euler", SD15)
    heun.timesteps, heun.order = np.array([999, 666, 666, 333, 333, 0, 0], np.float32), 2
    assert heun.end_index(0.5) == 3  # 999, 666, 666 are >= 500
    # 4 timesteps lie below 500: starting at index 3 would begin between two halves, so it starts at 2.
    assert [heun.continue_index(f) for f in (0.1, 0.5, 0.8, 0.9)] == [0, 2, 4, 4]
    assert [heun.strength_start(4, s) for s in (1.0, 0.5, 0.2)] == [0, 4, 7]


def test_split_fraction_errors() -> None:
    sched = make_scheduler("ddim", SD15)
    sched.set_timesteps(10)
    for value in (0, 1.0, -0.5, 1.5, "0.5"):
        message = f"denoising_end must be a number strictly between 0 and 1, got {value!r}"
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            sched.end_index(value)  # type: ignore[arg-type]
    for value in (0.0, 1, None):
        message = f"denoising_start must be a number strictly between 0 and 1, got {value!r}"
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            sched.continue_index(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="denoising_end must be a number strictly between 0 and 1, got True"):
        sched.end_index(True)
    assert sched.end_index(np.float32(0.8)) == sched.end_index(0.8) == sched.continue_index(np.float64(0.8))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_defaults_are_diffusers_defaults(name: str) -> None:
    cls = SCHEDULERS[name]
    diffusers_cls = getattr(scheduling_lms_discrete, cls.diffusers_class, None) or getattr(
        diffusers, cls.diffusers_class
    )
    params = inspect.signature(diffusers_cls.__init__).parameters
    assert dict(cls._defaults) == {k: p.default for k, p in params.items() if k != "self"}
    assert cls.order == diffusers_cls.order


def test_make_scheduler_from_class_name() -> None:
    assert make_scheduler(None, SD15).name == "pndm"
    for name in ("ddim", "euler", "euler_a", "lms"):
        config = {**SD15, "_class_name": SCHEDULERS[name].diffusers_class}
        assert make_scheduler(None, config).name == name
    dpm = {**SD15, "_class_name": "DPMSolverMultistepScheduler"}
    assert make_scheduler(None, dpm).name == "dpmpp_2m"
    assert make_scheduler(None, {**dpm, "use_karras_sigmas": True}).name == "dpmpp_2m_karras"
    # The name wins over the config: dpmpp_2m from a Karras config is plain, and vice versa.
    assert not make_scheduler("dpmpp_2m", {**dpm, "use_karras_sigmas": True}).config["use_karras_sigmas"]
    assert make_scheduler("dpmpp_2m_karras", dpm).config["use_karras_sigmas"]
    # Keys the target class does not take are ignored, as in diffusers.
    assert make_scheduler("euler", {**SD15, "thresholding": True, "clip_sample": True}).name == "euler"


@pytest.mark.parametrize(
    ("name", "config", "overrides", "message"),
    [
        ("nope", SD15, {}, "unknown scheduler 'nope'"),
        (None, {**SD15, "_class_name": "UniPCMultistepScheduler"}, {}, "does not implement"),
        (None, {"beta_schedule": "linear"}, {}, "does not implement"),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}, {}, "order 2"),
        (None, {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, {}, "order 2"),
        ("ddim", {**SD15, "thresholding": True}, {}, "thresholding=True is not supported"),
        ("dpmpp_2m", SD15, {"thresholding": True}, "thresholding=True is not supported"),
        ("euler", {**SD15, "use_exponential_sigmas": True}, {}, "use_exponential_sigmas"),
        ("dpmpp_2m", {**SD15, "variance_type": "learned_range"}, {}, "variance_type"),
        ("pndm", {**SD15, "prediction_type": "sample"}, {}, "prediction_type='sample'"),
        ("euler_a", SD15, {"prediction_type": "sample"}, "prediction_type='sample'"),
        ("ddim", {**SD15, "beta_schedule": "cubic"}, {}, "beta_schedule='cubic'"),
        ("euler", {**SD15, "timestep_spacing": "middle"}, {}, "timestep_spacing='middle'"),
        ("ddim", {**SD15, "trained_betas": [0.1, 0.2]}, {}, "trained_betas"),
        ("euler", SD15, {"eta": 0.5}, "has no option 'eta'"),
        ("dpmpp_2m", SD15, {"use_karras_sigmas": True}, "always uses use_karras_sigmas=False"),
        ("dpmpp_2m_karras", SD15, {"solver_order": 3}, "always uses solver_order=2"),
        ("ddim", SD15, {"eta": -1.0}, "eta must be a number >= 0"),
    ],
)
def test_bad_config(name: str | None, config: dict[str, Any], overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        make_scheduler(name, config, **overrides)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_bad_calls(name: str) -> None:
    sched = make_scheduler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InvalidInputError, match="call set_timesteps first"):
        sched.step(x, 0, x, x)
    for steps in (0, -3, 1001, 2.5, True):
        with pytest.raises(InvalidInputError, match="num_inference_steps"):
            sched.set_timesteps(steps)  # type: ignore[arg-type]
    sched.set_timesteps(5)
    n = len(sched.timesteps)
    for index in (-1, n):
        with pytest.raises(InvalidInputError, match="out of range"):
            sched.scale_model_input(x, index)
    with pytest.raises(InvalidInputError, match="shape"):
        sched.step(x[:1], 0, x, x)
    sched.step(x, 0, x, x)
    with pytest.raises(InvalidInputError, match="out of order: expected 1"):
        sched.step(x, 2, x, x)
    sched.set_timesteps(5)  # starts over: any first index is fine again
    sched.step(x, 2, x, x)


def test_stochastic_needs_noise() -> None:
    for sched in (make_scheduler("euler_a", SD15), make_scheduler("ddim", SD15, eta=1.0)):
        sched.set_timesteps(4)
        x = np.zeros(SHAPE, np.float32)
        with pytest.raises(InvalidInputError, match="needs `noise`"):
            sched.step(x, 0, x)
        with pytest.raises(InvalidInputError, match="noise has shape"):
            sched.step(x, 0, x, x[:1])


def test_pndm_prk_limits() -> None:
    sched = make_scheduler("pndm", {**SD15, "skip_prk_steps": False})
    with pytest.raises(InvalidInputError, match="at least 4"):
        sched.set_timesteps(3)
    sched.set_timesteps(10)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(InvalidInputError, match="must start at step_index 0"):
        sched.step(x, 3, x)


def test_set_timesteps_resets_history() -> None:
    """A second run on the same instance equals a run on a fresh one (multistep history cleared)."""
    rng = np.random.default_rng(2)
    outputs = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(6)]
    start = rng.standard_normal(SHAPE).astype(np.float32)

    def run(sched: Scheduler) -> np.ndarray:
        sched.set_timesteps(6)
        x = start
        for i, out in enumerate(outputs):
            x = sched.step(out, i, x, out)
        return x

    for name in SCHEDULERS:
        sched = make_scheduler(name, SD15)
        first = run(sched)
        np.testing.assert_array_equal(run(sched), first)
        np.testing.assert_array_equal(run(make_scheduler(name, SD15)), first)


def test_runtime_imports_no_torch() -> None:
    code = (
        "import sys, sdtrt.runtime.schedulers as s; s.make_scheduler('euler', {}).set_timesteps(4); "
        "bad = {'torch', 'diffusers', 'transformers', 'scipy'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
