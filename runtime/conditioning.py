"""What the UNet is conditioned on besides the latents: text embeddings, SDXL's pooled embedding
and micro-conditioning, an LCM UNet's guidance embedding; and the classifier-free-guidance batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sdtrt.engine.session import TensorSpec
from sdtrt.runtime.runner import NetworkRunner
from sdtrt.runtime.tokenizer import CLIPTokenizer

AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5  # the SDXL refiner's micro-conditioning (diffusers' defaults)


class Conditioner:
    """Encodes prompts with every text encoder of a model and builds the UNet's conditioning inputs."""

    def __init__(
        self,
        tokenizers: Mapping[str, CLIPTokenizer],
        unet_inputs: Mapping[str, TensorSpec],
        force_zeros_for_empty_prompt: bool,
    ) -> None:
        self.tokenizers = dict(tokenizers)  # text encoder -> its tokenizer; SDXL concatenates them in this order
        self.unet_inputs = unet_inputs
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def refiner(self) -> bool:
        """An SDXL refiner: its micro-conditioning carries an aesthetic score instead of the target size."""
        time_ids = self.unet_inputs.get("time_ids")
        return time_ids is not None and time_ids.shape[1] == 5

    @property
    def guidance_embedded(self) -> bool:
        """An LCM-distilled UNet takes the guidance scale as an input and never doubles its batch."""
        return "timestep_cond" in self.unet_inputs

    def encode_prompts(self, runner: NetworkRunner, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Text embeddings: hidden states (N, 77, D) of every text encoder side by side, and the pooled
        (N, P) embedding of the one that has it (SDXL's second), else None."""
        hidden, pooled = [], None
        for network, tokenizer in self.tokenizers.items():
            outputs = runner.run_all(network, input_ids=tokenizer(list(prompts)))
            hidden.append(outputs["hidden_states"])
            pooled = outputs.get("text_embeds", pooled)
        return np.concatenate(hidden, axis=-1), pooled

    def unet_feeds(
        self,
        runner: NetworkRunner,
        prompts: Sequence[str],
        negatives: Sequence[str] | None,
        num_images: int,
        guidance_scale: float,
        cfg: bool,
        height: int,
        width: int,
    ) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs (the text encoders run by ``runner``), each (B, ...) or (2B, ...) with
        the unconditional half first under CFG.

        encoder_hidden_states always; SDXL's pooled text_embeds and time_ids (original size, crop
        origin, then target size or, for the refiner, an aesthetic score); an LCM UNet's timestep_cond.
        """
        hidden, pooled = self.encode_prompts(runner, prompts)
        feeds = {"encoder_hidden_states": hidden}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        if "time_ids" in self.unet_inputs:
            score = (AESTHETIC_SCORE,) if self.refiner else (height, width)
            feeds["time_ids"] = np.array([[height, width, 0, 0, *score]] * len(prompts), dtype=np.float32)
        if self.guidance_embedded:
            size = self.unet_inputs["timestep_cond"].shape[1]
            feeds["timestep_cond"] = guidance_embedding(guidance_scale - 1.0, size, len(prompts))
        feeds = {name: np.repeat(value, num_images, axis=0) for name, value in feeds.items()}
        if not cfg:
            return feeds
        if negatives is None and self.force_zeros_for_empty_prompt:
            negative = {name: np.zeros_like(value) for name, value in feeds.items() if name != "time_ids"}
        else:
            hidden, pooled = self.encode_prompts(runner, negatives or [""] * len(prompts))
            negative = {"encoder_hidden_states": np.repeat(hidden, num_images, axis=0)}
            if pooled is not None:
                negative["text_embeds"] = np.repeat(pooled, num_images, axis=0)
        if "time_ids" in feeds:
            negative["time_ids"] = feeds["time_ids"].copy()
            if self.refiner:
                negative["time_ids"][:, 4] = NEGATIVE_AESTHETIC_SCORE
        return {name: np.concatenate([negative[name], value]) for name, value in feeds.items()}


def guidance_embedding(w: float, size: int, count: int) -> np.ndarray:
    """(count, size) float32 sinusoidal embedding of an LCM UNet's guidance input w = guidance_scale - 1.

    As diffusers' get_guidance_scale_embedding: w * 1000 through sin/cos at geometric frequencies.
    """
    half = size // 2
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)  # float32 throughout, as torch computes it
    frequencies = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = np.float32(w * 1000.0) * frequencies
    embedding = np.concatenate([np.sin(angles), np.cos(angles)])
    if size % 2:
        embedding = np.append(embedding, np.float32(0))
    return np.tile(embedding.astype(np.float32), (count, 1))
