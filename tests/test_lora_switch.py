"""Switching LoRA adapters without recompiling (engine/lora_branch.py): the CPU sessions run a low-rank branch
beside each Linear and 1x1 convolution weight and take the adapters' factors as inputs. After the first load
(which compiles OpenVINO's branches in once), swapping, rescaling and unloading keep the same compiled models and
sessions; until then OpenVINO compiles no branches; at rank 0 the branched graph answers the unbranched one bit for
bit; the branch agrees with the folded weights. Parity with diffusers through the
branches is tests/test_lora.py's (every CPU backend x precision)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.lora_swap import write_kohya
from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.ort_session import OrtCpuSession
from sdtrt.engine.weights import load_weight_map
from sdtrt.runtime.lora import read_lora
from sdtrt.runtime.lora_apply import compose, low_rank_factors
from sdtrt.runtime.pipeline import Pipeline

TARGETS = {"unet": ("to_q", "to_k", "to_v", "to_out.0", "proj_in"), "text_encoder": ("q_proj", "v_proj")}
GENERATION = {"prompt": "a red circle", "num_inference_steps": 2, "height": 64, "width": 64, "seed": 0}
GENERATION |= {"decode": False}


@pytest.fixture(scope="module")
def branch_loras(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two kohya LoRAs on Linear and 1x1 convolution weights only: every layer runs as a branch."""
    from sdtrt.engine.artifact import open_artifact

    with open_artifact(tiny_export, backend="ort-cpu") as artifact:
        maps = artifact.weight_maps()
    out = tmp_path_factory.mktemp("branch-loras")
    return {key: write_kohya(out / f"{key}.safetensors", maps, 4, seed, TARGETS) for seed, key in enumerate("ab")}


def _compiled(session) -> object:
    """What a backend would rebuild to change weights: OpenVINO's infer requests, ONNX Runtime's session."""
    return tuple(map(id, session._compiled.values())) if hasattr(session, "_compiled") else id(session._session)


def test_switching_adapters_recompiles_nothing(tiny_export: Path, branch_loras: dict, lora_backend: dict) -> None:
    with Pipeline.load(tiny_export, **lora_backend) as pipe:
        base = pipe.txt2img(**GENERATION).latents
        pipe.load_lora(branch_loras["a"])  # the first load: OpenVINO compiles the branches in, once
        with_a = pipe.txt2img(**GENERATION).latents
        sessions = {network: pipe.session(network) for network in ("text_encoder", "unet")}
        compiled = {network: _compiled(session) for network, session in sessions.items()}
        pipe.unload_lora("a")
        unloaded_a = pipe.txt2img(**GENERATION).latents
        pipe.load_lora(branch_loras["b"], scale=0.5)
        pipe.set_lora_scale("b", 1.5)
        with_b = pipe.txt2img(**GENERATION).latents
        pipe.unload_lora()
        unloaded = pipe.txt2img(**GENERATION).latents
        assert {network: _compiled(session) for network, session in sessions.items()} == compiled
        assert all(pipe.session(network) is session for network, session in sessions.items())
    assert not np.array_equal(with_a, base) and not np.array_equal(with_b, with_a)
    np.testing.assert_array_equal(unloaded, unloaded_a)  # no residue of any adapter
    if lora_backend["precision"] == "bf16":  # the branches (at rank 0) break fusions: bf16 rounds elsewhere
        assert np.abs(unloaded - base).max() <= 5e-2 * np.abs(base).max()  # measured 2.5e-2
    else:
        np.testing.assert_array_equal(unloaded, base)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_openvino_compiles_branches_in_at_the_first_adapter(
    tiny_export: Path, branch_loras: dict, precision: str
) -> None:
    """No adapter, no branch: the UNet and text encoder run the base model as compiled before LoRA existed; the first
    adapter (even at scale 0, as the server loads them) compiles the branches in, and they stay."""
    pytest.importorskip("openvino")
    with Pipeline.load(tiny_export, backend="openvino", precision=precision) as pipe:
        pipe.txt2img(**GENERATION)
        sessions = [pipe.session(network) for network in ("text_encoder", "unet")]
        assert [_branch_inputs(session) for session in sessions] == [0, 0]
        pipe.load_lora(branch_loras["a"], scale=0.0)
        pipe.txt2img(**GENERATION)
        expected = [2 * len(session.branched) for session in sessions]
        assert all(expected) and [_branch_inputs(session) for session in sessions] == expected
        pipe.unload_lora()
        pipe.txt2img(**GENERATION)
        assert [_branch_inputs(session) for session in sessions] == expected


