"""Tiny models of each supported architecture, with random weights, for the tests and the benchmarks.

They are built from configs with a fixed seed and saved as ordinary diffusers folders, so the very
same export path serves them and real models. They prove the machinery, not the art: they draw noise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from sdtrt.engine.fsutil import atomic_dir, write_bytes_atomic, write_json_atomic
from sdtrt.export.clip_vocab import BOS, EOS, write_clip_tokenizer

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


# stabilityai/stable-diffusion-2-1: DDIM, v-prediction
SD2_SCHEDULER = {**SD1_SCHEDULER, "prediction_type": "v_prediction"}
# stabilityai/stable-diffusion-xl-base-1.0: Euler
SDXL_SCHEDULER = {**SD1_SCHEDULER, "interpolation_type": "linear", "timestep_spacing": "leading"}


def _text_encoder(hidden_act: str, projection: bool = False, vocab_size: int = CLIP_VOCAB_SIZE):
    """A 2-layer CLIP text encoder; ``projection`` adds the pooled projection (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_MAX_LENGTH,
        hidden_act=hidden_act,  # quick_gelu: OpenAI CLIP (SD 1.x); gelu: OpenCLIP (SD 2.x, SDXL's second, upscaler)
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


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


def _unet(in_channels: int, cross_attention_dim: int = 32, **extra):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    )


# SD 1.x / 2.x pipelines without the safety checker (tiny models have none)
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _save(
    pipeline_class, out_dir, overwrite: bool, pads: dict[str, str], vocab_size: int = CLIP_VOCAB_SIZE, **parts
) -> Path:
    """Write the tokenizers named in ``pads`` (folder -> pad token), then the pipeline, atomically."""
    from transformers import CLIPTokenizer

    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        for folder, pad in pads.items():
            write_clip_tokenizer(staging / folder, TEXT_MAX_LENGTH, pad_token=pad)
            if vocab_size != CLIP_VOCAB_SIZE:
                _shrink_tokenizer(staging / folder, vocab_size)
            parts[folder] = CLIPTokenizer.from_pretrained(staging / folder)
        pipeline_class(**parts).save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)


def _shrink_tokenizer(folder: Path, vocab_size: int) -> None:
    """Cut a CLIP tokenizer to ``vocab_size`` ids, as a custom tokenizer: its first ids (byte symbols, then
    merges), then <|startoftext|> and <|endoftext|>; text outside it becomes the unknown token."""
    if not 2 < vocab_size < CLIP_VOCAB_SIZE:
        raise ValueError(f"a cut CLIP tokenizer has from 3 to {CLIP_VOCAB_SIZE - 1} ids, not {vocab_size}")
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()  # a version line, then merges
    kept = merges[1 : max(1, vocab_size - 512 - 2 + 1)]  # the merge of id 512 + i is line 1 + i
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    tokens = [*sorted(vocab, key=vocab.__getitem__)[: vocab_size - 2], BOS, EOS]
    write_json_atomic(folder / "vocab.json", {token: i for i, token in enumerate(tokens)})
    write_bytes_atomic(folder / "merges.txt", ("\n".join([merges[0], *kept]) + "\n").encode())


def build_tiny_sd1(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    overwrite: bool = False,
    inpainting: bool = False,
    vocab_size: int = CLIP_VOCAB_SIZE,
) -> Path:
    """A tiny SD 1.x pipeline: CLIP text encoder, UNet, 8x VAE, PNDM, CLIP BPE tokenizer; 256x256 native.

    ``inpainting`` gives the UNet 9 input channels (latents + mask + masked-image latents). A ``vocab_size``
    below CLIP's 49408 makes a model with a custom tokenizer: CLIP's, cut to that many ids.
    """
    import torch
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    torch.manual_seed(seed)
    return _save(
        StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline,
        out_dir,
        overwrite,
        {"tokenizer": EOS},
        vocab_size,
        text_encoder=_text_encoder("quick_gelu", vocab_size=vocab_size),
        unet=_unet(9 if inpainting else 4),
        vae=_vae(levels=4, scaling_factor=0.18215, sample_size=256),
        scheduler=PNDMScheduler.from_config(SD1_SCHEDULER),
        **NO_SAFETY_CHECKER,
    )


def build_tiny_sd2(out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny SD 2.x pipeline: OpenCLIP-style text encoder (gelu, pad "!"), v-prediction DDIM."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    return _save(
        StableDiffusionPipeline,
        out_dir,
        overwrite,
        {"tokenizer": "!"},
        text_encoder=_text_encoder("gelu"),
        unet=_unet(4, use_linear_projection=True),
        vae=_vae(levels=4, scaling_factor=0.18215, sample_size=256),
        scheduler=DDIMScheduler.from_config(SD2_SCHEDULER),
        **NO_SAFETY_CHECKER,
    )


