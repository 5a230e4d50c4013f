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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kineflow.apps.demo.figures import write_gif, write_strip
from kineflow.apps.demo.sampling import sample_all, toy_problem, toy_tv_table
from kineflow.apps.demo.world import IMAGE_SIZE, PATH_KINDS, draw_dataset, make_palette

__all__ = ["DEFINITIONS", "PATH_KINDS", "format_report", "run_demo", "toy_problem"]

#: Grid shown in the GIF: this many samples per path.
SHOWN_SAMPLES = 4


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
        runs, stats = sample_all(palette, data, steps, seed, samples)
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
