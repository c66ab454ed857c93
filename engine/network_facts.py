"""One table of per-network facts, read by the export, the engine and the runtime alike.

Each network of a Stable Diffusion pipeline is one record: how its batch follows the images of a
request under classifier-free guidance, whether LoRA may change its weights (the export then
writes a weight map beside it), whether its fp16 output is checked and recomputed at fp32, and the
tokenizer folder of a text encoder. The shapes of its inputs and outputs depend on the model and
live in the manifest (written from the export's NetworkSpec); its default engine profile follows
from the rules here and the model's native size (engine/profiles.py). A new network is a new
record, not an edit in six lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

Range = tuple[int, int, int]  # (min, opt, max)

# How a network's batch follows the images of a request (B = prompts x images per prompt):
#   "cfg": the UNet runs both halves of a CFG step as one batch: 2B with guidance, else B;
#   "prompts": text encoders see the prompts, then the negative prompts: 1 .. 2B;
#   "source": the VAE encoder sees one source (or masked) image, repeated in latent space: 1 .. B;
#   "images": one row per image (the VAE decoder);
#   "control": a ControlNet: the CFG batch, or in guess mode only its conditional half: B .. 2B.
BatchRule = Literal["cfg", "prompts", "source", "images", "control"]
CONTROLNET_PREFIX = "controlnet."  # attached ControlNets are networks named "controlnet.<name>"


@dataclass(frozen=True)
class Network:
    name: str  # the component's name in the manifest and on disk
    batch: BatchRule
    lora: bool = False  # LoRA may change its weights: the export writes its weight map
    fp32_fallback: bool = False  # fp16 output checked for NaN/inf and recomputed by the fp32 variant
    tokenizer: str | None = None  # text encoders: the tokenizer folder beside the ONNX files
    lora_keys: str | None = None  # the network whose LoRA keys adapt this one, where not its own name
    attached: bool = False  # written into an existing export by its own command, never by `sdtrt export` itself

    @property
    def lora_component(self) -> str:
        """The component a LoRA file names for this network's weights ("unet." keys for both UNets)."""
        return self.lora_keys or self.name

    def batch_range(self, images: Range, cfg: bool, static: bool) -> Range:
        """(min, opt, max) batch of this network when a request holds ``images`` (min, opt, max) images."""
        lo, opt, hi = images
        factor = 2 if cfg else 1
        if self.batch == "cfg":  # a dynamic profile also keeps B, for requests with guidance <= 1
            return (factor * lo if static else lo), factor * opt, factor * hi
        if self.batch == "prompts":
            return 1, opt, factor * hi
        if self.batch == "source":
            return 1, 1, hi
        if self.batch == "control":
            return lo, factor * opt, factor * hi
        return lo, opt, hi


class NetworkTable(dict[str, Network]):
    """The records by name; an attached ControlNet "controlnet.<name>" has the "controlnet" record."""

    def __missing__(self, name: str) -> Network:
        if is_controlnet(name):
            return self["controlnet"]
        raise KeyError(name)


def is_controlnet(name: str) -> bool:
    """Whether ``name`` is an attached ControlNet's network ("controlnet.<name>")."""
    return name.startswith(CONTROLNET_PREFIX) and len(name) > len(CONTROLNET_PREFIX)


NETWORK_FACTS: NetworkTable = NetworkTable(
    (network.name, network)
    for network in (
        Network("text_encoder", "prompts", lora=True, tokenizer="tokenizer"),
        Network("text_encoder_2", "prompts", lora=True, tokenizer="tokenizer_2"),  # SDXL's second encoder
        Network("unet", "cfg", lora=True),
        Network("vae_decoder", "images", fp32_fallback=True),  # SD 1.x VAE decoders overflow in fp16
        Network("vae_encoder", "source"),
        # ControlNet: the UNet that takes the ControlNets' down/mid residuals as inputs, exported beside the plain
        # UNet when the first ControlNet is attached (export/controlnet.py), and the ControlNets themselves
        Network("unet_controlnet", "cfg", lora=True, lora_keys="unet", attached=True),
        Network("controlnet", "control"),
        # a tiny VAE (diffusers AutoencoderTiny: TAESD), attached by export/tiny_vae.py: UNet latents <-> pixels
        Network("vae_decoder_tiny", "images", attached=True),
        Network("vae_encoder_tiny", "source", attached=True),
        # step caching (DeepCache), attached by export/step_cache.py: the UNet that also returns the deep feature
        # at the cache branch, and the shallow UNet that takes it; both read the UNet's own weights file, and LoRA
        # changes them as it changes the UNet (their weight maps point into that file)
        Network("unet_cache", "cfg", lora=True, lora_keys="unet", attached=True),
        Network("unet_shallow", "cfg", lora=True, lora_keys="unet", attached=True),
    )
)
# the networks an export may hold under their own name, in the order it writes them; attached ControlNets
# follow as "controlnet.<name>" (is_known_network)
COMPONENTS = tuple(name for name in NETWORK_FACTS if name != "controlnet")
EXPORTED = tuple(name for name in COMPONENTS if not NETWORK_FACTS[name].attached)  # what `sdtrt export` may write
TEXT_ENCODERS = {n.name: n.tokenizer for n in NETWORK_FACTS.values() if n.tokenizer}  # network -> tokenizer folder
LORA_NETWORKS = tuple(n.name for n in NETWORK_FACTS.values() if n.lora)


def is_known_network(name: str) -> bool:
    """Whether an export may hold a network named ``name``."""
    return name in COMPONENTS or is_controlnet(name)


def export_order(names: Iterable[str]) -> list[str]:
    """``names`` in the order an export writes them: COMPONENTS', then the attached ControlNets by name."""
    names = set(names)
    return [c for c in COMPONENTS if c in names] + sorted(n for n in names if is_controlnet(n))


def native_side_range(native: int, step: int) -> Range:
    """Image side (min, opt, max) in pixels of the default profile: half to twice the native size,
    the half rounded down to the model's size step (256-512-1024 for Stable Diffusion 1.5)."""
    return max(step, native // 2 // step * step), native, 2 * native
