"""Single-file checkpoints: tiny models written in the original (LDM / SGM) key layout, converted by the
export stage through diffusers' from_single_file, against the diffusers folders they were made from."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sdtrt.engine.errors import ExportError
from sdtrt.engine.fsutil import sha256_file
from sdtrt.engine.manifest import load_manifest
from sdtrt.export import single_file, tiny
from sdtrt.export.exporter import export_model
from sdtrt.runtime.pipeline import Pipeline

PROMPT = "a red circle on a blue background"
NETWORKS = ("text_encoder", "text_encoder_2", "unet", "vae")

# ---- diffusers -> original key layout: the inverse of diffusers' single_file_utils conversions ----------------

UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's micro-conditioning MLP
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{RESNET[head]}.{tail}"


def _unet_key(key: str, config: dict) -> str:
    """A diffusers UNet2DConditionModel key as the LDM UNetModel names it."""
    per = config["layers_per_block"] + 1  # input / output blocks per level (+1: down-sampler / extra resnet)
    for name, ldm in UNET_TOP.items():
        if key.startswith(name + "."):
            return ldm + key[len(name) :]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = 1 + int(m[1]) * per + int(m[3])
        return f"input_blocks.{block}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{int(m[1]) * per + per}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block = int(m[1]) * per + int(m[3])
        return f"output_blocks.{block}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{block}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        slot = 2 if "CrossAttn" in config["up_block_types"][int(m[1])] else 1  # after the attention, if any
        return f"output_blocks.{int(m[1]) * per + per - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def _vae_key(key: str, config: dict) -> str:
    """A diffusers AutoencoderKL key as the LDM autoencoder names it."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    key = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", key)
    key = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", key)
    key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
    key = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", key)
    key = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", key)
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
        return f"{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}"
    return key


