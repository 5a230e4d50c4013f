"""Training UniFluid on ShapesWorld through the shared loop.

A batch mixes three kinds of samples, each drawn (with its scene, its generation order, its
CFG dropout) from its own seeded generator:

    gen    BOS "User: {caption}\\n\\nAssistant:" <boi>  →  the picture's L KL-VAE tokens
    edit   BOS "User: " <boi> <img>×L <eoi> "{instruction}\\n\\nAssistant:" <boi>
           →  the edited picture's tokens (the source picture enters as its own L tokens,
           after its P understanding features with ``model.edit_features``: <img>×(P + L))
    und    the understanding layout of :mod:`kineflow.inputs.layout` (VQA or captioning)
           →  the answer slots (answer, then EOS)

Loss (docs/design.md §2.7): each generation / editing sample contributes its diffusion loss, each
understanding sample ``λ`` times its cross-entropy; the batch loss is the mean over samples,
so it averages exactly over processes. The KL-VAE is frozen; SigLIP starts from ``vision``
(a pre-trained tower) and is frozen too. Image tokens are the VAE posterior means scaled to
unit variance (``token_scale``, by default 1 / their std over 256 training pictures).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import Tensor, nn

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import Scene, ShapesWorld
from kineflow.inputs.images import preprocess_understanding
from kineflow.inputs.layout import stack_layouts
from kineflow.io import atomic_write_json
from kineflow.models.unifluid import UnifluidConfig, UnifluidModel, generation_order
from kineflow.tokenizers.kl_vae import AutoencoderKL
from kineflow.tokenizers.text import TextTokenizer
from kineflow.train.common import (
    ShapesData,
    card_record,
    data_meta,
    frozen_copy,
    held_run,
    language_with_vocab,
    layout_record,
    open_shards,
    picture_tensor,
    record_layout,
    step_exports,
    train_task,
    understanding_sample,
)
from kineflow.train.init_from import init_weights_from
from kineflow.train.loop import Optim, sample_generator
from kineflow.train.lora import LoraSettings, finish_lora, prepare_lora
from kineflow.train.own_data import UNIFLUID_TASKS, OwnData, unifluid_record
from kineflow.train.run_config import TrainRunConfig
from kineflow.train.run_folder import process_rank
from kineflow.train.siglip import load_pretrained_tower

__all__ = [
    "UnifluidData",
    "UnifluidTask",
    "UnifluidTrainConfig",
    "build_unifluid",
    "train_unifluid",
]


@dataclass
class UnifluidData(ShapesData):
    """:class:`~kineflow.train.common.ShapesData` plus ``edit_ratio``: shares of the batch are
    ``understanding_ratio`` VQA / captioning (``caption_ratio`` of those captioning),
    ``edit_ratio`` editing, the rest text-to-image."""

    understanding_ratio: float = 0.4
    vqa_answer_tokens: int = 2
    caption_tokens: int = 40
    edit_ratio: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.edit_ratio <= 1 - self.understanding_ratio:
            raise ValueError(
                f"data.edit_ratio must be in [0, 1 - understanding_ratio], got {self.edit_ratio!r}"
            )


@dataclass
class UnifluidTrainConfig(TrainRunConfig):
    """A run: ``model`` holds :class:`UnifluidConfig` fields except ``vae`` (read from the
    ``vae`` folder); ``language.vocab_size`` defaults to the text tokenizer's size."""

    SECTIONS: ClassVar[dict[str, type]] = {
        "data": UnifluidData, "optim": Optim, "lora": LoraSettings,
    }  # fmt: skip
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "vae", "text_tokenizer", "out")
    MODEL_TYPES: ClassVar[tuple[type, ...]] = (UnifluidConfig,)

    model: dict[str, Any]
    vae: str
    text_tokenizer: str
    out: str
    vision: str | None = None
    init_from: str | None = None
    data: UnifluidData = field(default_factory=UnifluidData)
    optim: Optim = field(default_factory=Optim)
    log_every: int = 25
    ckpt_every: int = 250
    ckpt_minutes: float | None = None
    parallel: str = "none"
    threads: int | None = None
    token_scale: float | None = None
    export_steps: list[int] = field(default_factory=list)
    lora: LoraSettings | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.token_scale is not None and not self.token_scale > 0:
            raise ValueError(f"token_scale must be > 0 or null, got {self.token_scale!r}")


