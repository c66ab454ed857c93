"""Tiny models of each supported architecture, with random weights, for the tests and the benchmarks.

They are built from configs with a fixed seed and saved as ordinary diffusers folders, so the very
same export path serves them and real models. They prove the machinery, not the art: they draw noise.
"""

from __future__ import annotations

import os
from pathlib import Path

from sdtrt.engine.fsutil import atomic_dir
from sdtrt.export.clip_vocab import write_clip_tokenizer

TEXT_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408

# SD 1.x's scheduler config (runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json)
SD1_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}
# stabilityai/stable-diffusion-x4-upscaler: scheduler (DDIM, v-prediction) and low_res_scheduler (DDPM)
UPSCALER_SCHEDULER = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}
UPSCALER_LOW_RES_SCHEDULER = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "variance_type": "fixed_small",
}


def _text_encoder(hidden_act: str):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            hidden_act=hidden_act,  # quick_gelu: OpenAI CLIP (SD 1.x); gelu: OpenCLIP (SD 2.x, upscaler)
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def _vae(levels: int, scaling_factor: float, sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32,) * levels,  # 2 ** (levels - 1) down-sampling
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=scaling_factor,
    )


def _unet(in_channels: int, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    )


def build_tiny_sd1(
    out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False, inpainting: bool = False
) -> Path:
    """A tiny SD 1.x pipeline: CLIP text encoder, UNet, 8x VAE, PNDM, CLIP BPE tokenizer; 256x256 native.

    ``inpainting`` gives the UNet 9 input channels (latents + mask + masked-image latents).
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    text_encoder = _text_encoder("quick_gelu")
    unet = _unet(9 if inpainting else 4)
    vae = _vae(levels=4, scaling_factor=0.18215, sample_size=256)
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        write_clip_tokenizer(staging / "tokenizer", TEXT_MAX_LENGTH)
        pipe = pipeline_class(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(staging / "tokenizer"),
            unet=unet,
            scheduler=PNDMScheduler.from_config(SD1_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)


def build_tiny_upscaler(out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny stable-diffusion-x4-upscaler: 7-channel UNet with noise-level class labels, 4x VAE, v-prediction."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    text_encoder = _text_encoder("gelu")
    unet = _unet(7, num_class_embeds=1000)
    vae = _vae(levels=3, scaling_factor=0.08333, sample_size=128)
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        write_clip_tokenizer(staging / "tokenizer", TEXT_MAX_LENGTH, pad_token="!")
        pipe = StableDiffusionUpscalePipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=CLIPTokenizer.from_pretrained(staging / "tokenizer"),
            unet=unet,
            low_res_scheduler=DDPMScheduler.from_config(UPSCALER_LOW_RES_SCHEDULER),
            scheduler=DDIMScheduler.from_config(UPSCALER_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            watermarker=None,
            max_noise_level=350,
        )
        pipe.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)
