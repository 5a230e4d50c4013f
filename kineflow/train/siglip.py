"""Pre-training a tiny SigLIP image encoder on ShapesWorld image-caption pairs; resumable.

FUDOKI reads pictures for understanding through a SigLIP ViT (:mod:`kineflow.models.siglip`)
that stays frozen (decoupled encoders, as in Janus). For the 32 px ShapesWorld demo that tower
is trained here, from scratch, with the sigmoid contrastive loss of SigLIP (Zhai et al. 2023):

1. :class:`SiglipPretrainModel` pairs the vision tower (``vision``) with a small text tower
   (token + position embeddings -> pre-norm transformer -> masked mean) over the ids of a
   :class:`~kineflow.tokenizers.text.TextTokenizer`; both are projected to ``embed_dim`` and
   L2-normalised, and the logits are ``exp(t) · x_i · y_j + b`` (:func:`sigmoid_loss`).
2. :func:`train_siglip` streams ShapesWorld ``caption`` items of ``data.split`` by global index
   (picture in [-1, 1] + the full caption in a caption template drawn by
   :func:`~kineflow.train.loop.sample_generator`) through :func:`~kineflow.train.loop.
   run_training` (metrics, atomic checkpoints, exact resume).
3. Only the vision tower is kept: ``out/vision`` is a pretrained folder of kind
   ``siglip_vision`` (:func:`load_siglip_vision`), and ``out/eval.json`` holds zero-shot
   retrieval among ``eval_pairs`` held-out test pairs of distinct scenes.

The image embedding is the *mean of the patch tokens* (after the tower's final LayerNorm), not
a MAP / attention-pool head: FUDOKI consumes the patch sequence itself (Janus runs SigLIP with
``ignore_head=True``), and a mean pool makes every patch token carry what the caption needs
instead of letting a discarded head do the work; it also adds no parameters that are thrown
away.

The loss over a batch is not a mean of per-sample terms (the negatives are the other samples),
so unlike the loop's other tasks, gradient accumulation or several processes change the
objective (each piece only sees its own negatives); train with ``grad_accum: 1`` on one
process for the paper's loss.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kineflow.io import atomic_write_json, load_pretrained, save_pretrained_folder
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.common import held_run, train_task
from kineflow.train.loop import Optim, sample_generator
from kineflow.train.run_config import TrainRunConfig

__all__ = [
    "VISION_KIND",
    "PairData",
    "SiglipPretrainConfig",
    "SiglipPretrainModel",
    "SiglipTrainConfig",
    "TextTower",
    "evaluate_retrieval",
    "load_siglip_vision",
    "shapes_pairs",
    "shapes_text_tokenizer",
    "sigmoid_loss",
    "train_siglip",
]

#: ``kineflow_type`` of the saved vision-tower folder.
VISION_KIND = "siglip_vision"
_SIGLIP_FIELDS = tuple(f.name for f in dataclasses.fields(SiglipConfig))


# -- the loss -------------------------------------------------------------------------------------
def sigmoid_loss(x: Tensor, y: Tensor, log_t: Tensor, b: Tensor) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1).

    ``x`` [B, E] image and ``y`` [B, E] text embeddings (L2-normalised; row ``i`` of each is
    a matched pair), ``log_t`` and ``b`` scalars (learnable log-temperature and bias):

        logits_ij = exp(log_t) · x_i · y_j + b                              [B, B]
        z_ij      = +1 if i = j (matched pair), −1 otherwise
        loss      = −(1 / B) · Σ_i Σ_j log σ(z_ij · logits_ij)

    i.e. the paper's normalisation by the batch size (``B`` times the mean over the ``B²``
    pairs): every sample contributes its positive and its ``B − 1`` negatives. Returns a
    scalar.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both be [B, E], got {list(x.shape)} and {list(y.shape)}")
    n = x.shape[0]
    logits = log_t.exp() * (x @ y.t()) + b
    z = 2 * torch.eye(n, dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(z * logits).sum() / n


# -- the model ------------------------------------------------------------------------------------
@dataclass
class SiglipPretrainConfig:
    """The ``model`` section of a SigLIP pre-training YAML, parsed.

    ``vision``: the tower's :class:`SiglipConfig` (its fields sit flat in the YAML section);
    ``embed_dim``: the shared embedding size; ``text_*``: the text tower (width, blocks,
    heads, longest caption in tokens; longer ones are cut).
    """

    vision: SiglipConfig
    embed_dim: int = 64
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_max_len: int = 64

    def __post_init__(self) -> None:
        for name in ("embed_dim", "text_width", "text_layers", "text_heads", "text_max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.text_width % self.text_heads:
            raise ValueError(
                f"model.text_width {self.text_width} is not divisible by model.text_heads "
                f"{self.text_heads}"
            )

    @classmethod
    def from_dict(cls, model: dict[str, Any]) -> SiglipPretrainConfig:
        """From the flat YAML section: :class:`SiglipConfig` fields plus this class's others."""
        if not isinstance(model, dict):
            raise ValueError(f"model must be a mapping, got {model!r}")
        own = {f.name for f in dataclasses.fields(cls)} - {"vision"}
        unknown = sorted(set(model) - own - set(_SIGLIP_FIELDS))
        if unknown:
            known = sorted(own | set(_SIGLIP_FIELDS))
            raise ValueError(
                f"unknown config key(s) {['model.' + k for k in unknown]}; known keys are "
                f"{['model.' + k for k in known]}"
            )
        vision = {k: v for k, v in model.items() if k in _SIGLIP_FIELDS}
        try:
            vision_config = SiglipConfig(**vision)
        except TypeError as err:  # a required field is missing
            raise ValueError(f"model: {err}") from None
        except ValueError as err:
            raise ValueError(f"model: {err}") from None
        return cls(vision=vision_config, **{k: v for k, v in model.items() if k in own})


