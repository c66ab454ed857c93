"""LoRA adapters in NumPy: read a .safetensors file, tie its keys to the export's weights (runtime/lora_apply.py
composes the new weights and hands them to the sessions).

A LoRA adds a low-rank delta to the weight of a Linear or Conv module:

    W' = W + sum_i scale_i * (alpha_i / rank_i) * up_i @ down_i

with up (out, rank) and down (rank, in) — for a Conv, down is (rank, in, kh, kw) and up (out, rank, 1, 1),
and the product is taken over the flattened (in * kh * kw) axis. The weights are always recomputed
from the export's base values (engine/weights.py), never accumulated, so loading, rescaling or
unloading adapters in any order leaves no residue.

Key styles (any mix; a key of none of them is an error, never skipped):

- diffusers / PEFT: ``unet.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), likewise
  ``text_encoder.`` and SDXL's ``text_encoder_2.``; alpha from ``<module>.alpha`` tensors or the
  ``lora_adapter_metadata`` diffusers writes (``unet.lora_alpha``, ``unet.alpha_pattern``), else alpha = rank.
- older diffusers: ``<module>.lora.down.weight`` / ``.lora.up.weight``, ``.lora_linear_layer.down/up``,
  and attention processors' ``<attn>.processor.to_q_lora.down.weight`` (to_q/to_k/to_v/to_out).
- kohya: ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, and
  ``lora_te_`` (SDXL: ``lora_te1_``, ``lora_te2_``); the underscore form is resolved against the module
  names the weight map knows, in diffusers' spelling (kohya's SD 1.x/2.x files) or the original
  UNet's (``input_blocks_4_1_...``: kohya's SDXL files).

Text encoder module names are compared without transformers' ``text_model.`` prefix, which some
transformers versions have and others do not. Layers adapting weights the export reports unused
(SDXL's first text encoder's last layer) are skipped: they cannot change the output.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrt.engine.errors import InvalidInputError
from sdtrt.engine.network_facts import LORA_NETWORKS
from sdtrt.engine.weights import MappedWeight, WeightMap

log = logging.getLogger(__name__)

MAX_HEADER = 100 << 20  # a safetensors JSON header beyond this is corrupt, not big
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",  # no NumPy dtype: widened to float32 on read
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
KOHYA_PREFIXES = {  # kohya keys: "<prefix><module with _ for .>..."
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
ROLE_SUFFIXES = {  # key ending -> which factor
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# older diffusers attention processors: <attn>.processor.to_q_lora.down.weight (text encoders: <attn>.to_q_lora...)
PROCESSOR_KEY = re.compile(
    r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_[qkv]|to_out)_lora\.(?P<role>down|up)\.weight$"
)
PROCESSOR_MODULES = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
    "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"},
}
# the original UNet's names (kohya's SDXL LoRAs): see _sgm_names
SGM_FIXED = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
SGM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
SGM_RESNET |= {"conv_shortcut": "skip_connection"}
SGM_MID = re.compile(r"^mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)$")
SGM_BLOCK = re.compile(
    r"^(?P<group>down_blocks|up_blocks)\.(?P<block>\d+)\."
    r"(?P<kind>resnets|attentions|downsamplers|upsamplers)\.(?P<index>\d+)\.(?P<rest>.+)$"
)
TEXT_MODEL = "text_model."  # transformers' CLIPTextModel prefix (present in transformers 4, gone in 5)
METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT LoraConfig per component, as JSON


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, without torch or the safetensors package.

    The format: an 8-byte little-endian header length, a JSON header ({name: {dtype, shape,
    data_offsets: [begin, end]}}, plus "__metadata__"), then the raw little-endian tensor bytes.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            total = path.stat().st_size
            if not 2 <= size <= min(MAX_HEADER, total - 8):
                raise ValueError(f"header length {size} does not fit a file of {total} bytes")
            header = json.loads(f.read(size).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data = np.fromfile(path, dtype=np.uint8, offset=8 + size)  # in memory: the file may change later
        tensors = {str(name): _tensor(data, info) for name, info in header.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path} is not a readable .safetensors file: {exc}") from None
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _tensor(data: np.ndarray, info: Mapping) -> np.ndarray:
    dtype = SAFETENSORS_DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {info['dtype']!r}")
    shape = tuple(int(n) for n in info["shape"])
    begin, end = (int(n) for n in info["data_offsets"])
    itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * itemsize:
        raise ValueError(f"tensor bytes [{begin}, {end}) do not hold {info['dtype']} {list(shape)}")
    raw = data[begin:end]
    if dtype == "bfloat16":  # the upper half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return raw.view(np.dtype(dtype).newbyteorder("<")).reshape(shape)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted weight: delta = scale * up @ down, with scale = alpha / rank."""

    up: np.ndarray  # (out, rank) or (out, rank, 1, 1)
    down: np.ndarray  # (rank, in) or (rank, in, kh, kw)
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight: MappedWeight, scale: float) -> np.ndarray:
        """scale * this layer's delta, float32, laid out as the initializer ``weight`` stores it."""
        up = np.float32(scale * self.scale) * self.up.reshape(self.up.shape[0], self.rank).astype(np.float32)
        down = self.down.reshape(self.rank, -1).astype(np.float32)  # (rank, in * kh * kw)
        # (out, in * kh * kw), or for a MatMul operand (in, out) computed as such: contiguous either way
        product = down.T @ up.T if weight.transposed else up @ down
        return product.reshape(weight.shape)


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file tied to an export: per component, the layers by the torch parameter they change."""

    path: Path
    layers: dict[str, dict[str, LoraLayer]]  # component -> parameter (as in its weight map) -> layer

    @property
    def size(self) -> int:
        return sum(len(layers) for layers in self.layers.values())


def read_lora(path: str | os.PathLike[str], weight_maps: Mapping[str, WeightMap]) -> LoraAdapter:
    """Read a LoRA .safetensors file and tie every key to a weight of ``weight_maps`` (component -> map).

    Anything that does not fit — an unknown key, a module the export does not have or cannot
    change, factors of the wrong shapes (a LoRA for another architecture) — is one InvalidInputError
    naming the key; nothing is half-loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no LoRA file at {path}")
    tensors, metadata = read_safetensors(path)
    if not tensors:
        raise InvalidInputError(f"{path}: the file holds no tensors")
    modules = {component: _ModuleIndex(component, m) for component, m in weight_maps.items()}
    groups: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}  # (component, module) -> role -> key, value
    unknown = []
    for key, value in tensors.items():
        parsed = _parse_key(key, modules)
        if parsed is None:
            unknown.append(key)
            continue
        component, module, role = parsed
        groups.setdefault((component, module), {})[role] = (key, value)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise InvalidInputError(
            f"{path.name}: unknown LoRA key {unknown[0]!r}{more}: expected diffusers/PEFT keys "
            f"(unet./text_encoder./text_encoder_2.<module>.lora_A/lora_B.weight) or kohya keys "
            f"(lora_unet_/lora_te_/lora_te1_/lora_te2_<module>.lora_down/lora_up.weight, .alpha) naming "
            f"modules of this model ({', '.join(weight_maps)})"
        )
    configs = _peft_configs(metadata, path)
    layers: dict[str, dict[str, LoraLayer]] = {}
    unused = []
    for (component, module), roles in groups.items():
        param, weight_map = f"{module}.weight", weight_maps[component]
        first_key = next(iter(roles.values()))[0]
        if param in weight_map.unused:
            unused.append(f"{component} {param}")
            continue
        if param in weight_map.unmapped:
            raise InvalidInputError(
                f"{path.name}: {first_key!r} adapts {component} {param}, which this export cannot change "
                f"({weight_map.unmapped[param]})"
            )
        if "up" not in roles or "down" not in roles:
            missing = "up (lora_B / lora_up)" if "up" not in roles else "down (lora_A / lora_down)"
            raise InvalidInputError(f"{path.name}: {first_key!r} has no matching {missing} factor")
        (up_key, up), (down_key, down) = roles["up"], roles["down"]
        shape = weight_map.by_param[param][0].param_shape
        rank = down.shape[0] if down.ndim else 0
        fits = (
            up.ndim in (2, 4)
            and down.ndim in (2, 4)
            and rank > 0
            and up.shape[0] == shape[0]
            and up.shape[1] == rank
            and math.prod(up.shape[2:]) == 1
            and math.prod(down.shape[1:]) == math.prod(shape[1:])
        )
        if not fits:
            raise InvalidInputError(
                f"{path.name}: {down_key!r} {list(down.shape)} and {up_key!r} {list(up.shape)} do not fit "
                f"{component} {param} {list(shape)}: is this LoRA for another model?"
            )
        scale = _layer_scale(roles.get("alpha"), configs.get(component, {}), module, rank, path)
        for key, value in ((up_key, up), (down_key, down)):
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InvalidInputError(f"{path.name}: {key!r} holds NaN or inf: the file is corrupt or was saved so")
        if not math.isfinite(scale):
            alpha_key = roles["alpha"][0] if "alpha" in roles else f"{component} lora_alpha"
            raise InvalidInputError(f"{path.name}: {alpha_key!r} is not a finite number ({scale * rank!r})")
        layers.setdefault(component, {})[param] = LoraLayer(up=up, down=down, scale=scale)
    if unused:
        log.info(
            "%s: %d layers adapt weights this model never uses, e.g. %s: they change nothing",
            path.name,
            len(unused),
            unused[0],
        )
    return LoraAdapter(path=path, layers=layers)


