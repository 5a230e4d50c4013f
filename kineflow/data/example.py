"""The one example format every dataset yields, and the image <-> tensor conversions.

A dataset item is a plain ``dict`` (so ``torch.utils.data.default_collate`` batches it: tensors
are stacked, strings become lists). ``task`` says which fields are present:

=========  ===============================================  =====================================
task       fields                                           used for
=========  ===============================================  =====================================
caption    ``image``, ``caption``                           text-to-image and captioning
vqa        ``image``, ``question``, ``answer``              visual question answering
edit       ``image`` (source), ``instruction``, ``target``  image editing
=========  ===============================================  =====================================

Every item also has an ``id`` (str). Images are float32 tensors ``[3, H, W]`` in ``[-1, 1]``
(the range both VQ and KL tokenizers consume); ``target`` of an edit is an image too.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

TASKS: tuple[str, ...] = ("caption", "vqa", "edit")

#: The text fields of each task, besides ``image`` (``target`` of an edit is an image).
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "caption": ("caption",),
    "vqa": ("question", "answer"),
    "edit": ("instruction", "target"),
}


def image_to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """RGB image (PIL, or uint8 array ``[H, W, 3]``) -> float32 ``[3, H, W]`` in ``[-1, 1]``.

    ``x = 2 * pixel / 255 - 1``, the inverse of :func:`tensor_to_image`.
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        array = np.array(image, dtype=np.uint8)  # a copy: torch wants a writable buffer
    else:
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
            raise ValueError(
                f"expected a uint8 array [H, W, 3], got {array.dtype} {tuple(array.shape)}"
            )
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return tensor.to(torch.float32).div_(127.5).sub_(1.0)


def tensor_to_array(images: torch.Tensor) -> np.ndarray:
    """Float images ``[..., 3, H, W]`` in ``[-1, 1]`` -> uint8 arrays ``[..., H, W, 3]``.

    Values outside ``[-1, 1]`` (a decoder's overshoot) are clipped; rounding is to nearest.
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"expected images [..., 3, H, W], got shape {tuple(images.shape)}")
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.movedim(-3, -1).cpu().numpy()


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """One float image ``[3, H, W]`` in ``[-1, 1]`` -> PIL RGB image."""
    if image.ndim != 3:
        raise ValueError(f"expected one image [3, H, W], got shape {tuple(image.shape)}")
    return Image.fromarray(tensor_to_array(image))