def _ldm_vae(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in weights.items():
        ldm = _vae_key(key, config)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[ldm] = value
    return out


def _open_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel(WithProjection) weights in OpenCLIP's layout (fused q/k/v, transposed projection)."""
    weights = {
        k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in weights.items()
    }
    out = {
        "token_embedding.weight": weights.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": weights.pop("text_model.embeddings.position_embedding.weight"),
    }
    if "text_projection.weight" in weights:
        out["text_projection"] = weights.pop("text_projection.weight").T.contiguous()
    for key in [k for k in weights if ".q_proj." in k]:
        layer, kind = re.fullmatch(
            r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", key
        ).groups()
        qkv = [weights.pop(key.replace("q_proj", proj)) for proj in ("q_proj", "k_proj", "v_proj")]
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
    for key, value in weights.items():
        key = key.replace("text_model.final_layer_norm.", "ln_final.").replace(
            "text_model.encoder.layers.", "resblocks."
        )
        key = key.replace(".self_attn.", ".attn.")
        for name, ldm in OPEN_CLIP.items():
            key = key.replace(f".{name}.", f".{ldm}.")
        out[key if key.startswith("ln_final") else f"transformer.{key}"] = value
    return out


def _openai_clip(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel weights as the LDM FrozenCLIPEmbedder holds them (transformers' own names)."""
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()}


def ldm_checkpoint(index: dict, parts: dict[str, tuple[dict[str, torch.Tensor], dict]]) -> dict[str, torch.Tensor]:
    """A pipeline's weights (``parts``: name -> (state dict, config)) as one checkpoint in the original layout."""
    (unet, unet_config), (vae, vae_config) = parts["unet"], parts["vae"]
    out = {f"model.diffusion_model.{_unet_key(k, unet_config)}": v for k, v in unet.items()}
    out |= {f"first_stage_model.{k}": v for k, v in _ldm_vae(vae, vae_config).items()}
    if "text_encoder_2" in index:  # SGM: conditioner.embedders.<i>, OpenAI CLIP first when there are two
        embedders = [parts[name][0] for name in ("text_encoder", "text_encoder_2") if name in parts]
        if len(embedders) == 2:
            out |= {f"conditioner.embedders.0.transformer.{k}": v for k, v in _openai_clip(embedders[0]).items()}
        i = len(embedders) - 1
        out |= {f"conditioner.embedders.{i}.model.{k}": v for k, v in _open_clip(embedders[-1]).items()}
    elif parts["text_encoder"][1]["hidden_act"] == "quick_gelu":  # SD 1.x: OpenAI CLIP
        out |= {f"cond_stage_model.transformer.{k}": v for k, v in _openai_clip(parts["text_encoder"][0]).items()}
    else:  # SD 2.x: OpenCLIP
        out |= {f"cond_stage_model.model.{k}": v for k, v in _open_clip(parts["text_encoder"][0]).items()}
    return out


def _networks(folder: Path) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """name -> (weights, config) of each network in a diffusers folder."""
    return {
        name: (
            load_file(next((folder / name).glob("*.safetensors"))),
            json.loads((folder / name / "config.json").read_text()),
        )
        for name in NETWORKS
        if (folder / name / "config.json").is_file()
    }


def write_checkpoint(folder: Path, path: Path, **extra: torch.Tensor) -> Path:
    """Save the diffusers folder ``folder`` as the single-file checkpoint ``path`` (+ ``extra`` tensors)."""
    index = json.loads((folder / "model_index.json").read_text())
    save_file({**ldm_checkpoint(index, _networks(folder)), **extra}, path)
    return path


# ---- fixtures -------------------------------------------------------------------------------------------------


def _leftovers(folder: Path) -> list[str]:
    """Hidden entries: the conversion's and the export's temporary folders."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _weights_equal(a: Path, b: Path) -> None:
    """The networks of two diffusers folders hold the same tensors."""
    ours, theirs = _networks(a), _networks(b)
    assert ours.keys() == theirs.keys()
    for name, (weights, _) in theirs.items():
        assert ours[name][0].keys() == weights.keys(), name
        assert all(torch.equal(ours[name][0][k], v) for k, v in weights.items()), name


def _latents(folder: Path) -> np.ndarray:
    with Pipeline.load(folder, backend="ort-cpu") as pipe:
        return pipe.txt2img(PROMPT, num_inference_steps=3, seed=3, height=128, width=128, decode=False).latents


@pytest.fixture(scope="module")
def sd1_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("checkpoints") / "tiny-sd1.safetensors")


def _tiny_sdxl(out: Path) -> Path:
    """tiny.build_tiny_sdxl with a wider second text encoder: diffusers tells SDXL's encoders apart by their
    widths (CLIP ViT-L 768, OpenCLIP bigG 1280), and tiny's are both 32 wide."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    folder = tiny.build_tiny_sdxl(out)
    torch.manual_seed(1)
    config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
    config.hidden_size, config.intermediate_size, config.projection_dim = 48, 96, 48
    CLIPTextModelWithProjection(config).save_pretrained(folder / "text_encoder_2")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    wide = {"cross_attention_dim": 32 + 48, "projection_class_embeddings_input_dim": 6 * 8 + 48}
    UNet2DConditionModel.from_config({**unet.config, **wide}).save_pretrained(folder / "unet")
    return folder


# ---- single file -> export -> the same images ------------------------------------------------------------------


def test_sd1_checkpoint_exports_as_its_diffusers_folder(
    sd1_checkpoint: Path, tiny_model_dir: Path, tiny_export: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    manifest = export_model(sd1_checkpoint, out, config=tiny_model_dir, progress=False)
    assert manifest.family == "sd1" and manifest.prediction_type == "epsilon"
    assert manifest.source["path"] == str(sd1_checkpoint)
    assert manifest.source["sha256"] == sha256_file(sd1_checkpoint)  # the checkpoint's own hash
    assert manifest.source["checkpoint_type"] == "v1"
    reference = load_manifest(tiny_export)
    for name, component in manifest.components.items():  # same weights, same graph: the same ONNX bytes
        assert component.files["fp32"].sha256 == reference.components[name].files["fp32"].sha256, name
    np.testing.assert_array_equal(_latents(out), _latents(tiny_export))
    assert _leftovers(tmp_path) == []


def test_failed_export_leaves_no_conversion_behind(
    sd1_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdtrt.export import exporter

    def fail(*args, **kwargs) -> None:
        raise RuntimeError("simulated failure while exporting the converted model")

    monkeypatch.setattr(exporter, "export_fp32", fail)
    with pytest.raises(ExportError, match="exporting text_encoder failed: RuntimeError: simulated") as failure:
        export_model(sd1_checkpoint, tmp_path / "out", config=tiny_model_dir, progress=False)
    assert isinstance(failure.value.__cause__, RuntimeError)  # behind --debug
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_sdxl_checkpoint_exports_as_its_diffusers_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("sdxl")
    folder = _tiny_sdxl(root / "tiny-sdxl")
    checkpoint = write_checkpoint(folder, root / "tiny-sdxl.safetensors")
    manifest = export_model(checkpoint, root / "from-file", config=folder, progress=False)
    export_model(folder, root / "from-folder", progress=False)
    assert manifest.family == "sdxl" and set(manifest.tokenizers) == {"text_encoder", "text_encoder_2"}
    np.testing.assert_array_equal(_latents(root / "from-file"), _latents(root / "from-folder"))
    assert _leftovers(root) == []


def test_sdxl_refiner_and_sd2_convert_to_their_weights(tmp_path: Path) -> None:
    for name, build in (
        ("refiner", lambda out: tiny.build_tiny_sdxl(out, refiner=True)),
        ("sd2", tiny.build_tiny_sd2),
    ):
        folder = build(tmp_path / name)
        checkpoint = write_checkpoint(folder, tmp_path / f"{name}.safetensors")
        with single_file.converted_checkpoint(checkpoint, tmp_path / "out", config=folder) as (converted, _):
            _weights_equal(converted, folder)
            index = json.loads((converted / "model_index.json").read_text())
            assert index["_class_name"] == json.loads((folder / "model_index.json").read_text())["_class_name"]
            assert (converted / ("tokenizer_2" if name == "refiner" else "tokenizer") / "vocab.json").is_file()
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


# ---- prediction type ------------------------------------------------------------------------------------------


def _converted_prediction_type(checkpoint: Path, config: Path, out: Path, **options) -> tuple[str, str]:
    with single_file.converted_checkpoint(checkpoint, out, config=config, **options) as (converted, source):
        scheduler = json.loads((converted / "scheduler" / "scheduler_config.json").read_text())
        return scheduler["prediction_type"], source["prediction_type_from"]


def test_prediction_type_from_request_marker_or_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    plain = write_checkpoint(tiny_model_dir, tmp_path / "plain.safetensors")
    marked = write_checkpoint(tiny_model_dir, tmp_path / "marked.safetensors", v_pred=torch.zeros(0))
    out = tmp_path / "out"
    assert _converted_prediction_type(plain, tiny_model_dir, out) == ("epsilon", "the configs")
    assert _converted_prediction_type(marked, tiny_model_dir, out)[0] == "v_prediction"
    requested = _converted_prediction_type(marked, tiny_model_dir, out, prediction_type="epsilon")
    assert requested == ("epsilon", "given")
    with pytest.raises(ExportError, match="unknown prediction type"):
        _converted_prediction_type(plain, tiny_model_dir, out, prediction_type="sample")
    with pytest.raises(ExportError, match="single-file checkpoints only"):
        export_model(tiny_model_dir, out, prediction_type="epsilon", progress=False)
    assert _leftovers(tmp_path) == []


# ---- legacy pickles -------------------------------------------------------------------------------------------


def test_pickled_checkpoint_needs_the_flag(tiny_model_dir: Path, sd1_checkpoint: Path, tmp_path: Path) -> None:
    from sdtrt.cli import main

    checkpoint = tmp_path / "tiny-sd1.ckpt"
    torch.save({"state_dict": load_file(sd1_checkpoint), "global_step": 1}, checkpoint)  # as LDM training saved
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"pickled .* arbitrary code .*--allow-pickle"):
        export_model(checkpoint, out, config=tiny_model_dir, progress=False)
    assert main(["export", str(checkpoint), "--out", str(out), "--config", str(tiny_model_dir)]) == 2
    with single_file.converted_checkpoint(checkpoint, out, config=tiny_model_dir, allow_pickle=True) as (folder, src):
        _weights_equal(folder, tiny_model_dir)
        assert src["sha256"] == sha256_file(checkpoint)

    hostile = tmp_path / "objects.ckpt"
    torch.save({"state_dict": {}, "callbacks": argparse.Namespace(x=1)}, hostile)  # a class beyond plain data
    with pytest.raises(ExportError, match="weights-only unpickler"):
        export_model(hostile, out, allow_pickle=True, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


# ---- what cannot be exported ----------------------------------------------------------------------------------


def test_corrupt_and_foreign_files_are_one_clear_error(
    sd1_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_checkpoint.read_bytes()[:100_000])
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    cases = [
        (garbage, "is not a readable .safetensors file"),
        (truncated, "is not a readable .safetensors file"),
        (notes, "neither a diffusers folder nor a checkpoint"),
    ]
    for path, message in cases:
        with pytest.raises(ExportError, match=message):
            export_model(path, out, config=tiny_model_dir, progress=False)
    assert not out.exists() and _leftovers(tmp_path) == []


def test_unknown_architectures_are_one_clear_error(sd1_checkpoint: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    weights = load_file(sd1_checkpoint)
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.lora_up.weight": torch.zeros(4, 4)}, lora)
    pix2pix = tmp_path / "pix2pix.safetensors"  # an 8-channel UNet (image + latents): InstructPix2Pix
    save_file({**weights, single_file.UNET_KEY: torch.zeros(32, 8, 3, 3)}, pix2pix)
    cases = [
        (lora, {}, "not a Stable Diffusion checkpoint"),
        (pix2pix, {}, "of type instruct-pix2pix, which sdtrt does not export"),
        (sd1_checkpoint, {}, "unknown architecture .* pass --config"),  # a UNet of no known size
        (sd1_checkpoint, {"config": tmp_path}, "not a diffusers folder"),
        (sd1_checkpoint, {"config": tiny.build_tiny_sd2(tmp_path / "sd2")}, "cannot load .* with the .* configs"),
    ]
    for path, options, message in cases:
        with pytest.raises(ExportError, match=message):
            export_model(path, out, progress=False, **options)
    assert not out.exists() and _leftovers(tmp_path) == []


# ---- the bundled configs --------------------------------------------------------------------------------------

BUNDLED_FAMILIES = {
    "sd15": "sd1",
    "sd15-inpainting": "sd1",
    "sd21": "sd2",
    "sd21-base": "sd2",
    "sd2-inpainting": "sd2",
    "sdxl-base": "sdxl",
    "sdxl-inpainting": "sdxl",
    "sdxl-refiner": "sdxl",
}


def _empty_component(configs: Path, part: str, library: str, class_name: str):
    """A bundled folder's component: networks with their weights on the meta device, the rest as loaded."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    if part not in NETWORKS:
        return cls.from_pretrained(configs / part)  # scheduler, tokenizer
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config(cls.load_config(configs / part))
        return cls(transformers.CLIPTextConfig.from_pretrained(configs / part))


@pytest.mark.parametrize("name", sorted(BUNDLED_FAMILIES))
def test_bundled_configs_build_their_pipeline(name: str, tmp_path: Path) -> None:
    """Each bundled folder builds its pipeline (weights on the meta device), is the family it claims, and its
    networks in the original layout are the checkpoint type diffusers maps back to this very folder."""
    import diffusers
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    from sdtrt.export.exporter import detect_family

    configs = tmp_path / name
    single_file._copy_configs(single_file.CONFIGS / name, configs)  # + the tokenizers' vocabulary
    index = json.loads((configs / "model_index.json").read_text())
    arguments = {key: value for key, value in index.items() if not key.startswith("_")}
    for part, value in arguments.items():
        if isinstance(value, list):
            arguments[part] = _empty_component(configs, part, *value) if value[0] else None
    pipeline = getattr(diffusers, index["_class_name"])(**arguments)
    parts = {
        part: (module.state_dict(), module.config if part in ("unet", "vae") else module.config.to_dict())
        for part, module in pipeline.components.items()
        if part in NETWORKS and module is not None
    }
    encoder_config = parts.get("text_encoder", parts.get("text_encoder_2"))[1]
    assert detect_family(index, encoder_config, parts["unet"][1]) == BUNDLED_FAMILIES[name]
    assert pipeline.unet.config.in_channels == (9 if "inpainting" in name else 4)

    model_type = infer_diffusers_model_type(ldm_checkpoint(index, parts))
    prediction = pipeline.scheduler.config.prediction_type
    assert (single_file.SD2_CONFIGS[prediction] if model_type == "v2" else single_file.BUNDLED[model_type]) == name
