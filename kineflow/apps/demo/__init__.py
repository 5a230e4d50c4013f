"""The flow-core demo: FUDOKI's metric path, the uniform path and the masked path sampling a
tiny image world with an exact denoiser, side by side.

The world is 16×16 images over a palette of ``levels³`` colours (64 by default). Token
embeddings are colour coordinates, so FUDOKI's embedding metric measures colour similarity.
The "model" is :class:`~kineflow.flow.ExactPosterior` over a handful of procedurally drawn
images: the Bayes-optimal denoiser for that dataset. With it the only thing on display is the
sampler (path + Euler CTMC solver), not a training run.

Outputs (in ``out_dir``):

- ``refinement.gif`` — one frame per solver step: ``x_t`` and the drawn ``x̂_1`` of a few
  samples for each path;
- ``refinement_strip.png`` — one sample per path at a few selected times;
- ``summary.json`` — per-path statistics (memorisation, self-correction, jumps, timings) and
  the exact total-variation error of the solver on a small correlated joint distribution.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from kineflow.flow import (
    DiscretePath,
    EmbeddingMetric,
    EulerSolver,
    ExactPosterior,
    HammingMetric,
    MaskedPath,
    MetricPath,
    SolverResult,
    euler_law,
    total_variation,
)

#: The paths compared, in display order. Every per-path step below is driven by this tuple.
PATH_KINDS = ("metric", "uniform", "masked")
PATH_LABELS = {
    "metric": "FUDOKI metric path",
    "uniform": "uniform (Hamming) path",
    "masked": "masked path",
}
IMAGE_SIZE = 16
#: Grid shown in the GIF: this many samples per path.
SHOWN_SAMPLES = 4
#: Step counts of the exact total-variation table.
TV_STEPS = (1, 2, 4, 8, 16, 32, 64)
TV_RATES = ("integrated", "euler")

# Mask pixels are drawn as a grey checkerboard; neither grey is a palette colour (levels are
# multiples of 255 / (levels - 1)), so a masked pixel can never be mistaken for a colour.
_CHECKER = ((112, 112, 112), (200, 200, 200))
_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)


# -- the colour world ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Palette:
    """``levels³`` colours; token id ``(r·levels + g)·levels + b`` for channel levels r, g, b.

    Attributes:
        levels: intensity levels per channel.
        grid: Long[V, 3], the channel levels of every token.
        rgb: uint8 array [V, 3], display colours.
        embeddings: Float[V, 4], token embeddings for the metric (see :func:`colour_embeddings`).
    """

    levels: int
    grid: Tensor
    rgb: np.ndarray
    embeddings: Tensor

    @property
    def size(self) -> int:
        return self.grid.shape[0]


def colour_embeddings(grid: Tensor, levels: int) -> Tensor:
    """Float[V, 4] embeddings of colours given by channel levels Long[V, 3].

    The metric L2-normalises embeddings, so only directions count: with centred RGB alone, two
    colours on one ray from the cube's centre (the two darkest greys, say) would be at distance
    0. A constant 4th coordinate lifts the colour cube off the origin, so distinct colours get
    distinct directions, and the angle between two of them roughly follows their RGB distance.
    """
    half = (levels - 1) / 2
    centred = grid.float() - half
    return torch.cat([centred, torch.full_like(centred[:, :1], half)], dim=1)


def make_palette(levels: int = 4) -> Palette:
    """The palette with ``levels`` intensities per RGB channel."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    axis = torch.arange(levels)
    grid = torch.cartesian_prod(axis, axis, axis)
    rgb = (grid.numpy() * 255 // (levels - 1)).astype(np.uint8)
    return Palette(levels, grid, rgb, colour_embeddings(grid, levels))


def _shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> Tensor:
    """Bool[size, size]: pixels whose centres fall inside a circle / square / triangle."""
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r**2
    if kind == "square":
        return ((x - cx).abs() <= r) & ((y - cy).abs() <= r)
    if kind == "triangle":  # apex up, base 2r wide
        return (y <= cy + r) & ((x - cx).abs() <= (y - (cy - r)) / 2)
    raise ValueError(f"unknown shape {kind!r}")


def draw_dataset(count: int, palette: Palette, seed: int, size: int = IMAGE_SIZE) -> Tensor:
    """Long[count, size²]: distinct images of one or two flat shapes on a flat background.

    Shape colours differ from the background by at least two levels in some channel so every
    shape stays visible. Deterministic in ``seed``.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    images: list[Tensor] = []
    seen: set[bytes] = set()
    while len(images) < count:
        background = int(torch.randint(palette.size, (), generator=gen))
        image = torch.full((size, size), background)
        for _ in range(1 + int(torch.randint(2, (), generator=gen))):
            contrast = (palette.grid - palette.grid[background]).abs().amax(-1) >= 2
            colours = torch.nonzero(contrast).flatten()
            colour = int(colours[torch.randint(colours.numel(), (), generator=gen)])
            kind = ("circle", "square", "triangle")[int(torch.randint(3, (), generator=gen))]
            r = uniform(size * 0.18, size * 0.32)
            cx, cy = uniform(r, size - r), uniform(r, size - r)
            image[_shape_mask(kind, cx, cy, r, size)] = colour
        key = image.numpy().tobytes()
        if key not in seen:  # the exact posterior treats duplicates as one heavier image
            seen.add(key)
            images.append(image.flatten())
    return torch.stack(images)


def build_path(kind: str, embeddings: Tensor) -> DiscretePath:
    """The path ``kind`` (one of :data:`PATH_KINDS`) over tokens with these embeddings.

    The masked path gets one extra state, the mask, with id ``len(embeddings)``.
    """
    V = embeddings.shape[0]
    if kind == "metric":
        return MetricPath(EmbeddingMetric(embeddings))
    if kind == "uniform":
        return MetricPath(HammingMetric(V))
    if kind == "masked":
        return MaskedPath(V + 1, mask_id=V)
    raise ValueError(f"unknown path kind {kind!r}; choose one of {', '.join(PATH_KINDS)}")


# -- sampling and statistics --------------------------------------------------------------------
@dataclass
class PathRun:
    """One path's sampling run: the solver result (with trajectory) and its wall time."""

    kind: str
    result: SolverResult
    seconds: float


def sample_path(
    path: DiscretePath,
    data: Tensor,
    samples: int,
    steps: int,
    seed: int,
    return_trajectory: bool = False,
) -> tuple[SolverResult, float]:
    """Sample ``samples`` sequences with the exact posterior of ``data`` as the model.

    Each call seeds its own generator, so every path starts from the same seed and the runs do
    not depend on one another. Returns the solver result and the wall time in seconds.
    """
    model = ExactPosterior(data, None, path)
    solver = EulerSolver(path)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    blank = torch.zeros(samples, data.shape[1], dtype=torch.long, device=data.device)
    x0 = solver.init_state(blank, generator=gen)
    start = time.perf_counter()
    result = solver.solve(model, x0, steps, generator=gen, return_trajectory=return_trajectory)
    return result, time.perf_counter() - start


def memorised_fraction(samples: Tensor, data: Tensor) -> float:
    """Fraction of rows of ``samples`` (Long[B, N]) equal to some row of ``data`` (Long[K, N])."""
    hits = (samples[:, None, :] == data[None, :, :]).all(-1).any(-1)
    return float(hits.float().mean())


def trajectory_stats(states: Tensor, palette: Palette) -> dict[str, Any]:
    """Statistics of a trajectory Long[n + 1, B, N] of token ids.

    - ``self_correction_fraction``: tokens that reach their final value, leave it, and come back
      (always 0 for the masked path: a revealed token does not move before the last step);
    - ``mean_jumps_per_token``: changes of value along the trajectory;
    - ``mean_jump_colour_distance``: RGB distance (in palette levels) of jumps between two
      colours, ``None`` when there are none;
    - ``settled_fraction``: per grid time, the fraction of tokens already at their final value;
    - ``final_step_change_fraction``: tokens changed by the last step, where the solver sets
      every token to its drawn ``x̂_1``.
    """
    final = states[-1]
    at_final = states == final
    # A token leaves its final value after first reaching it iff some False follows a True.
    reached_before = torch.cummax(at_final.int(), dim=0).values.bool()
    left_again = (reached_before & ~at_final).any(0)
    before, after = states[:-1], states[1:]
    jumped = before != after
    colour_jump = jumped & (before < palette.size) & (after < palette.size)
    if colour_jump.any():
        delta = palette.grid[before[colour_jump]] - palette.grid[after[colour_jump]]
        jump_distance: float | None = float(delta.float().norm(dim=-1).mean())
    else:
        jump_distance = None
    return {
        "self_correction_fraction": float(left_again.float().mean()),
        "mean_jumps_per_token": float(jumped.sum(0).float().mean()),
        "mean_jump_colour_distance": jump_distance,
        "settled_fraction": [round(float(f), 4) for f in at_final.float().mean((1, 2))],
        "final_step_change_fraction": float((~at_final[-2]).float().mean()),
    }


def sweep_steps(steps: int) -> list[int]:
    """Step counts of the memorisation sweep: a quarter, one and four times ``steps``."""
    return sorted({max(1, steps // 4), steps, 4 * steps})


# -- exact solver error on a correlated joint ---------------------------------------------------
def toy_problem() -> tuple[Tensor, Tensor, Tensor]:
    """Two pixels, four grey levels, strongly correlated: the pixels mostly agree.

    Returns (support Long[4, 2], weights Float[4], embeddings Float[4, 4]). A one-step sampler
    draws the two pixels independently from their marginals (TV 0.71 from this joint); the
    correlation only comes back over several steps.
    """
    support = torch.tensor([[0, 0], [3, 3], [1, 2], [2, 1]])
    weights = torch.tensor([0.35, 0.35, 0.15, 0.15])
    greys = torch.arange(4)[:, None].expand(4, 3)
    return support, weights, colour_embeddings(greys, levels=4)


def toy_tv_table(step_counts: Sequence[int] = TV_STEPS) -> dict[str, Any]:
    """Exact ``TV(law of the solver's output, target)`` per path, rate and step count."""
    support, weights, embeddings = toy_problem()
    rows: dict[str, dict[str, list[float]]] = {}
    for kind in PATH_KINDS:
        posterior = ExactPosterior(support, weights, build_path(kind, embeddings))
        target = posterior.data_law()
        rows[kind] = {
            rate: [
                round(total_variation(euler_law(posterior, n, rate=rate), target), 5)
                for n in step_counts
            ]
            for rate in TV_RATES
        }
    return {
        "problem": "2 pixels x 4 grey levels; q(0,0)=q(3,3)=0.35, q(1,2)=q(2,1)=0.15",
        "step_counts": list(step_counts),
        "tv": rows,
    }


# -- rendering ----------------------------------------------------------------------------------
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def token_image(ids: Tensor, palette: Palette, scale: int) -> np.ndarray:
    """uint8 [S·scale, S·scale, 3] picture of one image's tokens Long[S²], nearest upscaling.

    Ids beyond the palette (the mask) are drawn as a checkerboard of two greys.
    """
    side = math.isqrt(ids.numel())
    grid = ids.reshape(side, side).cpu().numpy()
    masked = grid >= palette.size
    rgb = palette.rgb[np.where(masked, 0, grid)]
    rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    masked = masked.repeat(scale, axis=0).repeat(scale, axis=1)
    cell = max(1, scale // 2)
    yy, xx = np.indices(masked.shape)
    checker = np.where(
        (((yy // cell) + (xx // cell)) % 2 == 0)[..., None], *map(np.array, _CHECKER)
    )
    return np.where(masked[..., None], checker, rgb).astype(np.uint8)


def _grid_image(batch: Tensor, palette: Palette, scale: int, gap: int = 2) -> Image.Image:
    """The images of ``batch`` (Long[B, S²]) in a grid two wide."""
    cols = min(2, batch.shape[0])
    rows = math.ceil(batch.shape[0] / cols)
    side = IMAGE_SIZE * scale
    size = (cols * side + (cols - 1) * gap, rows * side + (rows - 1) * gap)
    canvas = Image.new("RGB", size, _BACKGROUND)
    for j, ids in enumerate(batch):
        tile = Image.fromarray(token_image(ids, palette, scale))
        canvas.paste(tile, ((j % cols) * (side + gap), (j // cols) * (side + gap)))
    return canvas


def _gif_palette(palette: Palette) -> Image.Image:
    """A fixed "P"-mode palette: the token colours, the checker, and a grey ramp for text.

    Quantising every frame to the same exact palette keeps token colours exact (no dithering)
    and lets the GIF encoder store only the changed rectangle of each frame.
    """
    colours = [tuple(int(v) for v in c) for c in palette.rgb]
    colours += [*_CHECKER, _BACKGROUND, _INK]
    colours += [(v, v, v) for v in range(0, 256, 17)]
    flat = [v for c in colours[:256] for v in c]
    image = Image.new("P", (1, 1))
    image.putpalette(flat + flat[:3] * (256 - len(flat) // 3))
    return image


def render_frame(
    runs: Sequence[PathRun], palette: Palette, k: int, shown: int, big: int = 6, small: int = 3
) -> Image.Image:
    """Frame ``k``: for every path, ``x_t`` at grid time k and the ``x̂_1`` drawn from it."""
    title_font, font = _font(14), _font(12)
    n = runs[0].result.nfe
    t = float(runs[0].result.times[k])
    columns = []
    for run in runs:
        states, predictions = run.result.states, run.result.predictions
        # At t = 1 there is nothing left to predict: the state is its own x̂_1.
        predicted = predictions[k] if k < n else states[k]
        columns.append(
            (
                PATH_LABELS[run.kind],
                _grid_image(states[k, :shown], palette, big),
                _grid_image(predicted[:shown], palette, small),
            )
        )
    margin, header, caption, footer = 12, 26, 16, 40
    col_w = max(max(a.width, b.width) for _, a, b in columns) + 20
    body = caption + columns[0][1].height + caption + 4 + columns[0][2].height
    width = margin + len(columns) * (col_w + margin)
    frame = Image.new("RGB", (width, header + body + footer), _BACKGROUND)
    draw = ImageDraw.Draw(frame)
    draw.text((margin, 6), f"step {k}/{n}    t = {t:.3f}", fill=_INK, font=title_font)
    for j, (label, current, predicted) in enumerate(columns):
        x0 = margin + j * (col_w + margin)
        y = header
        draw.text((x0, y), label, fill=_INK, font=title_font)
        y += caption + 2
        frame.paste(current, (x0, y))
        y += current.height + 3
        draw.text((x0, y), "x1 drawn by the solver", fill=_INK, font=font)
        frame.paste(predicted, (x0, y + caption))
    notes = (
        "large: x_t of the first samples.  small: the x1 the solver drew per pixel from the",
        "exact posterior p(x1 | x_t) at this step.  grey checkerboard: mask token.",
    )
    for i, note in enumerate(notes):
        draw.text((margin, header + body + 6 + 14 * i), note, fill=_INK, font=font)
    return frame


def write_gif(runs: Sequence[PathRun], palette: Palette, path: Path, shown: int) -> int:
    """Write the refinement animation; returns its number of frames."""
    pal = _gif_palette(palette)
    count = runs[0].result.nfe + 1
    frames = [
        render_frame(runs, palette, k, shown).quantize(palette=pal, dither=Image.Dither.NONE)
        for k in range(count)
    ]
    # Hold the start and the result long enough to look at them.
    durations = [900] + [140] * (count - 2) + [2500]  # count >= 2: steps >= 1
    frames[0].save(
        path, save_all=True, append_images=frames[1:], duration=durations, loop=0, disposal=1
    )
    return count


def strip_times(steps: int) -> list[int]:
    """Grid indices of the strip's columns: quarters of the run, then its end in more detail,
    since the metric path resolves near-identical colours only as β_t blows up near t = 1."""
    fractions = (0, 1 / 4, 1 / 2, 3 / 4, 7 / 8)
    return sorted({round(f * steps) for f in fractions} | {max(steps - 1, 0), steps})


def write_strip(runs: Sequence[PathRun], palette: Palette, path: Path, scale: int = 5) -> None:
    """One row per path: sample 0 at the grid times of :func:`strip_times`, labelled with t."""
    font = _font(12)
    ks = strip_times(runs[0].result.nfe)
    side, gap, label_w, header = IMAGE_SIZE * scale, 6, 170, 22
    width = label_w + len(ks) * (side + gap)
    strip = Image.new("RGB", (width, header + len(runs) * (side + gap) + gap), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for i, k in enumerate(ks):
        t = float(runs[0].result.times[k])
        draw.text((label_w + i * (side + gap), 4), f"t = {t:.2f}", fill=_INK, font=font)
    for r, run in enumerate(runs):
        y = header + r * (side + gap)
        draw.text((8, y + side // 2 - 7), PATH_LABELS[run.kind], fill=_INK, font=font)
        for i, k in enumerate(ks):
            tile = Image.fromarray(token_image(run.result.states[k, 0], palette, scale))
            strip.paste(tile, (label_w + i * (side + gap), y))
    strip.save(path, optimize=True)


# -- the demo -----------------------------------------------------------------------------------
@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block.

    The demo's tensors hold ~10⁵ elements: intra-op threads cost more in synchronisation than
    they save, and far more when the cores are shared (one path's 32 steps took 0.4 s on one
    thread and 15 s on two, on a busy 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sample_all(
    palette: Palette, data: Tensor, steps: int, seed: int, samples: int
) -> tuple[list[PathRun], dict[str, dict[str, Any]]]:
    """Sample every path of :data:`PATH_KINDS`; return the runs and their statistics."""
    runs, stats = [], {}
    for kind in PATH_KINDS:
        path = build_path(kind, palette.embeddings)
        result, seconds = sample_path(path, data, samples, steps, seed, return_trajectory=True)
        runs.append(PathRun(kind, result, seconds))
        memorised = {steps: memorised_fraction(result.samples, data)}
        for n in sweep_steps(steps):
            if n not in memorised:
                swept, _ = sample_path(path, data, samples, n, seed)
                memorised[n] = memorised_fraction(swept.samples, data)
        stats[kind] = {
            "label": PATH_LABELS[kind],
            "nfe": result.nfe,
            "wall_time_s": round(seconds, 4),
            "memorised_fraction": memorised[steps],
            "memorised_fraction_vs_steps": {str(n): memorised[n] for n in sorted(memorised)},
            **trajectory_stats(result.states, palette),
        }
    return runs, stats


def run_demo(
    out_dir: str | Path,
    steps: int = 32,
    seed: int = 0,
    samples: int = 16,
    images: int = 12,
) -> dict[str, Any]:
    """Run the demo, write its files into ``out_dir`` and return the summary (also saved as
    ``summary.json``).

    Args:
        out_dir: output folder, created if needed.
        steps: solver steps (= model calls) of every path.
        seed: seeds the dataset and every path's sampler.
        samples: sequences sampled per path (the GIF shows the first few).
        images: size of the dataset the exact posterior denoises towards.
    """
    for name, value in (("steps", steps), ("samples", samples), ("images", images)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    palette = make_palette()
    data = draw_dataset(images, palette, seed)
    with _one_thread():
        runs, stats = _sample_all(palette, data, steps, seed, samples)
        toy_tv = toy_tv_table()

    shown = min(SHOWN_SAMPLES, samples)
    frames = write_gif(runs, palette, out / "refinement.gif", shown)
    write_strip(runs, palette, out / "refinement_strip.png")
    summary = {
        "config": {
            "steps": steps,
            "seed": seed,
            "samples": samples,
            "images": images,
            "image_size": IMAGE_SIZE,
            "palette_colours": palette.size,
            "device": str(data.device),
        },
        "paths": stats,
        "toy_tv": toy_tv,
        "definitions": DEFINITIONS,
        "files": {
            "gif": "refinement.gif",
            "gif_frames": frames,
            "strip": "refinement_strip.png",
        },
        "total_wall_time_s": round(time.perf_counter() - start, 3),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


#: What each per-path statistic of ``summary.json`` means (saved alongside the numbers).
DEFINITIONS = {
    "memorised_fraction": "final samples equal to one of the dataset images",
    "memorised_fraction_vs_steps": "the same, re-sampled with other step counts",
    "self_correction_fraction": "tokens that reach their final value, leave it and come back",
    "mean_jumps_per_token": "value changes per token over the whole trajectory",
    "mean_jump_colour_distance": "RGB distance (palette levels) of colour-to-colour jumps",
    "settled_fraction": "per grid time, tokens already at their final value",
    "final_step_change_fraction": "tokens changed by the last step (x set to the drawn x1)",
    "toy_tv": "exact total variation between the solver's output law and the target",
}


def format_report(summary: dict[str, Any]) -> str:
    """The summary as compact plain-text tables."""
    cfg, paths, tv = summary["config"], summary["paths"], summary["toy_tv"]
    sweep = list(next(iter(paths.values()))["memorised_fraction_vs_steps"])
    name = 24

    def row(label: str, cells: Sequence[str], width: int = 10) -> str:
        return f"{label:<{name}}" + "".join(f"{c:>{width}}" for c in cells)

    def number(value: float | None, digits: int = 3) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"kineflow demo: exact posterior of {cfg['images']} {cfg['image_size']}x"
        f"{cfg['image_size']} images over {cfg['palette_colours']} colours; {cfg['samples']} "
        f"samples per path, {cfg['steps']} steps, seed {cfg['seed']}",
        "",
        row("path", ["NFE", "time/s", "memorised", *(f"mem@{n}" for n in sweep)]),
    ]
    for s in paths.values():
        memorised = s["memorised_fraction_vs_steps"].values()
        cells = [str(s["nfe"]), number(s["wall_time_s"], 2), number(s["memorised_fraction"])]
        lines.append(row(s["label"], cells + [number(m) for m in memorised]))
    lines += ["", row("trajectory", ["self-corr", "jumps/tok", "jump dRGB", "last-step"], 11)]
    for s in paths.values():
        cells = [
            number(s["self_correction_fraction"]),
            number(s["mean_jumps_per_token"], 2),
            number(s["mean_jump_colour_distance"], 2),
            number(s["final_step_change_fraction"]),
        ]
        lines.append(row(s["label"], cells, 11))
    lines += [
        "",
        f"exact TV(solver output law, target), {tv['problem']}",
        row("path / rate", [str(n) for n in tv["step_counts"]], 8),
    ]
    for kind, by_rate in tv["tv"].items():
        for rate, values in by_rate.items():
            lines.append(row(f"{kind} / {rate}", [number(v, 4) for v in values], 8))
    files = summary["files"]
    lines += [
        "",
        f"wrote {files['gif']} ({files['gif_frames']} frames), {files['strip']} and "
        f"summary.json in {summary['total_wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)
