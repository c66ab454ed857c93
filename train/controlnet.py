"""Train a tiny ControlNet for the demo model: ``python -m train.controlnet --out export/assets/tiny-controlnet``.

Its control image is a scene's semantic map (train.shapes.semantic_map): black, with the shape's
region painted in its kind's colour (circle red, square green, triangle blue). The map says where
the shape is, how large and which kind; the prompt says its colours ("a red circle on a blue
background"). The ControlNet starts as a copy of the demo UNet's encoder (ControlNetModel.from_unet)
and learns, with the demo model (text encoder, UNet, VAE) frozen, to steer it by the map. The data
set's shapes sit anywhere in the middle half of the image (shapes.sample_free_scene), not only at
the five named places. The weights are saved as a float16 diffusers folder with training.json; the
same seed and thread count give the same weights.

``--maps FOLDER`` also writes the example maps (EXAMPLE_MAPS) as PNGs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from sdtrt.demo import DEMO_GUIDANCE
from sdtrt.engine.fsutil import atomic_dir, write_json_atomic
from train import script, shapes, tiny

log = logging.getLogger("train.controlnet")

# (kind, size, centre x, centre y): the example maps shipped with the package, by file name
EXAMPLE_MAPS = {
    "circle-top-left": ("circle", "large", 0.32, 0.32),
    "square-bottom-right": ("square", "large", 0.68, 0.66),
    "triangle-center": ("triangle", "large", 0.5, 0.5),
    "small-circle-right": ("circle", "small", 0.72, 0.45),
}


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    threads: int = 1
    base: str = "export/assets/tiny-sd"  # the demo model the ControlNet steers (frozen)
    images: int = 10_000  # the data set: scenes drawn once from the seed
    steps: int = 2_000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    empty_caption_rate: float = 0.1  # classifier-free guidance dropout (the map stays)
    snr_gamma: float = 5.0  # min-SNR loss weights, as the demo model's (train.tiny.Denoising, on the base's schedule)
    snr_floor: float = 0.2
    ema_decay: float = 0.998


def load_base(base: Path) -> tuple[AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel]:
    """The demo model's networks in float32, frozen."""
    networks = (
        AutoencoderKL.from_pretrained(base / "vae", torch_dtype=torch.float32),
        CLIPTextModel.from_pretrained(base / "text_encoder", torch_dtype=torch.float32),
        UNet2DConditionModel.from_pretrained(base / "unet", torch_dtype=torch.float32),
    )
    for network in networks:
        network.eval().requires_grad_(False)
    vae, text_encoder, unet = networks
    return vae, text_encoder, CLIPTokenizer.from_pretrained(base / "tokenizer"), unet


def build_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """The UNet's encoder and middle block, copied, with a small map encoder (64x64 map -> 8x8 features)."""
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64, 64))


