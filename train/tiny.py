"""Train the tiny embedded demo model on the shapes data set: ``python -m train.tiny --out export/assets/tiny-sd``.

A Stable Diffusion 1.x-architecture pipeline, small enough to train on a CPU in an hour or two:
CLIP text encoder (the real 49408-id CLIP BPE vocabulary), a 4-level AutoencoderKL (8x down-sampling,
4 latent channels) and a 3-level UNet2DConditionModel. Images are 64x64 pixels, latents 8x8; the
UNet's innermost level works on 2x2 latents, where the zero padding of the convolutions tells each
cell which quadrant it is (a UNet has no positional encoding of its own).

The noise schedule is SD 1.x's betas rescaled to zero terminal SNR, with v-prediction and "trailing"
timesteps (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", 2023; diffusers'
``rescale_betas_zero_snr``), and the model ships with that scheduler config. On SD 1.x's own schedule
the most-noised training latents still hold 7 % of the picture: on 8x8 latents enough to see where
the shape is, so the model learned to read the place from that trace instead of from the words, and
at inference, which starts from pure noise, the noise decided where the shape went (the place came
out right 20 % of the time, chance). At zero terminal SNR the last step holds nothing of the picture,
so the place, like the colours, can only come from the caption. Draw the model at low guidance
(sdtrt.demo.DEMO_GUIDANCE, 1.5): stronger guidance rounds its squares into circles (README "The demo model").

Two stages, both seeded:
1. the VAE learns to reconstruct the shapes images (MSE + a small KL term); ``--vae-from FOLDER``
   keeps a trained model's VAE instead;
2. the text encoder and the UNet learn together, from scratch, to predict v of noised latents of the
   VAE as it is saved (float16 weights), with min-SNR loss weights (a floor keeps the pure-noise steps,
   where the caption is all there is, in the loss), 10 % empty captions (so classifier-free guidance
   works) and an exponential moving average of the weights, which is what is saved. The VAE's scaling
   factor is set so that the scaled latents have unit standard deviation, as SD's 0.18215 was chosen.
   This stage has its own seeds, so a VAE trained in stage 1 and the same VAE kept with ``--vae-from``
   give the same weights.

The saved weights are float16 safetensors (the package stays small); diffusers and transformers
load them back, and the exporter casts every network to float32. The same seed and thread count
give the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from sdtrt.engine.fsutil import atomic_dir, write_json_atomic
from sdtrt.export.clip_vocab import write_clip_tokenizer
from sdtrt.export.tiny import CLIP_VOCAB_SIZE, SD1_SCHEDULER, TEXT_MAX_LENGTH
from sdtrt.runtime.tokenizer import CLIPTokenizer
from train import script, shapes

log = logging.getLogger("train.tiny")

TEXT_HIDDEN = 64  # CLIP text width = the UNet's cross-attention width
# the schedule the model learns and ships with: SD 1.x's betas at zero terminal SNR, v-prediction (see above)
DEMO_SCHEDULER = {
    **SD1_SCHEDULER,
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    threads: int = 1
    images: int = 40_000  # the data set: scenes drawn once from the seed
    vae_from: str = ""  # a trained tiny-sd folder whose VAE to keep (stage 1 skipped); "": train one
    unet_levels: int = 3  # 8x8, 4x4 and 2x2 latents; 2: the first two only
    vae_steps: int = 2_000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    unet_steps: int = 6_000
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 200
    empty_caption_rate: float = 0.1  # classifier-free guidance dropout
    snr_gamma: float = 5.0  # min-SNR loss weighting: the x0 error counts at most this much ...
    snr_floor: float = 0.1  # ... and at least this much (see Denoising; README: 0.1 beat 0.2, 0.5 and 1)
    ema_decay: float = 0.999


def build_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=TEXT_MAX_LENGTH,
            hidden_act="quick_gelu",
            projection_dim=TEXT_HIDDEN,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        sample_size=shapes.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),  # four levels: 8x down-sampling, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
    )


def build_unet(levels: int = 3) -> UNet2DConditionModel:
    """The demo UNet: two cross-attention levels (8x8, 4x4 latents) and a plain one on 2x2 (``levels=2``: not that)."""
    if levels not in (2, 3):
        raise ValueError(f"the demo UNet has 2 or 3 levels, not {levels}")
    inner = ("DownBlock2D",), ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=shapes.IMAGE_SIZE // 8,  # latent pixels
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64)[:levels],
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D") + inner[0] * (levels - 2),
        up_block_types=inner[1] * (levels - 2) + ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,  # diffusers reads this as the number of heads: 2 wide heads run faster than 8 thin
        norm_num_groups=32,
    )


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def batches(rng: np.random.Generator, count: int, batch: int, steps: int) -> Iterator[np.ndarray]:
    for _ in range(steps):
        yield rng.integers(0, count, size=batch)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vae(vae: AutoencoderKL, images: np.ndarray, s: Settings, rng: np.random.Generator) -> float:
    """Fit the VAE to ``images`` (N, H, W, 3) uint8; returns the last mean-squared reconstruction error."""
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, s.vae_steps, s.warmup))
    vae.train()
    mse = float("nan")
    bar = tqdm(batches(rng, len(images), s.vae_batch, s.vae_steps), total=s.vae_steps, desc="vae", mininterval=10)
    for indices in bar:
        x = to_tensor(images[indices])  # (B, 3, 64, 64) float32
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss_mse = torch.nn.functional.mse_loss(recon, x)
        descend(loss_mse + s.vae_kl_weight * posterior.kl().mean() / x[0].numel(), opt, vae.parameters(), sched)
        mse = running_average(mse, loss_mse.item())
        bar.set_postfix(mse=f"{mse:.5f}", refresh=False)
    vae.eval()
    return mse


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation, each (N, 4, H/8, W/8) float32, unscaled."""
    means, stds = [], []
    for start in tqdm(range(0, len(images), batch), desc="encode", mininterval=10):
        posterior = vae.encode(to_tensor(images[start : start + batch])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


class CaptionIds:
    """Token ids of captions, exactly as the runtime tokenizes prompts; each distinct caption once."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self._tokenizer = CLIPTokenizer.from_dir(tokenizer_dir)
        self._cache: dict[str, np.ndarray] = {}

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = [c for c in set(captions) if c not in self._cache]
        if missing:
            self._cache.update(zip(missing, self._tokenizer(missing), strict=True))
        return torch.from_numpy(np.stack([self._cache[c] for c in captions])).long()  # (B, 77) int64


class Denoising:
    """Noised posterior samples of the latents and their loss-weighted error, on a scheduler config's noise schedule
    and for its prediction type: epsilon (the noise) or v_prediction (DEMO_SCHEDULER's)."""

    def __init__(
        self, latents: tuple[torch.Tensor, torch.Tensor], s: Settings, scheduler_config: Mapping[str, Any]
    ) -> None:
        self.mean, self.std = latents  # (N, 4, 8, 8) each, already scaled
        self.schedule = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.schedule.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"the demo models predict epsilon or v, not {self.prediction_type!r}")
        alphas_cumprod = self.schedule.alphas_cumprod  # (1000,) float32; at zero terminal SNR the last one is 0
        # The epsilon loss is snr times the x0 loss, the v loss (snr + 1) times. Min-SNR caps the x0 weight at
        # gamma (the easy, low-noise steps); the floor keeps it up at the noisiest steps, where the picture's
        # colours and the shape's place and kind can only come from the text (or the control image).
        snr = alphas_cumprod / (1 - alphas_cumprod)
        to_x0 = snr if self.prediction_type == "epsilon" else snr + 1
        self.loss_weight = torch.clamp(snr, min=s.snr_floor, max=s.snr_gamma) / to_x0

    def noised(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(noisy latents, target: the noise or v) (B, 4, 8, 8) each and timesteps (B,) for the data set's latents
        ``indices``."""
        index = torch.from_numpy(indices)
        x0 = self.mean[index] + self.std[index] * torch.randn_like(self.mean[index])  # a posterior sample
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(self.loss_weight), (len(indices),))
        target = noise if self.prediction_type == "epsilon" else self.schedule.get_velocity(x0, noise, t)
        return self.schedule.add_noise(x0, noise, t), target, t

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (self.loss_weight[t] * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()


class Ema:
    """An exponential moving average of ``params``, with a short memory early on, while the weights move fast."""

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float) -> None:
        self.params = list(params)
        self.decay = decay
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for p, average in zip(self.params, self.average, strict=True):
            p.copy_(average)


def optimizer_step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    sched: torch.optim.lr_scheduler.LRScheduler,
    ema: Ema,
    step: int,
    avg: float,
) -> float:
    """One step of training on ``loss`` (descend, then the EMA); returns the loss's running average after ``avg``."""
    descend(loss, opt, params, sched)
    ema.update(step)
    return running_average(avg, loss.item())


def descend(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """One optimizer step on ``loss``: gradients clipped to norm 1, then the learning-rate schedule's step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def running_average(avg: float, value: float) -> float:
    """An exponential running average (0.98) of a loss; ``avg`` nan at first."""
    return 0.98 * avg + 0.02 * value if math.isfinite(avg) else value


def train_denoiser(
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    latents: tuple[torch.Tensor, torch.Tensor],
    scenes: Sequence[shapes.Scene],
    caption_ids: CaptionIds,
    s: Settings,
    rng: np.random.Generator,
) -> float:
    """Train text encoder + UNet on v-prediction; leaves the EMA weights in the modules, returns the loss."""
    denoising = Denoising(latents, s, DEMO_SCHEDULER)
    params = [*text_encoder.parameters(), *unet.parameters()]
    ema = Ema(params, s.ema_decay)
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, s.unet_steps, s.warmup))
    text_encoder.train()
    unet.train()
    avg = float("nan")
    bar = tqdm(batches(rng, len(scenes), s.unet_batch, s.unet_steps), total=s.unet_steps, desc="unet", mininterval=10)
    for step, indices in enumerate(bar):
        captions = [
            "" if rng.random() < s.empty_caption_rate else shapes.sample_caption(scenes[i], rng) for i in indices
        ]
        ids = caption_ids(captions)  # (B, 77)
        noisy, target, t = denoising.noised(indices)
        hidden = text_encoder(ids, return_dict=False)[0]  # (B, 77, 64)
        pred = unet(noisy, t, hidden, return_dict=False)[0]
        avg = optimizer_step(denoising.loss(pred, target, t), opt, params, sched, ema, step, avg)
        bar.set_postfix(loss=f"{avg:.4f}", refresh=False)
    ema.copy_to_params()
    text_encoder.eval()
    unet.eval()
    return avg


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    report: dict,
    overwrite: bool = False,
) -> None:
    """Save a diffusers StableDiffusionPipeline folder with float16 weights, plus training.json."""
    with atomic_dir(out, overwrite=overwrite) as staging:
        write_clip_tokenizer(staging / "tokenizer", TEXT_MAX_LENGTH)
        pipe = StableDiffusionPipeline(
            vae=vae.half(),
            text_encoder=text_encoder.half(),
            tokenizer=HFCLIPTokenizer.from_pretrained(staging / "tokenizer"),
            unet=unet.half(),
            scheduler=DDIMScheduler.from_config(DEMO_SCHEDULER),  # DDIM draws it best (README)
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging, safe_serialization=True)
        # transformers re-saves the tokenizer with a 3.6 MB tokenizer.json; keep CLIP's own files only
        shutil.rmtree(staging / "tokenizer")
        write_clip_tokenizer(staging / "tokenizer", TEXT_MAX_LENGTH)
        write_json_atomic(staging / "training.json", report)


def _trained_vae_mse(folder: Path) -> float | None:
    """The VAE's reconstruction error as the folder's training.json records it, if it does."""
    report = folder / "training.json"
    return json.loads(report.read_text(encoding="utf-8")).get("vae_mse") if report.is_file() else None


def train(out: Path, s: Settings, overwrite: bool = False) -> Path:
    """Train both stages (or the second on ``s.vae_from``'s VAE) and save the diffusers folder ``out``."""
    script.set_up_torch(s.threads, s.seed)
    started = time.perf_counter()
    log.info("drawing %d scenes", s.images)
    scenes, images = shapes.make_dataset(s.images, s.seed)

    # the networks draw their initial weights from the seed in the order they are built
    vae, text_encoder, unet = build_vae(), build_text_encoder(), build_unet(s.unet_levels)
    if s.vae_from:
        # its weights into the VAE built above: a loaded model would save its source path into vae/config.json
        vae.load_state_dict(
            AutoencoderKL.from_pretrained(Path(s.vae_from) / "vae", torch_dtype=torch.float32).state_dict()
        )
        vae_mse = _trained_vae_mse(Path(s.vae_from))
    else:
        vae_mse = train_vae(vae, images, s, np.random.default_rng([s.seed, 1]))
    vae = vae.half().float().eval().requires_grad_(False)  # the VAE as it is saved: float16 weights
    mean, std = encode_latents(vae, images)
    scaling_factor = float(1.0 / mean.std())  # scaled latents have unit standard deviation
    vae.register_to_config(scaling_factor=scaling_factor)
    vae_seconds = time.perf_counter() - started
    log.info("vae: mse %s, scaling factor %.4f, %.0f s", vae_mse, scaling_factor, vae_seconds)

    torch.manual_seed(s.seed + 1)  # stage 2's own seeds: the same whether stage 1 ran or not
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp), TEXT_MAX_LENGTH)
        caption_ids = CaptionIds(Path(tmp))
        latents = (mean * scaling_factor, std * scaling_factor)
        rng = np.random.default_rng([s.seed, 3])  # batches, captions
        loss = train_denoiser(text_encoder, unet, latents, scenes, caption_ids, s, rng)
    seconds = time.perf_counter() - started
    log.info("unet: loss %.4f; trained in %.0f s", loss, seconds)

    report = {
        "settings": asdict(s),
        "vae_mse": vae_mse,
        "vae_scaling_factor": scaling_factor,
        "denoiser_loss": loss,
        "seconds": {"vae": round(vae_seconds), "total": round(seconds)},
        **script.report_machine(s.threads),
    }
    save_pipeline(out, vae, text_encoder, unet, report, overwrite=overwrite)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = script.settings_parser("python -m train.tiny", __doc__.split("\n\n")[0], Settings())
    out, overwrite, args = script.parse_settings(parser, argv)
    if args["vae_from"] and not (Path(args["vae_from"]) / "vae").is_dir():
        parser.error(f"{args['vae_from']} is not a demo model folder (no vae/)")
    train(out, Settings(**args), overwrite=overwrite)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