class _ModuleIndex:
    """The module names of one component's weight map under every spelling a LoRA key may use."""

    def __init__(self, component: str, weight_map: WeightMap) -> None:
        self.by_name: dict[str, str] = {}
        for param in [*weight_map.by_param, *weight_map.unmapped, *weight_map.unused]:
            module = param.removesuffix(".weight")
            self.by_name[module] = module
            if component.startswith("text_encoder"):  # with and without transformers' text_model. prefix
                bare = module.removeprefix(TEXT_MODEL)
                self.by_name[bare] = self.by_name[TEXT_MODEL + bare] = module
        self.by_underscores = {name.replace(".", "_"): module for name, module in self.by_name.items()}
        if component == "unet":  # kohya trains SDXL on the original UNet: its keys use those names
            modules = list(self.by_name)
            self.by_underscores |= {sgm.replace(".", "_"): m for m, sgm in _sgm_names(modules).items()}
        self.text = component.startswith("text_encoder")


def _sgm_names(modules: Sequence[str]) -> dict[str, str]:
    """diffusers UNet module -> its name in the original (LDM / SGM) UNet, e.g.
    down_blocks.1.attentions.0.proj_in -> input_blocks.4.1.proj_in with 2 layers per block.

    The original numbers its blocks in one sequence: input_blocks.0 is conv_in, then per down
    block its layers (resnet, attention) and its downsampler; middle_block is resnet, attention,
    resnet; output_blocks hold per up block its layers (resnet, attention, the upsampler last).
    """
    per_block = 1 + max((int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")), default=0)
    attended_up = {int(m.split(".")[1]) for m in modules if m.startswith("up_blocks.") and ".attentions." in m}
    names = {}
    for module in modules:
        if module in SGM_FIXED:
            names[module] = SGM_FIXED[module]
        elif mid := SGM_MID.match(module):
            kind, index, rest = mid["kind"], int(mid["index"]), mid["rest"]
            names[module] = f"middle_block.{1 if kind == 'attentions' else 2 * index}.{_sgm_inner(kind, rest)}"
        elif block := SGM_BLOCK.match(module):
            group, kind, rest = block["group"], block["kind"], block["rest"]
            b, index = int(block["block"]), int(block["index"])
            first = 1 + b * (per_block + 1) if group == "down_blocks" else b * (per_block + 1)
            prefix = "input_blocks" if group == "down_blocks" else "output_blocks"
            if kind == "downsamplers":
                names[module] = f"{prefix}.{first + per_block}.0.op"
            elif kind == "upsamplers":
                names[module] = f"{prefix}.{first + per_block}.{2 if b in attended_up else 1}.conv"
            else:
                names[module] = f"{prefix}.{first + index}.{0 if kind == 'resnets' else 1}.{_sgm_inner(kind, rest)}"
    return names


def _sgm_inner(kind: str, rest: str) -> str:
    return SGM_RESNET.get(rest, rest) if kind == "resnets" else rest


def _parse_key(key: str, modules: Mapping[str, _ModuleIndex]) -> tuple[str, str, str] | None:
    """(component, module as in the weight map, role "up" | "down" | "alpha"), or None for a key we do not know."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and component in modules:
            name, _, rest = key[len(prefix) :].partition(".")
            role = ROLE_SUFFIXES.get(f".{rest}")
            module = modules[component].by_underscores.get(name)
            return None if role is None or module is None else (component, module, role)
    component, _, rest = key.partition(".")
    if component not in LORA_NETWORKS or component not in modules:  # diffusers keys: "<component>.<module>..."
        return None
    index = modules[component]
    if processor := PROCESSOR_KEY.match(rest):
        projection = PROCESSOR_MODULES["text" if index.text else "unet"][processor["proj"]]
        module = index.by_name.get(f"{processor['attn']}.{projection}")
        return None if module is None else (component, module, processor["role"])
    for suffix, role in ROLE_SUFFIXES.items():
        if rest.endswith(suffix):
            module = index.by_name.get(rest.removesuffix(suffix))
            return None if module is None else (component, module, role)
    return None


def _peft_configs(metadata: Mapping[str, str], path: Path) -> dict[str, dict]:
    """diffusers' saved LoraConfig per component ({"unet": {"lora_alpha": 8, ...}}), if the file has one."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        packed = json.loads(metadata[METADATA_KEY])
        if not isinstance(packed, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:  # json.JSONDecodeError included
        raise InvalidInputError(f"{path.name}: corrupt {METADATA_KEY}: {exc}") from None
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise InvalidInputError(f"{path.name}: {component} is a DoRA adapter, which is not supported")
    return configs


def _layer_scale(tensor: tuple[str, np.ndarray] | None, config: Mapping, module: str, rank: int, path: Path) -> float:
    """The layer's scale alpha / rank: from its .alpha tensor, else the PEFT config, else alpha = rank."""
    if tensor is not None:
        key, value = tensor
        if value.size != 1:
            raise InvalidInputError(f"{path.name}: {key!r} must be one number, it has shape {list(value.shape)}")
        return float(value.reshape(())) / rank
    if not config:
        return 1.0
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("alpha_pattern") or {}).items():  # PEFT: a name or a dotted suffix
        if re.fullmatch(rf"(.*\.)?({pattern})", module):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