def map_tensor(maps: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [0, 1], as diffusers' ControlNet pipelines feed control images."""
    return torch.from_numpy(maps).permute(0, 3, 1, 2).float().div(255.0)


class CaptionStates:
    """The frozen text encoder's hidden states of captions, (B, 77, 64), each distinct caption computed once."""

    def __init__(self, text_encoder: CLIPTextModel, tokenizer_dir: Path) -> None:
        self._text_encoder = text_encoder
        self._ids = tiny.CaptionIds(tokenizer_dir)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        missing = sorted(set(captions) - set(self._cache))
        if missing:
            states = self._text_encoder(self._ids(missing), return_dict=False)[0]
            self._cache.update(zip(missing, states, strict=True))
        return torch.stack([self._cache[c] for c in captions])


def train_controlnet(
    controlnet: ControlNetModel,
    unet: UNet2DConditionModel,
    captions: CaptionStates,
    denoising: tiny.Denoising,
    scenes: Sequence[shapes.Scene],
    maps: np.ndarray,
    s: Settings,
    rng: np.random.Generator,
) -> float:
    """Train ``controlnet`` to steer the frozen ``unet`` on ``denoising``'s noised latents of ``scenes``; leaves the
    EMA weights in it, returns the loss."""
    params = list(controlnet.parameters())
    ema = tiny.Ema(params, s.ema_decay)
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: tiny.lr_factor(i, s.steps, s.warmup))
    controlnet.train()
    avg = float("nan")
    batches = tiny.batches(rng, len(scenes), s.batch, s.steps)
    for step, indices in enumerate(tqdm(batches, total=s.steps, desc="controlnet", mininterval=10)):
        texts = ["" if rng.random() < s.empty_caption_rate else shapes.sample_caption(scenes[i], rng) for i in indices]
        hidden = captions(texts)  # (B, 77, 64)
        noisy, target, t = denoising.noised(indices)  # (B, 4, 8, 8), (B, 4, 8, 8), (B,)
        down, mid = controlnet(noisy, t, hidden, controlnet_cond=map_tensor(maps[indices]), return_dict=False)
        pred = unet(
            noisy, t, hidden, down_block_additional_residuals=down, mid_block_additional_residual=mid, return_dict=False
        )[0]
        avg = tiny.optimizer_step(denoising.loss(pred, target, t), opt, params, sched, ema, step, avg)
    ema.copy_to_params()
    controlnet.eval()
    return avg


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(out: Path, s: Settings, overwrite: bool = False) -> Path:
    """Train the ControlNet for the demo model ``s.base`` and save the diffusers folder ``out`` (float16)."""
    script.set_up_torch(s.threads, s.seed)
    rng = np.random.default_rng([s.seed, 2])  # scenes, batches, captions
    started = time.perf_counter()
    base = Path(s.base)
    vae, text_encoder, _, unet = load_base(base)
    scenes = [shapes.sample_free_scene(rng) for _ in range(s.images)]
    images = np.stack([shapes.render(scene) for scene in scenes])  # (N, 64, 64, 3) uint8
    maps = np.stack([shapes.semantic_map(scene) for scene in scenes])  # (N, 64, 64, 3) uint8
    mean, std = tiny.encode_latents(vae, images)
    scale = vae.config.scaling_factor
    controlnet = build_controlnet(unet)
    captions = CaptionStates(text_encoder, base / "tokenizer")
    # the base's own noise schedule and prediction type (the shipped demo model: v at zero terminal SNR)
    denoising = tiny.Denoising((mean * scale, std * scale), s, DDPMScheduler.load_config(base / "scheduler"))
    loss = train_controlnet(controlnet, unet, captions, denoising, scenes, maps, s, rng)
    seconds = time.perf_counter() - started
    log.info("controlnet: loss %.4f; trained in %.0f s", loss, seconds)
    report = {
        "settings": asdict(s),
        "base_unet_sha256": _sha256(base / "unet" / "diffusion_pytorch_model.safetensors"),
        "map_colours": shapes.MAP_COLOURS,
        "denoiser_loss": loss,
        "seconds": {"total": round(seconds)},
        **script.report_machine(s.threads),
    }
    with atomic_dir(out, overwrite=overwrite) as staging:
        controlnet.half().save_pretrained(staging, safe_serialization=True)
        write_json_atomic(staging / "training.json", report)
    return out


def write_example_maps(folder: Path) -> list[Path]:
    """EXAMPLE_MAPS as 64x64 RGB PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (kind, size, cx, cy) in EXAMPLE_MAPS.items():
        scene = shapes.Scene(kind, "white", "black", size, shapes.nearest_position(cx, cy), cx, cy)
        Image.fromarray(shapes.semantic_map(scene)).save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return paths


def diffusers_drawer(
    base: Path, controlnet: Path, steps: int = 20, guidance: float = DEMO_GUIDANCE
) -> Callable[[np.ndarray, str, int], np.ndarray]:
    """draw(map, prompt, seed) -> (64, 64, 3) uint8 through diffusers' StableDiffusionControlNetPipeline (float32)."""
    vae, text_encoder, tokenizer, unet = load_base(base)
    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=ControlNetModel.from_pretrained(controlnet, torch_dtype=torch.float32),
        scheduler=DDIMScheduler.from_pretrained(base / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def draw(control: np.ndarray, prompt: str, seed: int) -> np.ndarray:
        height, width = control.shape[:2]
        image = pipe(
            prompt,
            image=Image.fromarray(control),
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]  # (H, W, 3) float32 in [0, 1]
        return np.round(image * 255).astype(np.uint8)

    return draw


def main(argv: Sequence[str] | None = None) -> None:
    parser = script.settings_parser("python -m train.controlnet", __doc__.split("\n\n")[0], Settings())
    parser.add_argument("--maps", type=Path, help="also write the example maps (PNG) into this folder")
    out, overwrite, args = script.parse_settings(parser, argv)
    maps = args.pop("maps")
    if not (Path(args["base"]) / "unet").is_dir():
        parser.error(f"{args['base']} is not a demo model folder (no unet/)")
    if maps:
        log.info("wrote %d example maps to %s", len(write_example_maps(maps)), maps)
    train(out, Settings(**args), overwrite=overwrite)
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()