class TextTower(nn.Module):
    """Token ids [B, L] (+ mask [B, L], True at real tokens) -> text features [B, width].

    Token + learned position embeddings, ``layers`` pre-norm transformer blocks (padding
    masked out of attention), a final LayerNorm and the mean over the real tokens.
    """

    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, width)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, width) * 0.02)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.embed(ids) + self.pos_embed[:, : ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)


class SiglipPretrainModel(nn.Module):
    """The SigLIP vision tower plus what contrastive pre-training needs around it.

    Shapes (``E = embed_dim``, ``D`` = vision width, ``N`` patches):

        pixels [B, 3, S, S] in [-1, 1] -> vision -> [B, N, D] -> mean over N -> image_proj
            -> L2-normalise -> x [B, E]
        texts -> tokenizer ids [B, L] -> text tower -> [B, text_width] -> text_proj
            -> L2-normalise -> y [B, E]
        loss = sigmoid_loss(x, y, log_t, b)   (log_t init log 10, b init −10, as in the paper)

    ``vision`` is a plain :class:`SiglipVisionModel` (what gets saved); the tokenizer is kept
    as an attribute, not in the state dict.
    """

    def __init__(self, config: SiglipPretrainConfig, tokenizer: TextTokenizer) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        v = config.vision
        self.vision = SiglipVisionModel(v)
        # The tower builds pos_embed as zeros (it expects a checkpoint); training starts random.
        nn.init.normal_(self.vision.pos_embed, std=0.02)
        self.text = TextTower(
            tokenizer.vocab_size,
            config.text_width,
            config.text_layers,
            config.text_heads,
            config.text_max_len,
        )
        self.image_proj = nn.Linear(v.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_width, config.embed_dim)
        self.log_t = nn.Parameter(torch.tensor(math.log(10.0)))
        self.b = nn.Parameter(torch.tensor(-10.0))

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(ids [B, L], mask [B, L])``, padded with the pad id to the longest text (at
        most ``text_max_len`` tokens; longer texts are cut)."""
        encoded = [e[: self.config.text_max_len] for e in self.tokenizer.encode_batch(texts)]
        length = max(1, max(len(e) for e in encoded))
        ids = torch.full((len(encoded), length), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(encoded), length, dtype=torch.bool)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[i, : len(e)] = True
        return ids, mask

    def encode_images(self, pixels: Tensor) -> Tensor:
        """L2-normalised image embeddings [B, E]."""
        return F.normalize(self.image_proj(self.vision(pixels).mean(1)), dim=-1)

    def encode_texts(self, ids: Tensor, mask: Tensor) -> Tensor:
        """L2-normalised text embeddings [B, E]."""
        return F.normalize(self.text_proj(self.text(ids, mask)), dim=-1)

    def forward(self, pixels: Tensor, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The loss of a batch of matched pairs plus diagnostics (all scalars)."""
        x, y = self.encode_images(pixels), self.encode_texts(ids, mask)
        loss = sigmoid_loss(x, y, self.log_t, self.b)
        with torch.no_grad():
            sims = x @ y.t()
            target = torch.arange(len(x), device=x.device)
            acc = (sims.argmax(1) == target).float().mean()
        return {
            "loss": loss,
            "batch_i2t_acc": acc,
            "temperature": self.log_t.detach().exp(),
            "bias": self.b.detach(),
        }


