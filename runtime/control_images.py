"""Control images from ordinary pictures: preprocessors from a well-kept library, an optional extra.

Canny edges come from OpenCV (``pip install 'sdtrt[controlnet]'``: opencv-python-headless), as in diffusers'
ControlNet examples. Other maps (depth, poses, segmentation) come from their own models: pass the map itself
as the control image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sdtrt.engine.errors import SdtrtError
from sdtrt.runtime import image as image_ops


def canny(image: image_ops.ImageInput, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """Canny edges of ``image``, white on black, as an RGB control image (OpenCV's cv2.Canny on the RGB pixels)."""
    try:
        import cv2
    except ModuleNotFoundError:
        raise SdtrtError("Canny edges need OpenCV: pip install 'sdtrt[controlnet]'") from None
    edges = cv2.Canny(np.asarray(image_ops.load_rgb(image)), low_threshold, high_threshold)  # (H, W) uint8: 0 or 255
    return Image.fromarray(edges).convert("RGB")