def _branch_inputs(session) -> int:
    """How many low-rank factor inputs the session's compiled model takes."""
    (request,) = session._compiled.values()
    return sum(port.get_any_name().startswith(("lora_down:", "lora_up:")) for port in request.model_inputs)


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
        "timestep": np.full(2, 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
    }


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino"])
def test_branch_matches_the_unbranched_graph_and_the_folded_weights(
    tiny_export: Path, branch_loras: dict, backend: str
) -> None:
    path, weight_map = tiny_export / "unet.onnx", load_weight_map(tiny_export / "unet.weights.json")
    if backend == "openvino":
        from sdtrt.engine.manifest import load_manifest
        from sdtrt.engine.openvino_session import OpenVinoSession

        file = load_manifest(tiny_export).component_file("unet", "fp32")
        branched, folded, plain = (
            OpenVinoSession(path, file.inputs, file.outputs, weight_map=m) for m in (weight_map, weight_map, None)
        )
    else:
        branched, folded, plain = (OrtCpuSession(path, threads=1, weight_map=m) for m in (weight_map, weight_map, None))
    assert branched.branched and not plain.branched
    feeds = _feeds()
    base = plain.run(feeds)["noise_pred"]
    np.testing.assert_array_equal(branched.run(feeds)["noise_pred"], base)  # before any factors
    branched.set_factors({})  # the branches in, every one at rank 0
    np.testing.assert_array_equal(branched.run(feeds)["noise_pred"], base)  # rank 0: exact zeros added
    maps = {network: load_weight_map(tiny_export / f"{network}.weights.json") for network in ("unet", "text_encoder")}
    adapter = read_lora(branch_loras["a"], maps)
    factors = low_rank_factors(weight_map, "unet", [(adapter, 0.8)], branched.branched)
    assert factors and set(factors) <= branched.branched
    branched.set_factors(factors)
    folded.set_weights(compose(weight_map, "unet", [(adapter, 0.8)]))  # every layer folded, rank-0 branches
    adapted, expected = branched.run(feeds)["noise_pred"], folded.run(feeds)["noise_pred"]
    assert np.abs(expected - base).max() > 1e-3  # the adapter matters
    assert np.abs(adapted - expected).max() <= 1e-5 * np.abs(expected).max()
    branched.set_factors({})
    np.testing.assert_array_equal(branched.run(feeds)["noise_pred"], base)
    name = next(iter(factors))
    down, up = factors[name]
    for bad, message in [
        ({name: (down.astype(np.float16), up)}, "must be float32"),
        ({name: (down, up[:, :1])}, "must be float32"),
        ({"unet.conv_in.bias": (down, up)}, "take no low-rank branch"),
    ]:
        with pytest.raises(InvalidInputError, match=message) as error:
            branched.set_factors(bad)
        assert "\n" not in str(error.value)
    np.testing.assert_array_equal(branched.run(feeds)["noise_pred"], base)  # refused factors changed nothing


def test_static_rank_branches_pad_the_factors_and_refuse_a_higher_rank(tiny_export: Path, branch_loras: dict) -> None:
    """The measured candidate with branches of a fixed rank (OpenVinoSession lora_rank): factors zero-padded to it
    answer what the dynamic branches answer; adapters whose ranks add up beyond it are one clear error."""
    from sdtrt.engine.manifest import load_manifest
    from sdtrt.engine.openvino_session import OpenVinoSession

    path, weight_map = tiny_export / "unet.onnx", load_weight_map(tiny_export / "unet.weights.json")
    file = load_manifest(tiny_export).component_file("unet", "fp32")
    dynamic, static = (
        OpenVinoSession(path, file.inputs, file.outputs, weight_map=weight_map, lora_rank=r) for r in (None, 6)
    )
    maps = {network: load_weight_map(tiny_export / f"{network}.weights.json") for network in ("unet", "text_encoder")}
    adapters = [(read_lora(branch_loras[key], maps), 0.7) for key in "ab"]  # rank 4 each
    feeds = _feeds()
    np.testing.assert_array_equal(static.run(feeds)["noise_pred"], dynamic.run(feeds)["noise_pred"])
    one = low_rank_factors(weight_map, "unet", adapters[:1], static.branched)
    for session in (dynamic, static):
        session.set_factors(one)
    expected = dynamic.run(feeds)["noise_pred"]
    assert np.abs(static.run(feeds)["noise_pred"] - expected).max() <= 1e-5 * np.abs(expected).max()
    with pytest.raises(InvalidInputError, match=r"add up to 8, above this session's maximum of 6") as error:
        static.set_factors(low_rank_factors(weight_map, "unet", adapters, static.branched))
    assert "\n" not in str(error.value)