# -- data -----------------------------------------------------------------------------------------
@dataclass
class PairData:
    """ShapesWorld ``caption`` items of ``split`` (world ``seed``, ``image_size`` px).

    ``random_template``: the caption of sample ``i`` uses a caption template drawn from
    ``sample_generator(seed, i)`` (all describe the full scene); False: always the canonical
    one.
    """

    split: str = "train"
    image_size: int = 32
    seed: int = 0
    random_template: bool = True

    def __post_init__(self) -> None:
        from kineflow.data.shapes.scene import SPLITS

        if self.split not in SPLITS:
            raise ValueError(f"data.split must be one of {SPLITS}, got {self.split!r}")
        if self.image_size not in (32, 64):
            raise ValueError(f"data.image_size must be 32 or 64, got {self.image_size!r}")


def shapes_pairs(
    data: PairData, indices: list[int], tower_size: int | None = None
) -> tuple[Tensor, list[str], list[str]]:
    """Items ``indices`` of ``data``: pictures [n, 3, S, S] in [-1, 1], captions, scene keys.

    ``S`` is ``data.image_size`` (the rendered size), or ``tower_size`` when given and
    different: the pictures are then resized as the models resize them for their tower
    (:func:`~kineflow.inputs.images.preprocess_understanding`), so a tower whose patches tile
    the 3 x 3 grid (48 px, 16-px patches) is trained on what it will see."""
    from PIL import Image

    from kineflow.data.example import image_to_tensor
    from kineflow.data.shapes.dataset import draw_item
    from kineflow.data.shapes.language import CAPTION_TEMPLATES, caption
    from kineflow.data.shapes.render import render
    from kineflow.data.shapes.scene import Scene
    from kineflow.inputs.images import preprocess_understanding

    world = _world(data)
    pictures, texts, keys = [], [], []
    for i in indices:
        scene = Scene.from_key(draw_item(world, "caption", data.split, i).scene_key)
        template = 0
        if data.random_template:
            g = sample_generator(data.seed, i)
            template = int(torch.randint(len(CAPTION_TEMPLATES), (), generator=g))
        picture = render(scene, data.image_size)
        if tower_size is None or tower_size == data.image_size:
            pictures.append(image_to_tensor(picture))
        else:
            pictures.append(preprocess_understanding([Image.fromarray(picture)], tower_size)[0])
        texts.append(caption(scene, template))
        keys.append(scene.key())
    return torch.stack(pictures), texts, keys


_WORLDS: dict[tuple[int, int], Any] = {}


def _world(data: PairData):
    from kineflow.data.shapes.scene import ShapesWorld, WorldConfig

    key = (data.seed, data.image_size)
    if key not in _WORLDS:
        _WORLDS[key] = ShapesWorld(WorldConfig(seed=data.seed, image_size=data.image_size))
    return _WORLDS[key]


