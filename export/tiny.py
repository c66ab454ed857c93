"""The embedded default model: a tiny Stable Diffusion 1.x-architecture pipeline with random weights.

It is built from configs with a fixed seed and saved as an ordinary diffusers folder, so the very
same export path serves it and real models. It proves the machinery, not the art: it draws noise.
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


def build_tiny_sd1(out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False) -> Path:
    """Save a tiny SD 1.x pipeline (CLIP text encoder, UNet, 8x VAE, PNDM, CLIP BPE tokenizer)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=TEXT_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=32,  # latent pixels: 256x256 images
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        sample_size=256,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 32, 32, 32),  # four levels: 8x down-sampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=32,
        scaling_factor=0.18215,
    )
    scheduler = PNDMScheduler.from_config(SD1_SCHEDULER)
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        write_clip_tokenizer(staging / "tokenizer", TEXT_MAX_LENGTH)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "tokenizer")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging, safe_serialization=True)
    return out_dir
