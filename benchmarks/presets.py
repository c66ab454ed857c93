"""Model presets: SD-1.5- and SDXL-shaped pipelines with seeded random weights, saved as diffusers folders.

Random weights cost exactly what trained ones cost (the same shapes, the same kernels), so the benchmarks
need no download. The configs below are those of runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0, written out; a built preset is cached under the benchmark root
and rebuilt only when its configs change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from sdtrt.engine.fsutil import atomic_dir, write_json_atomic
from sdtrt.export.tiny import SD1_SCHEDULER  # runwayml/stable-diffusion-v1-5 scheduler_config.json

log = logging.getLogger(__name__)

PRESETS = ("sd15", "sdxl", "tiny")
PRESET_RECORD = "bench_preset.json"  # beside model_index.json: which configs built the folder, and how long it took

# OpenAI CLIP ViT-L/14 text tower (SD 1.x; SDXL's first text encoder)
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
# OpenCLIP ViT-bigG/14 text tower with its projection (SDXL's second text encoder)
OPENCLIP_BIGG = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SD15_UNET = {
    "sample_size": 64,  # latent pixels: 512x512 images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SDXL_UNET = {
    "sample_size": 128,  # latent pixels: 1024x1024 images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,  # the two text encoders' hidden states, concatenated (768 + 1280)
    "attention_head_dim": [5, 10, 20],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # pooled text (1280) + 6 size/crop ids x 256
    "norm_num_groups": 32,
}
SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", **SD1_SCHEDULER}
# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "trained_betas": None,
}
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": {
        "unet": SD15_UNET,
        "text_encoder": CLIP_L,
        "vae": SD_VAE,
        "scheduler": SD15_SCHEDULER,
        "dtype": "float32",  # the CPU backends and the fp32 export read it as is
    },
    "sdxl": {
        "unet": SDXL_UNET,
        "text_encoder": CLIP_L,
        "text_encoder_2": OPENCLIP_BIGG,
        "vae": SDXL_VAE,
        "scheduler": SDXL_SCHEDULER,
        "dtype": "float16",  # 7 GB instead of 14 on disk; loading as float32 upcasts
    },
}


def config_digest(preset: str, seed: int) -> str:
    """What a cached preset folder was built from: its configs, or for ``tiny`` the code that builds it."""
    import sdtrt.export.tiny

    built_from = PRESET_CONFIGS.get(preset) or Path(sdtrt.export.tiny.__file__).read_text(encoding="utf-8")
    blob = json.dumps({"preset": built_from, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_preset(preset: str, root: str | os.PathLike[str], seed: int = 0) -> tuple[Path, float | None]:
    """The diffusers folder of ``preset`` under ``root`` (built on first use) and its build seconds (None: cached)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    folder = Path(root) / preset / "model"
    digest = config_digest(preset, seed)
    record = folder / PRESET_RECORD
    if record.is_file() and json.loads(record.read_text()).get("digest") == digest:
        return folder, None
    log.info("building the %s preset (random weights, seed %d) in %s", preset, seed, folder)
    start = time.perf_counter()
    if preset == "tiny":
        from sdtrt.export.tiny import build_tiny_sd1

        build_tiny_sd1(folder, seed=seed, overwrite=True)
    else:
        _build(preset, folder, seed)
    seconds = time.perf_counter() - start
    write_json_atomic(record, {"preset": preset, "seed": seed, "digest": digest, "build_s": seconds})
    return folder, seconds


def build_networks(preset: str, device: str = "cpu") -> dict[str, Any]:
    """The torch networks of ``preset`` with random weights; ``device="meta"`` builds shapes only."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    configs = PRESET_CONFIGS[preset]
    with torch.device(device):
        networks = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "vae": AutoencoderKL(**configs["vae"]),
        }
        if "text_encoder_2" in configs:
            networks["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    return networks


def _build(preset: str, folder: Path, seed: int) -> None:
    import diffusers
    import torch
    from transformers import CLIPTokenizer

    from sdtrt.export.clip_vocab import write_clip_tokenizer

    configs = PRESET_CONFIGS[preset]
    torch.manual_seed(seed)
    dtype = getattr(torch, configs["dtype"])
    networks = {name: net if dtype == torch.float32 else net.to(dtype) for name, net in build_networks(preset).items()}
    scheduler_config = {k: v for k, v in configs["scheduler"].items() if k != "_class_name"}
    scheduler = getattr(diffusers, configs["scheduler"]["_class_name"]).from_config(scheduler_config)
    with atomic_dir(folder, overwrite=True) as staging:
        write_clip_tokenizer(staging / "tokenizer", CLIP_L["max_position_embeddings"])
        components = {"tokenizer": CLIPTokenizer.from_pretrained(staging / "tokenizer"), "scheduler": scheduler}
        if preset == "sdxl":
            # OpenCLIP's tokenizer pads with "!" instead of the end token
            write_clip_tokenizer(staging / "tokenizer_2", CLIP_L["max_position_embeddings"], pad_token="!")
            components["tokenizer_2"] = CLIPTokenizer.from_pretrained(staging / "tokenizer_2")
            # no invisible watermark: sdtrt draws none, so its peer should not pay for one
            pipeline = diffusers.StableDiffusionXLPipeline(**networks, **components, add_watermarker=False)
        else:
            pipeline = diffusers.StableDiffusionPipeline(
                **networks, **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
            )
        pipeline.save_pretrained(staging, safe_serialization=True)