class _SiglipTask:
    """Image-caption pairs by global index; the sigmoid contrastive loss."""

    def __init__(self, model: SiglipPretrainModel, data: PairData) -> None:
        self.model = model
        self.data = data

    def batch(self, indices: list[int]) -> dict[str, Tensor]:
        size = self.model.vision.config.image_size
        pixels, texts, _ = shapes_pairs(self.data, indices, size)
        ids, mask = self.model.tokenize(texts)
        return {"pixels": pixels, "ids": ids, "mask": mask}

    def losses(self, batch: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        return model(batch["pixels"], batch["ids"], batch["mask"])


# -- config ---------------------------------------------------------------------------------------
@dataclass
class SiglipTrainConfig(TrainRunConfig):
    """A SigLIP pre-training run (the YAML file's sections).

    ``model``: :class:`SiglipConfig` fields plus ``embed_dim`` and ``text_*``
    (:class:`SiglipPretrainConfig`); ``data``: :class:`PairData`; ``optim``: the loop's
    :class:`~kineflow.train.loop.Optim`; ``eval_pairs``: held-out test pairs (distinct
    scenes) that retrieval is measured among; ``threads``: torch CPU threads (None: default).
    """

    SECTIONS: ClassVar[dict[str, type]] = {"data": PairData, "optim": Optim}
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "out")
    # The model section lists the vision tower's fields flat, beside the text tower's.
    MODEL_TYPES: ClassVar[tuple[type, ...]] = (SiglipConfig, SiglipPretrainConfig)

    model: dict[str, Any]
    out: str
    data: PairData = field(default_factory=PairData)
    optim: Optim = field(default_factory=Optim)
    log_every: int = 25
    ckpt_every: int = 250
    ckpt_minutes: float | None = None
    eval_pairs: int = 256
    threads: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pretrain_config()  # validates the model section now
        if (
            isinstance(self.eval_pairs, bool)
            or not isinstance(self.eval_pairs, int)
            or (self.eval_pairs < 2)
        ):
            raise ValueError(f"eval_pairs must be an integer >= 2, got {self.eval_pairs!r}")

    def pretrain_config(self) -> SiglipPretrainConfig:
        return SiglipPretrainConfig.from_dict(self.model)


# -- eval -----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_retrieval(
    model: SiglipPretrainModel, n: int, data: PairData, batch_size: int = 256
) -> dict[str, Any]:
    """Zero-shot retrieval among ``n`` pairs of distinct scenes of ``data.split`` (the first
    ``n`` distinct scenes of its caption items, canonical captions): image→text and
    text→image top-1 / top-5 accuracy, with the chance level ``1 / n``."""
    data = dataclasses.replace(data, random_template=False)
    pictures, texts, seen = [], [], set()
    index = 0
    while len(texts) < n:
        if index > 100 * n:
            raise RuntimeError(f"fewer than {n} distinct {data.split} scenes in {index} items")
        chunk = list(range(index, index + batch_size))
        index += batch_size
        pix, txt, keys = shapes_pairs(data, chunk, model.vision.config.image_size)
        for p, t, k in zip(pix, txt, keys, strict=True):
            if k not in seen and len(texts) < n:
                seen.add(k)
                pictures.append(p)
                texts.append(t)
    was_training = model.training
    model.eval()
    xs, ys = [], []
    for s in range(0, n, batch_size):
        xs.append(model.encode_images(torch.stack(pictures[s : s + batch_size])))
        ys.append(model.encode_texts(*model.tokenize(texts[s : s + batch_size])))
    model.train(was_training)
    sims = torch.cat(xs) @ torch.cat(ys).t()  # [n images, n texts]
    target = torch.arange(n)

    def top(scores: Tensor, k: int) -> float:
        k = min(k, n)
        return float((scores.topk(k, dim=1).indices == target[:, None]).any(1).float().mean())

    return {
        "pairs": n,
        "split": data.split,
        "chance": 1 / n,
        "i2t_top1": top(sims, 1),
        "i2t_top5": top(sims, 5),
        "t2i_top1": top(sims.t(), 1),
        "t2i_top5": top(sims.t(), 5),
        "temperature": float(model.log_t.exp()),
        "bias": float(model.b),
    }