def build_unifluid(config: UnifluidTrainConfig, tokenizer: TextTokenizer) -> UnifluidModel:
    """The network around the frozen KL-VAE (and, with ``vision``, the pre-trained SigLIP)."""
    vae = AutoencoderKL.from_pretrained(config.vae)
    model_dict = dict(config.model)
    model_dict["language"] = language_with_vocab(model_dict, tokenizer, config.text_tokenizer)
    # The diffusion head's schedule assumes unit-variance tokens (SD's 0.18215 is for SD's
    # VAE): rescale the latents by 1 / their std over fixed training pictures unless given.
    scale = config.token_scale or _unit_variance_scale(vae, config.data)
    vae_config = dataclasses.replace(vae.config, scaling_factor=float(scale),
                                     shift_factor=0.0)  # fmt: skip
    model = UnifluidModel(UnifluidConfig(vae=vae_config, **model_dict))
    model.vae.load_state_dict(vae.state_dict())
    model.vae.requires_grad_(False)
    if config.vision is not None:
        load_pretrained_tower(model.vision_model, model.config.vision, config.vision)
    return model


@torch.no_grad()
def _calibration_latents(vae: AutoencoderKL, data: UnifluidData, pictures: int = 256) -> Tensor:
    """The VAE's posterior means (unscaled) of the first ``pictures`` training pictures (the
    text-to-image items of ``data.split``): deterministic, so a resumed run sees the same."""
    world = ShapesWorld()
    items = (draw_item(world, "t2i", data.split, i) for i in range(pictures))
    batch = [render(Scene.from_key(item.scene_key), data.image_size) for item in items]
    return vae.encode(picture_tensor(batch, next(vae.parameters()).device)).mode().float()


def _unit_variance_scale(vae: AutoencoderKL, data: UnifluidData) -> float:
    """``1 / std`` of the calibration latents."""
    return float(1.0 / _calibration_latents(vae, data).std())


def token_range(model: UnifluidModel, data: UnifluidData) -> float:
    """The largest ``|x|`` of the model's (scaled) tokens over the calibration pictures,
    rounded up to a multiple of 0.5: the pipeline clamps the diffusion head's ``x̂_0`` there,
    the way pixel-space diffusion clamps to ``[−1, 1]``. Clamping tighter (e.g. ±3σ) shifts the
    colours of the rare, saturated object tokens; not at all lets the first noisy steps run
    away."""
    z = model.vae.scale(_calibration_latents(model.vae, data))
    return math.ceil(float(z.abs().max()) * 2) / 2


