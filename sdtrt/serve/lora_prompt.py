"""Automatic1111's LoRA convention: ``<lora:NAME:WEIGHT>`` inside the prompt asks for the adapter NAME (one the
server was started with, ``--lora``) at WEIGHT (default 1). The tags are removed from the text the
text encoder sees; the same name twice adds its weights, as A1111 applies it twice."""

from __future__ import annotations

import math
import re

from sdtrt.serve.errors import ApiError

TAG = re.compile(r"<lora:([^<>]*)>")


def split_lora_tags(prompt: str) -> tuple[str, dict[str, float]]:
    """(the prompt without its ``<lora:...>`` tags, whitespace collapsed; adapter name -> weight)."""
    loras: dict[str, float] = {}
    for tag in TAG.findall(prompt):
        name, _, weight = tag.partition(":")
        try:
            scale = 1.0 if weight == "" else float(weight)
        except ValueError:
            scale = math.nan
        if not name or not math.isfinite(scale):
            raise ApiError("invalid_input", f"<lora:{tag}>: expected <lora:NAME> or <lora:NAME:WEIGHT>, a number")
        loras[name] = loras.get(name, 0.0) + scale
    return " ".join(TAG.sub(" ", prompt).split()), loras
