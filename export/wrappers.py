"""The networks of a Stable Diffusion pipeline as exportable torch modules, each with one frozen spec.

A NetworkSpec declares a network's inputs and outputs (names, dtypes, shapes with named dynamic
dimensions); the ONNX export, the manifest and the engines all read it, so the views cannot drift.
The ranges of the dynamic dimensions are the engine's (engine/profiles.py); a spec only holds the
example sizes the ONNX trace runs at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sdtrt.engine.session import TensorSpec


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]  # fp32 dtypes; the fp16 variant converts the float ones but keep_fp32
    outputs: tuple[TensorSpec, ...]
    trace_dims: dict[str, int]  # dynamic dimension -> its size in the example inputs the ONNX trace runs
    keep_fp32: tuple[str, ...] = ()  # inputs that stay float32 in the fp16 variant
    # int32 input -> how many values it may take (the size of the table it indexes: the text encoder's
    # vocabulary, the upscaler's noise-level classes), from the model's config: the trace stays below it
    id_counts: dict[str, int] = field(default_factory=dict)

    def example_inputs(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs at the ``trace_dims`` shape (used to trace the export); ids below ``id_counts``."""
        tensors = []
        for spec in self.inputs:
            shape = spec.bind(self.trace_dims)
            if spec.dtype == "int32":  # token ids, noise levels
                high = self.id_counts[spec.name]
                tensors.append(torch.randint(0, high, shape, dtype=torch.int32, generator=generator))
            elif spec.name == "timestep":
                tensors.append(torch.full(shape, 981.0))
            else:
                tensors.append(torch.randn(shape, generator=generator))
        return tuple(tensors)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            spec.name: {axis: dim for axis, dim in enumerate(spec.shape) if isinstance(dim, str)}
            for spec in self.inputs + self.outputs
        }

    def io_specs(self, precision: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """Inputs and outputs as stored at ``precision`` ("fp32" or "fp16")."""

        def at(spec: TensorSpec) -> TensorSpec:
            if precision == "fp16" and spec.dtype == "float32" and spec.name not in self.keep_fp32:
                return TensorSpec(spec.name, "float16", spec.shape)
            return spec

        return tuple(map(at, self.inputs)), tuple(map(at, self.outputs))


@dataclass(frozen=True)
class TextEncoderGeometry:
    """One text encoder: its component name, hidden size, and the pooled projection it adds (SDXL's second)."""

    name: str  # "text_encoder" | "text_encoder_2"
    hidden_size: int
    hidden_layer: str  # "last" (SD 1.x/2.x: final layer, layer-normed) | "penultimate" (SDXL)
    vocab_size: int  # token ids run from 0 to vocab_size - 1 (CLIP's 49408; custom tokenizers fewer)
    pooled_size: int | None = None  # SDXL's text_encoder_2: the projected pooled embedding


@dataclass(frozen=True)
class Geometry:
    """The sizes the specs are built from, read from the model's configs."""

    text_max_length: int
    text_encoders: tuple[TextEncoderGeometry, ...]
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel, per side
    size_multiple: int  # image height/width must be multiples of this
    default_size: int  # pixels, per side
    unet_in_channels: int = 4  # 4; 9 for inpainting models (+ mask + masked image); 7 for the x4 upscaler
    # the x4 upscaler's UNet takes the noise level as a class label: how many classes it embeds (else None)
    unet_class_labels: int | None = None
    time_ids: int = 0  # SDXL: 6 micro-conditioning numbers (sizes and crop), 5 for the refiner
    time_cond_size: int | None = None  # LCM-distilled UNets: the guidance-scale embedding's width

    @property
    def context_size(self) -> int:
        """The UNet's cross-attention width: the text encoders' hidden states side by side."""
        return sum(t.hidden_size for t in self.text_encoders)

    @property
    def latent_size(self) -> int:
        """The latent side of the native image size."""
        return self.default_size // self.vae_scale_factor


def text_encoder_spec(g: Geometry, encoder: TextEncoderGeometry) -> NetworkSpec:
    outputs = [TensorSpec("hidden_states", "float32", ("batch", g.text_max_length, encoder.hidden_size))]
    if encoder.pooled_size is not None:
        outputs.append(TensorSpec("text_embeds", "float32", ("batch", encoder.pooled_size)))
    return NetworkSpec(
        name=encoder.name,
        inputs=(TensorSpec("input_ids", "int32", ("batch", g.text_max_length)),),
        outputs=tuple(outputs),
        trace_dims={"batch": 2},
        id_counts={"input_ids": encoder.vocab_size},
    )


def unet_spec(g: Geometry) -> NetworkSpec:
    latent = ("batch", g.latent_channels, "latent_height", "latent_width")
    side = g.latent_size
    inputs = [
        # latents, then any conditioning channels (mask + masked-image latents, or the low-res image)
        TensorSpec("sample", "float32", ("batch", g.unet_in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", g.text_max_length, g.context_size)),
    ]
    pooled = [t.pooled_size for t in g.text_encoders if t.pooled_size is not None]
    if pooled:
        inputs.append(TensorSpec("text_embeds", "float32", ("batch", pooled[-1])))
    if g.time_ids:
        inputs.append(TensorSpec("time_ids", "float32", ("batch", g.time_ids)))
    if g.time_cond_size is not None:
        inputs.append(TensorSpec("timestep_cond", "float32", ("batch", g.time_cond_size)))
    if g.unet_class_labels is not None:
        inputs.append(TensorSpec("noise_level", "int32", ("batch",)))
    return NetworkSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", latent),),
        trace_dims={"batch": 2, "latent_height": side, "latent_width": side},  # batch 2 = one CFG pair
        # fractional timesteps (Euler, LMS) need more than fp16's 0.5 spacing at 999; sizes in time_ids too
        keep_fp32=("timestep", "time_ids"),
        id_counts={} if g.unet_class_labels is None else {"noise_level": g.unet_class_labels},
    )


def vae_decoder_spec(g: Geometry) -> NetworkSpec:
    side = g.latent_size
    return NetworkSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", g.latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        trace_dims={"batch": 1, "latent_height": side, "latent_width": side},
    )


def vae_encoder_spec(g: Geometry) -> NetworkSpec:
    side = g.default_size
    return NetworkSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        # mean and log-variance of the latent distribution, stacked on channels as diffusers' moments
        outputs=(
            TensorSpec("latent_moments", "float32", ("batch", 2 * g.latent_channels, "latent_height", "latent_width")),
        ),
        trace_dims={"batch": 1, "height": side, "width": side},
    )