def build_tiny_sdxl(
    out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False, refiner: bool = False
) -> Path:
    """A tiny SDXL pipeline: two text encoders (the second pooled and projected), micro-conditioning, Euler.

    ``refiner`` builds the second stage instead: only text_encoder_2, an aesthetic score in place of the
    target size (5 time ids), as stabilityai/stable-diffusion-xl-refiner-1.0.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    time_ids = 5 if refiner else 6
    unet = _unet(
        4,
        cross_attention_dim=32 if refiner else 64,  # the encoders' hidden states side by side
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=time_ids * 8 + 32,  # time ids' embeddings + pooled text
    )
    parts = {
        "text_encoder_2": _text_encoder("gelu", projection=True),
        "unet": unet,
        "vae": _vae(levels=4, scaling_factor=0.13025, sample_size=256),
        "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        "add_watermarker": False,
    }
    if refiner:
        return _save(
            StableDiffusionXLImg2ImgPipeline,
            out_dir,
            overwrite,
            {"tokenizer_2": "!"},
            text_encoder=None,
            tokenizer=None,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            **parts,
        )
    return _save(
        StableDiffusionXLPipeline,
        out_dir,
        overwrite,
        {"tokenizer": EOS, "tokenizer_2": "!"},
        text_encoder=_text_encoder("quick_gelu"),
        force_zeros_for_empty_prompt=True,
        **parts,
    )


def build_tiny_lcm(out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny LCM-distilled SD 1.x pipeline: the UNet takes the guidance scale's embedding (timestep_cond)."""
    import torch
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    torch.manual_seed(seed)
    return _save(
        LatentConsistencyModelPipeline,
        out_dir,
        overwrite,
        {"tokenizer": EOS},
        text_encoder=_text_encoder("quick_gelu"),
        unet=_unet(4, time_cond_proj_dim=32),
        vae=_vae(levels=4, scaling_factor=0.18215, sample_size=256),
        scheduler=LCMScheduler.from_config(SD1_SCHEDULER),
        **NO_SAFETY_CHECKER,
    )


def build_tiny_upscaler(out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False) -> Path:
    """A tiny stable-diffusion-x4-upscaler: 7-channel UNet with noise-level class labels, 4x VAE, v-prediction."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline

    torch.manual_seed(seed)
    return _save(
        StableDiffusionUpscalePipeline,
        out_dir,
        overwrite,
        {"tokenizer": "!"},
        text_encoder=_text_encoder("gelu"),
        unet=_unet(7, num_class_embeds=1000),
        vae=_vae(levels=3, scaling_factor=0.08333, sample_size=128),
        low_res_scheduler=DDPMScheduler.from_config(UPSCALER_LOW_RES_SCHEDULER),
        scheduler=DDIMScheduler.from_config(UPSCALER_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        watermarker=None,
        max_noise_level=350,
    )


def build_tiny_controlnet(
    out_dir: str | os.PathLike[str], seed: int = 0, overwrite: bool = False, sdxl: bool = False, pooled: bool = False
) -> Path:
    """A tiny ControlNet for the tiny SD 1.x UNet (``sdxl``: the tiny SDXL base's), as a diffusers folder.

    diffusers starts a ControlNet's output convolutions at zero (its residuals would be zero, and a parity test
    vacuous): here they get seeded random weights. ``pooled`` sets global_pool_conditions (shuffle-style nets).
    """
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:  # as build_tiny_sdxl's UNet
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "use_linear_projection": True,
        }
    controlnet = ControlNetModel(
        in_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=64 if sdxl else 32,
        attention_head_dim=8,
        norm_num_groups=32,
        conditioning_embedding_out_channels=(16, 16, 16, 16),  # three stride-2 convolutions: the VAE's 8x
        global_pool_conditions=pooled,
        **extra,
    )
    with torch.no_grad():
        zero_initialized = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in (*zero_initialized, controlnet.controlnet_cond_embedding.conv_out):
            conv.weight.normal_(0.0, 0.1)
            conv.bias.normal_(0.0, 0.1)
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        controlnet.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)


def build_tiny_taesd(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    overwrite: bool = False,
    taesd_size: bool = False,
    latent_channels: int = 4,
) -> Path:
    """A random-weight diffusers AutoencoderTiny for 8x, 4-channel latents, as a folder (safetensors).

    By default a small one (16 channels, one block per level) for tests; ``taesd_size`` gives TAESD's own
    config (what madebyollin/taesd and taesdxl have: it costs what TAESD costs) for benchmarks.
    """
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    size = (
        {}
        if taesd_size
        else {
            "encoder_block_out_channels": (16,) * 4,
            "decoder_block_out_channels": (16,) * 4,
            "num_encoder_blocks": (1,) * 4,
            "num_decoder_blocks": (1,) * 4,
        }
    )
    vae = AutoencoderTiny(latent_channels=latent_channels, **size)
    with atomic_dir(out_dir, overwrite=overwrite) as staging:
        vae.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)
