"""Distil a tiny VAE for the demo model: ``python -m train.tiny_vae --out export/assets/tiny-vae``.

A diffusers ``AutoencoderTiny`` (TAESD's design: plain convolutions, no attention, no normalisation) learns to do
what the demo model's own VAE (an AutoencoderKL, export/assets/tiny-sd/vae, frozen) does, on the latents and
pictures the demo model sees:

- its decoder reproduces the full decoder's picture from the UNet's latents: posterior samples of the shapes
  world's pictures (train/shapes.py) and latents the demo UNet itself draws from random captions (DDIM, 20 steps,
  the demo's guidance);
- its encoder reproduces the full encoder's posterior mean (img2img and inpainting with ``vae="tiny"``).

As TAESD, it works on the latents as the UNet sees them: its ``scaling_factor`` is 1, so its decoder takes the
full VAE's latents times the full VAE's scaling factor and its encoder returns them (``latent_magnitude`` 3 and
``latent_shift`` 0.5, diffusers' defaults, only matter to ``AutoencoderTiny.forward``'s byte rounding: the
scaled latents have unit standard deviation). The folder is what ``sdtrt add-tiny-vae`` takes as it is:
config.json and float16 safetensors (under 1 MB), plus training.json with the settings and the errors.
The same seed and thread count give the same weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny, StableDiffusionPipeline
from tqdm.auto import tqdm

from sdtrt.demo import DEMO_GUIDANCE
from sdtrt.engine.fsutil import atomic_dir, write_json_atomic
from train import script, shapes, tiny

log = logging.getLogger("train.tiny_vae")


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    threads: int = 1
    base: str = "export/assets/tiny-sd"  # the demo model whose VAE to distil (frozen)
    images: int = 8_000  # shapes pictures drawn from the seed; their posterior samples train the decoder too
    generated: int = 1_024  # latents the demo UNet draws from random captions (the decoder's other half)
    held_out: int = 256  # of each, kept out of training to measure the errors
    channels: int = 16  # every level's width, encoder and decoder (AutoencoderTiny keeps one width)
    encoder_blocks: str = "1,1,1,1"  # AutoencoderTinyBlocks per level
    decoder_blocks: str = "1,2,2,1"
    steps: int = 2_000
    batch: int = 32
    lr: float = 2e-3
    warmup: int = 100


def _blocks(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def build_tiny_vae(s: Settings, latent_channels: int) -> AutoencoderTiny:
    """TAESD's design, narrower: four levels (8x up- and down-sampling), ``s.channels`` wide, scaling factor 1."""
    return AutoencoderTiny(
        latent_channels=latent_channels,
        encoder_block_out_channels=(s.channels,) * 4,
        decoder_block_out_channels=(s.channels,) * 4,
        num_encoder_blocks=_blocks(s.encoder_blocks),
        num_decoder_blocks=_blocks(s.decoder_blocks),
        scaling_factor=1.0,  # the UNet's latents in and out, as TAESD
    )


@torch.no_grad()
def drawn_latents(base: Path, count: int, seed: int, batch: int = 64) -> torch.Tensor:
    """(count, 4, 8, 8): what the demo UNet draws (scaled, as it hands them to a VAE) from random captions."""
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([seed, 5])
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in tqdm(range(0, count, batch), desc="draw", mininterval=10):
        captions = [shapes.sample_caption(shapes.sample_scene(rng), rng) for _ in range(min(batch, count - start))]
        result = pipe(
            captions,
            num_inference_steps=20,
            guidance_scale=DEMO_GUIDANCE,
            generator=generator,
            output_type="latent",
        )
        out.append(result.images)
    return torch.cat(out)


@torch.no_grad()
def decoded(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The full VAE's pictures of the UNet's ``latents``, in [-1, 1] (clipped: the runtime clips too)."""
    scale = vae.config.scaling_factor
    parts = [vae.decode(latents[i : i + batch] / scale).sample for i in range(0, len(latents), batch)]
    return torch.cat(parts).clamp(-1, 1)


@dataclass
class Data:
    """Training and held-out pairs: (latents, the full decoder's pictures) and (pictures, the full encoder's
    latents), the latents in the UNet's scale."""

    latents: torch.Tensor
    decoded: torch.Tensor
    pictures: torch.Tensor
    encoded: torch.Tensor

    def split(self, held_out: int) -> tuple[Data, Data]:
        """(training, held out): the last ``held_out`` of each kind of latent and of the pictures."""
        return self._rows(slice(None, -held_out)), self._rows(slice(-held_out, None))

    def _rows(self, rows: slice) -> Data:
        return Data(self.latents[rows], self.decoded[rows], self.pictures[rows], self.encoded[rows])


def make_data(vae: AutoencoderKL, s: Settings) -> tuple[Data, Data]:
    """The shapes pictures with their posterior samples, and the demo UNet's own latents: (training, held out)."""
    _, images = shapes.make_dataset(s.images, s.seed)
    mean, std = tiny.encode_latents(vae, images)
    scale = vae.config.scaling_factor
    sampled = (mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(s.seed))) * scale
    drawn = drawn_latents(Path(s.base), s.generated, s.seed)
    pictures = tiny.to_tensor(images)
    train_enc, held_enc = Data(sampled, decoded(vae, sampled), pictures, mean * scale).split(s.held_out)
    train_drawn, held_drawn = drawn[: -s.held_out], drawn[-s.held_out :]
    train = Data(
        torch.cat([train_enc.latents, train_drawn]),
        torch.cat([train_enc.decoded, decoded(vae, train_drawn)]),
        train_enc.pictures,
        train_enc.encoded,
    )
    held = Data(
        torch.cat([held_enc.latents, held_drawn]),
        torch.cat([held_enc.decoded, decoded(vae, held_drawn)]),
        held_enc.pictures,
        held_enc.encoded,
    )
    return train, held