# -- training and loading -------------------------------------------------------------------------
def train_siglip(
    config: SiglipTrainConfig, text_tokenizer: TextTokenizer, progress: bool = True
) -> dict:
    """Run (or resume) the pre-training described by ``config``; returns the eval report.

    Writes ``out/metrics.jsonl``, ``out/checkpoint/`` (the whole model, for resuming),
    ``out/vision/`` (the vision tower only, see :func:`load_siglip_vision`) and
    ``out/eval.json`` (:func:`evaluate_retrieval` on ``eval_pairs`` test pairs).
    ``text_tokenizer`` must be the same on a resumed run. ``out`` is held for the whole run
    (:func:`~kineflow.train.run_folder.hold_run_folder`).
    """
    with held_run(config) as out:
        torch.manual_seed(config.optim.seed)
        model = SiglipPretrainModel(config.pretrain_config(), text_tokenizer)
        summary = train_task(_SiglipTask(model, config.data), config, out, progress, "train siglip")
        vision_config = model.config.vision.to_dict()
        save_pretrained_folder(
            out / "vision",
            model.vision.state_dict(),
            {**vision_config, "training": config.to_dict()},
            kind=VISION_KIND,
        )
        test = dataclasses.replace(config.data, split="test")
        report = evaluate_retrieval(model, config.eval_pairs, test)
        report["train_seconds_this_run"] = summary["seconds_this_run"]
        report["steps"] = config.optim.steps
        report["last"] = summary["last"]
        report["resumed_from"] = summary["resumed_from"]
        report["already_complete_at"] = summary["already_complete_at"]
        atomic_write_json(out / "eval.json", report)
    return report


def shapes_text_tokenizer(n: int = 2000, vocab_size: int = 512, seed: int = 0) -> TextTokenizer:
    """The ShapesWorld text tokenizer (what ``kineflow data tokenizer`` trains with the same
    arguments): byte-level BPE on ``corpus(ShapesWorld(seed), n)``; deterministic."""
    from kineflow.data.shapes.dataset import corpus
    from kineflow.data.shapes.scene import ShapesWorld, WorldConfig
    from kineflow.tokenizers.text import train_text_tokenizer

    return train_text_tokenizer(
        corpus(ShapesWorld(WorldConfig(seed=seed)), n), vocab_size=vocab_size
    )


def load_pretrained_tower(
    tower: SiglipVisionModel | None,
    expected: SiglipConfig | None,
    folder: str | os.PathLike[str],
    trainable: bool = False,
) -> None:
    """Fill a model's understanding ``tower`` (configured as ``expected``) with the weights
    :func:`train_siglip` saved in ``folder``; frozen unless ``trainable``.

    Raises:
        ValueError: the model has no tower, or the folder holds a tower of another shape.
    """
    saved = load_siglip_vision(folder)
    if tower is None or expected is None:
        raise ValueError(f"a SigLIP folder ({folder}) was given but the model has no model.vision")
    if saved.config.to_dict() != expected.to_dict():
        raise ValueError(
            f"the SigLIP folder {folder} holds {saved.config.to_dict()}, but model.vision is "
            f"{expected.to_dict()}"
        )
    tower.load_state_dict(saved.state_dict())
    tower.requires_grad_(trainable)


def load_siglip_vision(folder: str | os.PathLike[str]) -> SiglipVisionModel:
    """The vision tower :func:`train_siglip` saved in ``folder`` (``out/vision``).

    Its ``config.json`` holds the :class:`SiglipConfig` fields (plus ``training``, the run's
    config, which is not needed to build the model).
    """

    def build(config: dict[str, Any]) -> SiglipVisionModel:
        config = {k: v for k, v in config.items() if k != "training"}
        return SiglipVisionModel(SiglipConfig.from_dict(config))

    return load_pretrained(folder, VISION_KIND, "SigLIP vision tower", build)
