"""Where understanding is lost: linear probes of a model's picture features and a VQA breakdown.

**Probes.** ShapesWorld scenes are rendered and handed to the pipeline's own ``answer`` (so
the pictures are preprocessed exactly as for a question); the model's ``encode_images`` call
is intercepted and the call stops there. Three feature sets per picture, flattened:

- ``pixels``: what the vision tower reads, ``Float[I, 3·S·S]``;
- ``tower``: the vision tower's output, the aligner's input, ``Float[I, P·D_v]``;
- ``aligner``: what the language model reads (the aligner's output, plus FUDOKI's position table
  when it has one), ``Float[I, P·D]``.

Each feature set gets one multinomial logistic regression per target and grid cell
(:func:`fit_probe`): ``occupied`` (9 cells, 2 classes), ``colour`` and ``shape`` of the object
in a cell (occupied cells only; 6 and 3 classes), and the object ``count`` (one "cell",
``MAX_OBJECTS + 1`` classes). Features are standardised with the training mean and standard
deviation; the loss is ``Σ_k mean_n CE(X_n W_k + b_k, y_nk) + λ ‖W‖²`` (full batch, L-BFGS);
``λ`` is picked by accuracy on a validation split carved from the training scenes. Test
accuracy is the pooled pass rate over (scene, cell) pairs with a bootstrap interval over test
scenes (:func:`kineflow.eval.stats.bootstrap_ci`, weighted by each scene's valid cells).

**VQA breakdown** (:func:`vqa_breakdown`): accuracy by question type; accuracy when every
question is asked about another question's picture (a derangement: a model that reads the
picture drops, one that answers from the question alone keeps its score); and, on the yes/no
existence questions, how often the model says "yes" against the true share of "yes".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.language import normalise_answer
from kineflow.data.shapes.render import render_image
from kineflow.data.shapes.scene import CELLS, COLOURS, MAX_OBJECTS, SHAPES, Scene, ShapesWorld
from kineflow.eval.scores import score_vqa
from kineflow.eval.stats import bootstrap_ci, ci_pair

__all__ = [
    "FEATURES",
    "TARGETS",
    "ProbeConfig",
    "capture_features",
    "fit_probe",
    "probe_model",
    "scene_labels",
    "vqa_breakdown",
]

FEATURES: tuple[str, ...] = ("pixels", "tower", "aligner")
TARGETS: dict[str, int] = {  # target -> number of classes
    "occupied": 2,
    "colour": len(COLOURS),
    "shape": len(SHAPES),
    "count": MAX_OBJECTS + 1,
}
_COLOURS, QUESTION = tuple(COLOURS), "Describe the picture."


@dataclass
class ProbeConfig:
    """``train`` / ``test`` scenes (ShapesWorld ``train`` and ``test`` splits), the validation
    share of the training scenes, the weight-decay grid, L-BFGS iterations, VQA questions
    (0: no breakdown) and the seed of the shuffles and intervals."""

    train: int = 3000
    test: int = 1000
    val_fraction: float = 0.2
    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    iterations: int = 60
    vqa_items: int = 300
    batch_size: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.train < 10 or self.test < 1:
            raise ValueError(
                f"need train >= 10 and test >= 1 scenes, got {self.train}, {self.test}"
            )
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError(f"weight_decays must be >= 0, got {self.weight_decays}")


def scene_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """Int labels per target: ``occupied`` / ``colour`` / ``shape`` ``[N, 9]`` (cells in
    reading order; ``-1`` where the cell is empty, for colour and shape) and ``count``
    ``[N, 1]``."""
    n = len(scenes)
    occupied = np.zeros((n, len(CELLS)), np.int64)
    colour, shape = np.full((n, len(CELLS)), -1), np.full((n, len(CELLS)), -1)
    for i, scene in enumerate(scenes):
        for o in scene:
            k = CELLS.index(o.cell)
            occupied[i, k] = 1
            colour[i, k], shape[i, k] = _COLOURS.index(o.colour), SHAPES.index(o.shape)
    count = np.array([[len(s)] for s in scenes], np.int64)
    return {"occupied": occupied, "colour": colour, "shape": shape, "count": count}


class _CapturedError(Exception):  # stops ``answer`` once the picture features are in hand
    pass


@torch.no_grad()
def capture_features(pipe: Any, pictures: list[Any], batch_size: int = 100) -> dict[str, Tensor]:
    """``{"pixels", "tower", "aligner"}`` -> ``Float[I, F]`` for ``pictures``, taken from the
    pipeline's own ``answer`` path: its preprocessing, then ``model.encode_images`` (which is
    ``aligner(tower(pixels))`` in every family with an understanding encoder, plus FUDOKI's
    position table when it has one): ``aligner`` is what ``encode_images`` returns, the
    aligner's forward hook gives the tower output."""
    model, out = pipe.model, {k: [] for k in FEATURES}
    original = model.encode_images

    def grab(pixels: Tensor) -> Tensor:
        def hook(_module: Any, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
            out["tower"].append(inputs[0].flatten(1).float().cpu())

        handle = model.aligner.register_forward_hook(hook)
        try:
            out["aligner"].append(original(pixels).flatten(1).float().cpu())
        finally:
            handle.remove()
        out["pixels"].append(pixels.flatten(1).float().cpu())
        raise _CapturedError

    model.encode_images = grab  # an instance attribute: the class method stays untouched
    try:
        for lo in range(0, len(pictures), batch_size):
            batch = pictures[lo : lo + batch_size]
            try:
                pipe.answer(batch, [QUESTION] * len(batch))
            except _CapturedError:
                continue
            raise RuntimeError("the pipeline's answer did not call model.encode_images")
    finally:
        del model.encode_images
    return {k: torch.cat(v) for k, v in out.items()}


def _fit(x: Tensor, y: Tensor, classes: int, weight_decay: float, iterations: int) -> Tensor:
    """Weights ``[K, F + 1, C]`` (bias last) of K independent multinomial regressions."""
    n, f = x.shape
    k = y.shape[1]
    xb = torch.cat([x, torch.ones(n, 1)], 1)
    w = torch.zeros(k, f + 1, classes, requires_grad=True)
    valid = y >= 0
    per_cell = valid.sum(0).clamp(min=1).float()
    target = y.clamp(min=0)
    opt = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        logits = torch.einsum("nf,kfc->nkc", xb, w)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        loss = ((ce * valid).sum(0) / per_cell).sum() + weight_decay * w[:, :-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict(x: Tensor, w: Tensor) -> Tensor:
    xb = torch.cat([x, torch.ones(len(x), 1)], 1)
    return torch.einsum("nf,kfc->nkc", xb, w).argmax(-1)


def fit_probe(
    x: np.ndarray | Tensor,
    y: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    classes: int,
    config: ProbeConfig | None = None,
) -> dict[str, Any]:
    """Probe ``y`` (Int[N, K], ``-1`` = no label) from ``x`` (Float[N, F]) with rows
    ``train`` (the last ``val_fraction`` of them validate the weight decay) and report on rows
    ``test``: ``accuracy`` with ``accuracy_ci``, ``val_accuracy``, the chosen
    ``weight_decay``, ``chance`` (the majority class of the training labels, on test) and
    ``n`` (labelled test pairs)."""
    c = config or ProbeConfig()
    x = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    y_t = torch.as_tensor(y, dtype=torch.long)
    n_val = max(1, round(len(train) * c.val_fraction))
    fit_rows, val_rows = train[:-n_val], train[-n_val:]
    mean, std = x[fit_rows].mean(0), x[fit_rows].std(0).clamp(min=1e-6)
    z = (x - mean) / std

    def accuracy(w: Tensor, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hit = (_predict(z[rows], w) == y_t[rows]) & (y_t[rows] >= 0)
        return hit.sum(1).numpy(), (y_t[rows] >= 0).sum(1).numpy()

    best = None
    for wd in c.weight_decays:
        w = _fit(z[fit_rows], y_t[fit_rows], classes, wd, c.iterations)
        hits, valid = accuracy(w, val_rows)
        val = hits.sum() / max(valid.sum(), 1)
        if best is None or val > best[0]:
            best = (val, wd, w)
    val, wd, w = best
    hits, valid = accuracy(w, test)
    keep = valid > 0
    acc = bootstrap_ci(hits[keep] / valid[keep], seed=c.seed, weights=valid[keep])
    train_labels = y[fit_rows][y[fit_rows] >= 0]
    majority = np.bincount(train_labels, minlength=classes).argmax()
    chance = float((y[test] == majority).sum() / max((y[test] >= 0).sum(), 1))
    return {"accuracy": acc[0], "accuracy_ci": ci_pair(acc), "val_accuracy": float(val),
            "weight_decay": wd, "chance": chance, "n": int(valid.sum())}  # fmt: skip


def vqa_breakdown(
    pipe: Any, n: int, *, steps: int | None = None, batch_size: int = 100, seed: int = 0
) -> dict[str, Any]:
    """The first ``n`` test VQA questions asked of ``pipe`` twice: about their own pictures
    (``score_vqa``'s report without rows: overall and by type, with intervals) and about the
    picture of another question (``shuffled``); the existence questions' ``yes_rate`` against
    ``true_yes_share``. ``steps`` goes to ``answer`` where the pipeline uses it."""
    world = ShapesWorld()
    items = [draw_item(world, "vqa", "test", i) for i in range(n)]
    pictures = [render_image(Scene.from_key(it.scene_key)) for it in items]
    questions = [it.texts["question"] for it in items]
    # A derangement: question i gets picture perm[i] != i (a cyclic shift of a random order).
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, np.int64)
    perm[order] = np.roll(order, 1)
    options = {"steps": steps} if steps is not None and pipe.uses_option("answer", "steps") else {}

    def ask(pics: list[Any]) -> list[str]:
        texts: list[str] = []
        for k, lo in enumerate(range(0, n, batch_size)):
            out = pipe.answer(pics[lo : lo + batch_size], questions[lo : lo + batch_size],
                              seed=seed + k, **options)  # fmt: skip
            texts += out.texts
        return texts

    rows = [{"id": it.id, "type": it.kind, **it.texts} for it in items]
    own = ask(pictures)
    shuffled = ask([pictures[j] for j in perm])
    report = score_vqa(rows, {it.id: a for it, a in zip(items, own, strict=True)}, seed=seed)
    mixed = score_vqa(rows, {it.id: a for it, a in zip(items, shuffled, strict=True)}, seed=seed)
    exist = [i for i, it in enumerate(items) if it.kind == "exist"]
    said_yes = [normalise_answer(own[i]) == "yes" for i in exist]
    truly_yes = [normalise_answer(items[i].texts["answer"]) == "yes" for i in exist]
    yes = bootstrap_ci(said_yes, seed=seed)
    return {
        "n": n,
        "accuracy": report["accuracy"],
        "accuracy_ci": report["accuracy_ci"],
        "by_type": report["by_type"],
        "shuffled_accuracy": mixed["accuracy"],
        "shuffled_accuracy_ci": mixed["accuracy_ci"],
        "shuffled_by_type": mixed["by_type"],
        "exist": {
            "n": len(exist),
            "yes_rate": yes[0],
            "yes_rate_ci": ci_pair(yes),
            "true_yes_share": float(np.mean(truly_yes)) if exist else float("nan"),
        },
        "examples": [
            {"question": q, "answer": it.texts["answer"], "prediction": a, "shuffled": b}
            for q, it, a, b in zip(questions, items, own, shuffled, strict=True)
        ][:12],
    }


def probe_model(
    pipe: Any, config: ProbeConfig | None = None, *, steps: int | None = None
) -> dict[str, Any]:
    """Every probe (feature set × target) and the VQA breakdown of ``pipe`` (a pipeline with
    an understanding encoder): a JSON-ready dict with the config, feature widths, ``probes``
    ``{feature: {target: fit_probe report}}`` and ``vqa``."""
    c = config or ProbeConfig()
    world = ShapesWorld()
    scenes = list(world.scenes("train", c.train)) + list(world.scenes("test", c.test))
    pictures = [render_image(s) for s in scenes]
    features = capture_features(pipe, pictures, c.batch_size)
    labels = scene_labels(scenes)
    train, test = np.arange(c.train), np.arange(c.train, c.train + c.test)
    probes = {
        name: {t: fit_probe(x, labels[t], train, test, k, c) for t, k in TARGETS.items()}
        for name, x in features.items()
    }
    vqa = (
        vqa_breakdown(pipe, c.vqa_items, steps=steps, batch_size=c.batch_size, seed=c.seed)
        if c.vqa_items
        else None
    )
    return {
        "model": pipe.display_name,
        "config": asdict(c),
        "widths": {k: int(v.shape[1]) for k, v in features.items()},
        "probes": probes,
        "vqa": vqa,
    }