def distil(student: AutoencoderTiny, data: Data, s: Settings, rng: np.random.Generator) -> float:
    """Fit ``student``'s decoder to the full decoder's pictures and its encoder to the full encoder's latents (mean
    squared errors, summed); returns the loss's running average."""
    opt = torch.optim.AdamW(student.parameters(), lr=s.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: tiny.lr_factor(i, s.steps, s.warmup))
    student.train()
    avg = float("nan")
    for _ in tqdm(range(s.steps), desc="tiny vae", mininterval=10):
        rows = torch.from_numpy(rng.integers(0, len(data.latents), size=s.batch))
        pictures = torch.from_numpy(rng.integers(0, len(data.pictures), size=s.batch))
        mse = torch.nn.functional.mse_loss
        decoder_loss = mse(student.decode(data.latents[rows]).sample, data.decoded[rows])
        loss = decoder_loss + mse(student.encode(data.pictures[pictures]).latents, data.encoded[pictures])
        tiny.descend(loss, opt, student.parameters(), sched)
        avg = tiny.running_average(avg, loss.item())
    student.eval()
    return avg


@torch.no_grad()
def errors(student: AutoencoderTiny, held: Data, s: Settings) -> dict[str, float]:
    """Held-out mean squared errors against the full VAE: the decoder's pictures (in [-1, 1]) on the shapes
    pictures' latents and on the UNet's own, and the encoder's latents (unit standard deviation)."""
    pictures = student.decode(held.latents).sample.clamp(-1, 1)
    error = (pictures - held.decoded).pow(2).mean(dim=(1, 2, 3))
    latents = student.encode(held.pictures).latents
    return {
        "decoder_mse_shapes": float(error[: s.held_out].mean()),
        "decoder_mse_drawn": float(error[s.held_out :].mean()),
        "encoder_mse": float((latents - held.encoded).pow(2).mean()),
    }


def train(out: Path, s: Settings, overwrite: bool = False) -> Path:
    """Distil the demo VAE of ``s.base`` into an AutoencoderTiny and save it as a diffusers folder ``out``."""
    script.set_up_torch(s.threads, s.seed)
    started = time.perf_counter()
    vae = AutoencoderKL.from_pretrained(Path(s.base) / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
    train_data, held = make_data(vae, s)
    data_seconds = time.perf_counter() - started
    log.info("data: %d latents, %d pictures, %.0f s", len(train_data.latents), len(train_data.pictures), data_seconds)

    torch.manual_seed(s.seed + 1)  # the student's initial weights
    student = build_tiny_vae(s, vae.config.latent_channels)
    loss = distil(student, train_data, s, np.random.default_rng([s.seed, 7]))
    student = student.half().float()  # measured as it is saved: float16 weights
    report = {
        "settings": asdict(s),
        "loss": loss,
        "held_out": errors(student, held, s),
        "parameters": sum(p.numel() for p in student.parameters()),
        "seconds": {"data": round(data_seconds), "total": round(time.perf_counter() - started)},
        **script.report_machine(s.threads),
    }
    log.info("held-out errors %s; %s s", report["held_out"], report["seconds"]["total"])
    with atomic_dir(out, overwrite=overwrite) as staging:
        student.half().save_pretrained(staging, safe_serialization=True)
        write_json_atomic(staging / "training.json", report)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = script.settings_parser("python -m train.tiny_vae", __doc__.split("\n\n")[0], Settings())
    out, overwrite, args = script.parse_settings(parser, argv)
    if not (Path(args["base"]) / "vae").is_dir():
        parser.error(f"{args['base']} is not a demo model folder (no vae/)")
    train(out, Settings(**args), overwrite=overwrite)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
