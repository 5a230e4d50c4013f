"""How well an image tokenizer keeps ShapesWorld scenes: PSNR and scene preservation.

A reconstruction *preserves the scene* when the detector reads exactly the scene that was
rendered (every object's shape, colour, size and cell). That is the property generation needs:
a tokenizer that blurs a triangle into a circle caps every model trained on its tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kineflow.data.example import image_to_tensor, tensor_to_array
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import Scene, ShapesWorld, WorldConfig
from kineflow.eval.detector import detect


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-picture PSNR in dB of uint8 pictures ``[B, H, W, 3]``: ``10 log10(255^2 / MSE)``
    (capped at 100 dB for identical pictures)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))


@torch.no_grad()
def evaluate_reconstruction(
    model: nn.Module,
    n: int = 1000,
    image_size: int = 32,
    split: str = "test",
    batch_size: int = 100,
    world: WorldConfig | None = None,
    scenes: list[Scene] | None = None,
) -> dict:
    """Reconstruct the first ``n`` pictures of ``split`` (or the given ``scenes``, then ``n``
    and ``split`` are not used) with ``model.reconstruct`` and report mean PSNR, the
    scene-preservation rate, the token grid and (VQ) codebook usage."""
    given = scenes is not None
    if scenes is None:
        world_ = ShapesWorld(world or WorldConfig(image_size=image_size))
        scenes = [world_.scene(split, i) for i in range(n)]
    n = len(scenes)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    kept, psnrs, used = [], [], set()
    for start in range(0, n, batch_size):
        chunk = scenes[start : start + batch_size]
        originals = np.stack([render(s, image_size) for s in chunk])
        images = torch.stack([image_to_tensor(p) for p in originals]).to(device, dtype)
        if hasattr(model, "codebook_size"):  # VQ: encode once, for both usage and pixels
            ids = model.encode(images)
            used.update(ids.unique().tolist())
            decoded = model.decode(ids)
        else:
            decoded = model.reconstruct(images)
        recon = tensor_to_array(decoded.float())
        kept += [a == b for a, b in zip(detect(recon), chunk, strict=True)]
        psnrs.append(psnr(originals, recon))
    model.train(was_training)
    report = {
        "split": None if given else split,
        "pictures": n,
        "image_size": image_size,
        "psnr": float(np.concatenate(psnrs).mean()),
        "scene_preserved": float(np.mean(kept)),
    }
    if hasattr(model, "tokens_shape"):  # VQ: a grid of codebook ids
        report["token_grid"] = list(model.tokens_shape(image_size))
    elif hasattr(getattr(model, "config", None), "grid_size"):  # KL: patchified latents
        side = image_size // (model.config.downsample * model.config.patch_size)
        report["token_grid"] = [side, side]
        report["token_dim"] = model.config.token_dim
    if used:
        report["codebook_used"] = len(used)
        report["codebook_usage"] = len(used) / model.codebook_size
    return report
