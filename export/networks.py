"""The networks of a Stable Diffusion pipeline as exportable torch modules, each with one frozen spec.

A NetworkSpec declares a network's inputs and outputs (names, dtypes, shapes with named dynamic
dimensions) and its default profile; the ONNX export, the manifest and the engines all read it,
so the views cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtrt.engine.session import TensorSpec


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    inputs: tuple[TensorSpec, ...]  # fp32 dtypes; the fp16 variant converts the float ones but keep_fp32
    outputs: tuple[TensorSpec, ...]
    profile: dict[str, tuple[int, int, int]]  # dynamic dimension -> (min, opt, max)
    keep_fp32: tuple[str, ...] = ()  # inputs that stay float32 in the fp16 variant

    def example_inputs(self, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Random inputs at the profile's opt shape (used to trace the export)."""
        opt = {dim: values[1] for dim, values in self.profile.items()}
        tensors = []
        for spec in self.inputs:
            shape = spec.bind(opt)
            if spec.dtype == "int32":  # token ids, noise levels
                tensors.append(torch.randint(0, 100, shape, dtype=torch.int32, generator=generator))
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
class Geometry:
    """The sizes the specs are built from, read from the model's configs."""

    text_max_length: int
    text_hidden_size: int
    latent_channels: int
    vae_scale_factor: int  # pixels per latent pixel, per side
    size_multiple: int  # image height/width must be multiples of this
    default_size: int  # pixels, per side
    unet_in_channels: int = 4  # 4; 9 for inpainting models (+ mask + masked image); 7 for the x4 upscaler
    unet_class_labels: bool = False  # the x4 upscaler's UNet takes the noise level as a class label

    def latent_range(self) -> tuple[int, int, int]:
        """Latent side (min, opt, max) of the default profile: half to twice the native size."""
        step = self.size_multiple
        lo = max(step, (self.default_size // 2) // step * step)
        return tuple(px // self.vae_scale_factor for px in (lo, self.default_size, 2 * self.default_size))


def text_encoder_spec(g: Geometry) -> NetworkSpec:
    return NetworkSpec(
        name="text_encoder",
        inputs=(TensorSpec("input_ids", "int32", ("batch", g.text_max_length)),),
        outputs=(TensorSpec("last_hidden_state", "float32", ("batch", g.text_max_length, g.text_hidden_size)),),
        profile={"batch": (1, 2, 8)},
    )


def unet_spec(g: Geometry) -> NetworkSpec:
    latent = ("batch", g.latent_channels, "latent_height", "latent_width")
    side = g.latent_range()
    inputs = [
        # latents, then any conditioning channels (mask + masked-image latents, or the low-res image)
        TensorSpec("sample", "float32", ("batch", g.unet_in_channels, "latent_height", "latent_width")),
        TensorSpec("timestep", "float32", ("batch",)),
        TensorSpec("encoder_hidden_states", "float32", ("batch", g.text_max_length, g.text_hidden_size)),
    ]
    if g.unet_class_labels:
        inputs.append(TensorSpec("noise_level", "int32", ("batch",)))
    return NetworkSpec(
        name="unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("noise_pred", "float32", latent),),
        profile={"batch": (1, 2, 8), "latent_height": side, "latent_width": side},  # batch 2 = one CFG pair
        keep_fp32=("timestep",),  # fractional timesteps (Euler, LMS) need more than fp16's 0.5 spacing at 999
    )


def vae_decoder_spec(g: Geometry) -> NetworkSpec:
    side = g.latent_range()
    return NetworkSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", "float32", ("batch", g.latent_channels, "latent_height", "latent_width")),),
        outputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        profile={"batch": (1, 1, 4), "latent_height": side, "latent_width": side},
    )


def vae_encoder_spec(g: Geometry) -> NetworkSpec:
    side = tuple(s * g.vae_scale_factor for s in g.latent_range())
    return NetworkSpec(
        name="vae_encoder",
        inputs=(TensorSpec("image", "float32", ("batch", 3, "height", "width")),),
        # mean and log-variance of the latent distribution, stacked on channels as diffusers' moments
        outputs=(
            TensorSpec("latent_moments", "float32", ("batch", 2 * g.latent_channels, "latent_height", "latent_width")),
        ),
        profile={"batch": (1, 1, 4), "height": side, "width": side},
    )


class TextEncoderNet(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids.long(), return_dict=False)[0]


class UNetNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class ClassLabelUNetNet(UNetNet):
    """The x4 upscaler's UNet: the low-res image's noise level enters as a class label."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        noise_level: torch.Tensor,
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, class_labels=noise_level.long(), return_dict=False)[0]


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