class UnifluidTask:
    """Batches and losses of :func:`train_unifluid` (see the module docstring).

    ``batch`` is CPU work only; ``losses`` runs the frozen KL-VAE on on-the-fly pictures on
    the training device. With ``data.shards`` the samples (kind, prompt, order, latents) come
    from a ``kineflow data encode`` folder: no renderer, tokenizer or KL-VAE per step.
    """

    KIND = "unifluid"

    def __init__(self, model: UnifluidModel, tokenizer: TextTokenizer, config: UnifluidTrainConfig):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.data = config.data
        self.world = ShapesWorld()
        vision = model.config.vision
        self.num_patches = vision.num_patches if vision is not None else 0
        # The frozen KL-VAE's copy, made now: once FSDP wraps the model its weights are shards.
        self.encoder: nn.Module | None = None if self.data.shards else frozen_copy(model.vae)
        self.shards = open_shards(self, self.data.shards) if self.data.shards else None
        self.own = OwnData(self.data, UNIFLUID_TASKS, tokenizer) if self.data.manifest else None

    def _kind(self, g: torch.Generator) -> str:
        u = float(torch.rand((), generator=g))
        d = self.data
        if u < d.understanding_ratio:
            return "und" if self.num_patches else "gen"  # no SigLIP tower: no understanding
        if u < d.understanding_ratio + d.edit_ratio:
            return "edit"
        return "gen"

    def _prompt(self, text: str, image: bool, g: torch.Generator) -> list[int]:
        """Chat-template ids ending in ``<boi>``; an editing prompt starts its user turn with
        the source picture's ``L`` token placeholders. A text-to-image prompt is blanked (pad after
        BOS) with probability ``cfg_dropout``, for classifier-free guidance."""
        tok = self.tokenizer
        message = (tok.image_span(1) if image else "") + text
        chat = tok.apply_chat_template([{"role": "user", "content": message}], system="")
        ids = tok.encode(chat, bos=True)
        if image:
            at = ids.index(tok.image_id)
            ids[at : at + 1] = [tok.image_id] * self.model.config.edit_placeholders
        elif float(torch.rand((), generator=g)) < self.data.cfg_dropout:
            ids = ids[:1] + [tok.pad_id] * (len(ids) - 1)
        return [*ids, tok.boi_id]

    def record(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` on the fly as a record (:mod:`kineflow.data.shards`): ``kind`` (0
        gen, 1 edit, 2 und); gen / edit: the prompt ``ids``, the generation ``order``, the
        target ``picture`` (uint8 ``[S, S, 3]``) and, editing, the ``source_picture``; und: the
        layout row, the answer ``target`` and the ``picture``."""
        if self.own is not None:
            return unifluid_record(self.own, self, index)
        d, tok = self.data, self.tokenizer
        g = sample_generator(d.seed, index)
        kind = self._kind(g)
        if kind == "und":
            und = understanding_sample(self.world, d, tok, index, g, self.num_patches)
            return {**layout_record(und.layout), "kind": torch.tensor([2]),
                    "target": torch.tensor(und.target),
                    "picture": torch.from_numpy(und.picture)}  # fmt: skip
        L = self.model.config.num_image_tokens
        order = generation_order(1, L, self.model.config.order, g)[0]
        item = draw_item(self.world, "t2i" if kind == "gen" else "edit", d.split, index)
        if kind == "gen":
            ids = self._prompt(item.texts["caption"], False, g)
            return {"kind": torch.tensor([0]), "ids": torch.tensor(ids), "order": order,
                    "picture": self._picture(item.scene_key)}  # fmt: skip
        ids = self._prompt(item.texts["instruction"], True, g)
        return {"kind": torch.tensor([1]), "ids": torch.tensor(ids), "order": order,
                "picture": self._picture(item.target_key),
                "source_picture": self._picture(item.scene_key)}  # fmt: skip

    def _picture(self, scene_key: Any) -> Tensor:
        return torch.from_numpy(render(Scene.from_key(scene_key), self.data.image_size))

    def encode_records(self, records: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Generation / editing records with their pictures replaced by KL-VAE tokens
        (``tokens``, ``source``: ``[L, C]``)."""
        if self.model.config.edit_features:  # the understanding tower reads the picture
            for r in records:
                if "source_picture" in r:
                    r["source_view"] = r["source_picture"]
        for name, key in (("picture", "tokens"), ("source_picture", "source")):
            rows = [r for r in records if int(r["kind"]) < 2 and name in r]
            if rows:
                tokens = self._tokens(torch.stack([r.pop(name) for r in rows])).cpu()
                for r, z in zip(rows, tokens, strict=True):
                    r[key] = z
        return records

    def shard_meta(self) -> dict[str, Any]:
        c = self.model.config
        return data_meta(self.data, self.config.text_tokenizer, self.config.vae,
                         image_tokens=c.num_image_tokens, patches=self.num_patches,
                         order=c.order, token_scale=c.vae.scaling_factor,
                         **({"edit_features": True} if c.edit_features else {}))  # fmt: skip

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """CPU work only. The gen / edit parts carry the KL-VAE tokens when read from shards,
        else the uint8 ``pictures`` (and ``source_pictures``) that :meth:`losses` encodes on
        the training device."""
        get = self.shards.get if self.shards is not None else self.record
        groups: dict[str, list[dict]] = {"gen": [], "edit": [], "und": []}
        for index in indices:
            r = get(index)
            if int(r["kind"]) < 2:
                r = {**r, **self._diffusion_draws(index)}
            groups[("gen", "edit", "und")[int(r["kind"])]].append(r)
        return {name: self._collate(name, rows) for name, rows in groups.items()}

    def _diffusion_draws(self, index: int) -> dict[str, Tensor]:
        """Sample ``index``'s diffusion-head draws from its own generator (seed + 1, so the
        data draws stay as they were): ``t`` Long[k, L] and ``ε`` [k, L, C] for its ``L``
        tokens in generation order, ``k`` draws each; the same in any batch or process."""
        head, c = self.model.diffusion_head, self.model.config
        k, L, C = head.config.draws, c.num_image_tokens, c.vae.token_dim
        g = sample_generator(self.data.seed + 1, index)
        t = torch.randint(0, len(head.train_schedule), (k, L), generator=g)
        return {"diffusion_t": t, "diffusion_noise": torch.randn(k, L, C, generator=g)}

    def _collate(self, name: str, rows: list[dict]) -> dict[str, Tensor] | None:
        if not rows:
            return None
        tok = self.tokenizer
        if name == "und":
            size = self.model.config.vision.image_size
            lay = stack_layouts([record_layout(r) for r in rows], tok.pad_id)
            targets = lay.input_ids.clone()
            for b, r in enumerate(rows):
                targets[b, lay.region[b]] = r["target"]
            pictures = [Image.fromarray(r["picture"].numpy()) for r in rows]
            prefix = (lay.attention_mask & ~lay.region).sum(1)
            # Teacher forcing: the answer slots hold the answer (the shifted logits at slot i
            # are read from slot i − 1), not the layout's placeholder pads.
            return {"ids": targets, "mask": lay.attention_mask,
                    "image_mask": lay.understanding_mask, "targets": targets,
                    "target_mask": lay.region, "prefix": prefix,
                    "pixels": preprocess_understanding(pictures, size)}  # fmt: skip
        N = max(len(r["ids"]) for r in rows)
        ids = torch.full((len(rows), N), tok.pad_id)
        mask = torch.zeros(len(rows), N, dtype=torch.bool)
        for b, r in enumerate(rows):  # left padding: every prompt ends in <boi> at column N - 1
            ids[b, N - len(r["ids"]) :] = r["ids"]
            mask[b, N - len(r["ids"]) :] = True
        out = {k: torch.stack([r[k] for r in rows])
               for k in ("order", "diffusion_t", "diffusion_noise")}  # fmt: skip
        out.update(ids=ids, mask=mask)
        for key, pixels in (("tokens", "picture"), ("source", "source_picture")):
            if key == "source" and name != "edit":
                continue
            if key in rows[0]:
                out[key] = torch.stack([r[key] for r in rows])
            else:
                out[f"{key}_pictures"] = torch.stack([r[pixels] for r in rows])
        if name == "edit":
            out["image_mask"] = ids == tok.image_id
            if self.model.config.edit_features:
                views = [r.get("source_view", r.get("source_picture")) for r in rows]
                out["source_pixels"] = preprocess_understanding(
                    [Image.fromarray(v.numpy()) for v in views], self.model.config.vision.image_size
                )
        return out

    @torch.no_grad()
    def _tokens(self, pictures: Tensor) -> Tensor:
        """uint8 ``[G, S, S, 3]`` -> the KL-VAE tokens ``[G, L, C]`` on the pictures' device
        (float32 even under autocast, as in the shards)."""
        if self.encoder is None:
            self.encoder = frozen_copy(self.model.vae)
        vae = self.encoder.to(pictures.device)
        with torch.autocast(pictures.device.type, enabled=False):
            return vae.images_to_tokens(picture_tensor(pictures, pictures.device))

    def encoded(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with the on-the-fly pictures of its gen / edit parts encoded."""
        out = dict(batch)
        for name in ("gen", "edit"):
            part = batch.get(name)
            if part is None:
                continue
            part = dict(part)
            for key in ("tokens", "source"):
                if f"{key}_pictures" in part:
                    part[key] = self._tokens(part.pop(f"{key}_pictures"))
            out[name] = part
        return out

    def losses(self, batch: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
        out = model(self.encoded(batch))  # the parts carry their samples' diffusion draws
        lam = (model.module if hasattr(model, "module") else model).config.text_loss_weight
        per_sample = torch.cat([out["image"], lam * out["text"]])
        B = per_sample.shape[0]
        return {"loss": per_sample.mean(), "loss_image": out["image"].sum() / B,
                "loss_text": lam * out["text"].sum() / B}  # fmt: skip


def train_unifluid(config: UnifluidTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a UniFluid training run; writes ``out/model`` (a pipeline folder that
    :func:`kineflow.load` reads), ``out/model_step{s}`` for each of ``export_steps`` and
    ``out/summary.json``; ``out`` is held for the whole run
    (:func:`~kineflow.train.run_folder.hold_run_folder`). Under torchrun only rank 0 writes
    ``out/model`` and the summary; every rank returns the summary."""
    with held_run(config) as out:
        tokenizer = TextTokenizer.load(config.text_tokenizer)
        torch.manual_seed(config.optim.seed)
        model = build_unifluid(config, tokenizer)
        init_weights_from(model, config.init_from, out, own=("vae.",))  # the config's VAE
        if config.lora is not None:
            prepare_lora(model, config.lora, out)
        task = UnifluidTask(model, tokenizer, config)
        from kineflow.pipelines.unifluid import UnifluidPipeline, UnifluidPipelineConfig

        pipeline_config = UnifluidPipelineConfig(
            clip_x0=token_range(model, config.data),
            text_budget=config.data.text_budget,
            caption_tokens=config.data.caption_tokens,
            caption_instruction=config.data.caption_instruction,
        )

        def save(folder: Path, **card: Any) -> None:
            UnifluidPipeline(model, tokenizer, pipeline_config).save_pretrained(folder, **card)

        export = step_exports(config, model, out, save)
        summary = train_task(task, config, out, progress, "train unifluid", export)
        if config.lora is not None:
            finish_lora(model, config.lora, out, "unifluid")  # out/adapter, then merged in place
        if process_rank() == 0:  # every rank holds the same whole model by now
            save(out / "model", training=card_record(config, summary))
            atomic_write_json(out / "summary.json", summary)
    return summary