class TextEncoderNet(torch.nn.Module):
    """Token ids -> the hidden states the UNet reads (and, for SDXL's second encoder, the pooled embedding)."""

    def __init__(self, text_encoder: torch.nn.Module, encoder: TextEncoderGeometry) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.penultimate = encoder.hidden_layer == "penultimate"
        self.pooled = encoder.pooled_size is not None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids.long(), output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        return (hidden, out.text_embeds) if self.pooled else hidden


class UNetNet(torch.nn.Module):
    """The UNet with its extra conditioning inputs, named as in unet_spec, after the first three; the UNet that
    takes ControlNet residuals has them last ("down_residual_<i>", "mid_residual": export/controlnet.py)."""

    def __init__(self, unet: torch.nn.Module, extra_inputs: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.unet = unet
        self.extra_inputs = extra_inputs

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, *extra: torch.Tensor
    ) -> torch.Tensor:
        named = dict(zip(self.extra_inputs, extra, strict=True))
        added = {k: named[k] for k in ("text_embeds", "time_ids") if k in named}  # SDXL micro-conditioning
        down_residuals = [value for name, value in named.items() if name.startswith("down_residual_")]
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            class_labels=named["noise_level"].long() if "noise_level" in named else None,
            timestep_cond=named.get("timestep_cond"),
            added_cond_kwargs=added or None,
            down_block_additional_residuals=down_residuals or None,
            mid_block_additional_residual=named.get("mid_residual"),
            return_dict=False,
        )[0]


class VaeDecoderNet(torch.nn.Module):
    """Latents already divided by the VAE scaling factor -> image in [-1, 1]."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoderNet(torch.nn.Module):
    """Image in [-1, 1] -> the latent distribution's moments (mean, logvar) before sampling or scaling."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encoder(image)
        if self.vae.quant_conv is not None:
            moments = self.vae.quant_conv(moments)
        return moments
