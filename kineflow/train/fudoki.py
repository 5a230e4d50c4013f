"""Training FUDOKI (and its baselines) on ShapesWorld through the shared loop.

One objective, three corruption processes (``objective.kind``):

    metric  x_t ~ p_t(·|x_1) = softmax(−β_t d(·, x_1)) per token, t ~ U(t_min, t_max)  (FUDOKI)
    masked  x_t = x_1 with probability κ_t, else the mask token                     (MaskGIT)
    ar      x_t = x_1 (teacher forcing) with a causal attention mask                (Janus AR)

and the same loss for all: cross-entropy of the **shifted** logits (position i read from
hidden state i − 1) against x_1 on the generated region only: the image codes of a
text-to-image sample, the answer slots (answer, then EOS up to the slot count) of a VQA or
captioning sample. A sample's loss is the mean over its region; the batch loss is the mean
over samples, so it averages exactly over processes (:mod:`kineflow.train.loop`). The loss is
:func:`kineflow.flow.loss.region_cross_entropy`; the model's forward returns the heads' logits
on the region (``heads=``), so DDP / FSDP wrappers see every module that runs.

A batch mixes generation and understanding samples (``data.understanding_ratio``), laid out
with the inference layouts of :mod:`kineflow.inputs.layout`, so training and sampling see
identical sequences. Generation prompts are dropped (replaced by pad) with probability
``data.cfg_dropout`` for classifier-free guidance. Each sample draws its task, its scene, its
``t``, its corruption and its dropout from its own seeded generator.

Frozen parts: the VQ tokenizer (``gen_vision_model``, loaded from ``vq``) and, when ``vision``
names a pre-trained SigLIP folder, the understanding tower. ``gen_embed`` starts from the
VQ codebook. The metric tables are the text input embeddings and the VQ codebook at the
start of the run (from ``init_from``: AR → DFM; ``lora``: :mod:`kineflow.train.lora`), in
``out/metric.safetensors`` and fixed for the whole run, as the path must not move.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor, nn

from kineflow.data.shapes.dataset import draw_item
from kineflow.data.shapes.render import render
from kineflow.data.shapes.scene import Scene, ShapesWorld
from kineflow.flow.loss import region_cross_entropy
from kineflow.flow.sampling import uniforms
from kineflow.flow.times import block_times
from kineflow.inputs.images import preprocess_understanding
from kineflow.inputs.layout import (
    Layout,
    stack_layouts,
    text_to_image_layout,
)
from kineflow.inputs.packing import PackPlan, pack_inputs, plan_packing
from kineflow.io import atomic_save_safetensors, atomic_write_json
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.pipelines.fudoki import FudokiPipeline
from kineflow.pipelines.fudoki_config import FudokiPipelineConfig, make_paths
from kineflow.tokenizers.text import TextTokenizer
from kineflow.tokenizers.vq import VQModel
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
from kineflow.train.own_data import FUDOKI_TASKS, OwnData, fudoki_record
from kineflow.train.run_config import TrainRunConfig
from kineflow.train.run_folder import process_rank
from kineflow.train.siglip import load_pretrained_tower

__all__ = ["FudokiData", "FudokiTask", "FudokiTrainConfig", "Objective", "train_fudoki"]

OBJECTIVES = ("metric", "masked", "ar")


@dataclass
class FudokiData(ShapesData):
    """The ``data`` section: :class:`~kineflow.train.common.ShapesData`, and ``pack``: lay
    whole samples end to end in the rows of each batch (:mod:`kineflow.inputs.packing`;
    rows of ``pack_length`` tokens, default the batch's longest sample), so padding costs no
    compute. The per-sample losses are those of the unpacked batch."""

    pack: bool = False
    pack_length: int | None = None
    STEP_ONLY: ClassVar[tuple[str, ...]] = ("shards", "pack", "pack_length")

    def __post_init__(self) -> None:
        super().__post_init__()
        n = self.pack_length
        if n is not None and (type(n) is not int or n < 1):
            raise ValueError(f"data.pack_length must be a positive integer or null, got {n!r}")


@dataclass
class Objective:
    """``kind`` (metric / masked / ar), the metric path's parameters and the distribution of
    ``t``: ``t ~ U(t_min, t_max)`` for generation samples and ``U(t_min, text_t_max)`` for
    understanding samples (``text_t_max`` None: ``t_max``).

    Why a separate range for text: with nearly equidistant text embeddings (a model trained
    from scratch) the metric path is close to the uniform path, and the answer token already
    holds most of the mass of ``p_t(·|x_1)`` once ``β_t · d`` exceeds ``log V`` (t ≈ 0.45 for
    FUDOKI's β and V ≈ 400); samples above that teach the model to copy its input.

    ``block_time`` (0: off): the share of generation samples whose picture draws one ``t`` per
    ``block_size`` × ``block_size`` block of its token grid instead of one for the whole
    picture, so the model also sees one part of a picture clean and another noisy, where what
    one object is has to be read off another (docs/generation.md, finding 5). The sampler
    keeps one ``t`` per picture; the model is not told ``t`` either way.
    """

    kind: str = "metric"
    metric_exponent: float = 4.0
    beta_a: float = 0.9
    beta_c: float = 3.0
    t_min: float = 0.0
    t_max: float = 1.0
    text_t_max: float | None = None
    block_time: float = 0.0
    block_size: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.block_time <= 1:
            raise ValueError(f"objective.block_time must be in [0, 1], got {self.block_time!r}")
        if type(self.block_size) is not int or self.block_size < 1:
            raise ValueError(f"objective.block_size must be an integer >= 1: {self.block_size!r}")
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective.kind must be one of {OBJECTIVES}, got {self.kind!r}")
        for hi, name in ((self.t_max, "t_max"), (self.text_t_max, "text_t_max")):
            if hi is not None and not 0 <= self.t_min < hi <= 1:
                raise ValueError(f"need 0 <= t_min < {name} <= 1, got {self.t_min}, {hi}")


@dataclass
class FudokiTrainConfig(TrainRunConfig):
    """A run (the YAML file's sections). ``model``: :class:`FudokiConfig` fields except
    ``gen_vision`` (taken from the ``vq`` folder); ``language.vocab_size`` defaults to the
    text tokenizer's size."""

    SECTIONS: ClassVar[dict[str, type]] = {
        "objective": Objective, "data": FudokiData, "optim": Optim, "lora": LoraSettings,
    }  # fmt: skip
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "vq", "text_tokenizer", "out")
    MODEL_TYPES: ClassVar[tuple[type, ...]] = (FudokiConfig,)

    model: dict[str, Any]
    vq: str
    text_tokenizer: str
    out: str
    vision: str | None = None
    init_from: str | None = None
    objective: Objective = field(default_factory=Objective)
    data: FudokiData = field(default_factory=FudokiData)
    optim: Optim = field(default_factory=Optim)
    log_every: int = 25
    ckpt_every: int = 250
    ckpt_minutes: float | None = None
    parallel: str = "none"
    threads: int | None = None
    export_steps: list[int] = field(default_factory=list)
    train_vision: bool = False
    lora: LoraSettings | None = None


# -- building the model --------------------------------------------------------------------------
def build_model(config: FudokiTrainConfig, tokenizer: TextTokenizer) -> FudokiModel:
    """The network of ``config.model`` around the frozen VQ (and SigLIP) weights.

    Raises:
        ValueError: a vocabulary that does not match the tokenizer, a SigLIP folder of another
            shape, or a model config that does not build.
    """
    vq = VQModel.from_pretrained(config.vq)
    model_dict = dict(config.model)
    if "gen_vision" in model_dict:
        raise ValueError("model.gen_vision comes from the vq folder; remove it from the config")
    model_dict["language"] = language_with_vocab(model_dict, tokenizer, config.text_tokenizer)
    model_dict["gen_vision"] = vq.config.to_dict()
    model_dict.setdefault("image_mask_token", config.objective.kind == "masked")
    model = FudokiModel(FudokiConfig.from_dict(model_dict))
    model.gen_vision_model.load_state_dict(vq.state_dict())
    model.gen_vision_model.requires_grad_(False)
    with torch.no_grad():
        K = vq.config.codebook_size
        model.gen_embed.weight[:K].copy_(vq.quantize.codebook())
    if config.vision is not None:
        # Frozen by default (FUDOKI's decoupled encoders); train_vision fine-tunes it, as
        # Janus's last stage does.
        tower = model.vision_model.vision_tower if model.vision_model is not None else None
        load_pretrained_tower(tower, model.config.vision, config.vision, config.train_vision)
    return model


# -- the task -----------------------------------------------------------------------------------
class FudokiTask:
    """Batches and losses of :func:`train_fudoki` (see the module docstring).

    ``batch`` is CPU work only (layouts, targets, each sample's draws); ``losses`` runs on the
    training device: the frozen VQ encoder on on-the-fly pictures, the batched corruption,
    the model. With ``data.shards`` the samples come from a ``kineflow data encode`` folder
    (no renderer, tokenizer or VQ per step) and the training draws stay the same.
    """

    KIND = "fudoki"

    def __init__(
        self,
        model: FudokiModel,
        tokenizer: TextTokenizer,
        config: FudokiTrainConfig,
        text_table: Tensor,
        image_table: Tensor,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.world = ShapesWorld()
        self.obj = config.objective
        self.data = config.data
        pcfg = self.pipeline_config()
        self.text_path, self.image_path = make_paths(
            pcfg, text_table, image_table, tokenizer.pad_id, model.config
        )
        self.num_image_tokens = model.config.image_token_count
        vision = model.config.vision
        self.num_patches = vision.num_patches if vision else 0
        self.understanding_size = vision.image_size if vision else 0
        # The frozen VQ's copy, made now: once FSDP wraps the model its weights are shards.
        self.encoder = None if config.data.shards else frozen_copy(model.gen_vision_model)
        self.shards = open_shards(self, self.data.shards) if self.data.shards else None
        self.own = OwnData(self.data, FUDOKI_TASKS, tokenizer) if self.data.manifest else None

    def pipeline_config(self) -> FudokiPipelineConfig:
        o = self.obj
        return FudokiPipelineConfig(
            metric_exponent=o.metric_exponent,
            beta_a=o.beta_a,
            beta_c=o.beta_c,
            text_budget=self.data.text_budget,
            system_prompt="",
            steps=16,
            cfg_scale=3.0,
            answer_tokens=self.data.vqa_answer_tokens,
            path=o.kind,  # the objective names its sampler: metric / masked / ar
        )

    # -- the data of a sample (CPU, deterministic in the index) ----------------------------------
    def _draw(self, index: int) -> tuple[dict[str, Tensor], torch.Generator]:
        """Sample ``index`` as a record (:mod:`kineflow.data.shards`) and its generator after the
        data draws: ``kind`` (0 generation, 1 understanding), the layout row, the answer ids
        ``target`` (understanding), the picture uint8 ``[S, S, 3]`` (to be VQ-encoded for
        generation, the SigLIP input for understanding) and ``draws``, the uniforms consumed."""
        if self.own is not None:
            return fudoki_record(self.own, self, index)
        g = sample_generator(self.data.seed, index)
        d, tok = self.data, self.tokenizer
        # One draw for the task (with an understanding tower), one for CFG dropout or caption.
        draws = 1 + (self.num_patches > 0)
        understanding = self.num_patches > 0 and float(torch.rand((), generator=g)) < (
            d.understanding_ratio
        )
        if not understanding:
            item = draw_item(self.world, "t2i", d.split, index)
            lay = text_to_image_layout(
                tok, [item.texts["caption"]], self.num_image_tokens, d.text_budget
            )
            if float(torch.rand((), generator=g)) < d.cfg_dropout:
                lay.input_ids = lay.input_ids.masked_fill(lay.prompt_span, tok.pad_id)
            picture = render(Scene.from_key(item.scene_key), d.image_size)
            extra = {"kind": torch.tensor([0])}
        else:
            und = understanding_sample(self.world, d, tok, index, g, self.num_patches)
            lay, picture = und.layout, und.picture
            extra = {"kind": torch.tensor([1]), "target": torch.tensor(und.target)}
        record = {**layout_record(lay), **extra, "picture": torch.from_numpy(picture),
                  "draws": torch.tensor([draws])}  # fmt: skip
        return record, g

    def record(self, index: int) -> dict[str, Tensor]:
        """Sample ``index`` computed on the fly (see :meth:`_draw`)."""
        return self._draw(index)[0]

    def encode_records(self, records: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Generation records with their picture replaced by its VQ codes ``target``."""
        gen = [r for r in records if int(r["kind"]) == 0]
        if gen:
            codes = self._encode(torch.stack([r.pop("picture") for r in gen]))
            for r, c in zip(gen, codes.cpu(), strict=True):
                r["target"] = c
        return records

    def shard_meta(self) -> dict[str, Any]:
        return data_meta(self.data, self.config.text_tokenizer, self.config.vq,
                         image_tokens=self.num_image_tokens, patches=self.num_patches)  # fmt: skip

    def _sample(self, index: int) -> tuple[dict[str, Tensor], torch.Generator]:
        """The record of ``index`` (from the shards when the run has them) and its generator
        after the data draws, ready for the training draws (``t``, the corruption)."""
        if self.shards is None:
            return self._draw(index)
        record = self.shards.get(index)
        g = sample_generator(self.data.seed, index)
        for _ in range(int(record["draws"])):
            torch.rand((), generator=g)
        return record, g

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """CPU work only: the layouts, the clean targets ``x1`` (the VQ codes of on-the-fly
        pictures come in :meth:`losses`, from ``pictures`` at rows ``encode_rows``), the SigLIP
        pixels, and each sample's training draws from its own generator: ``t`` Float[B] and
        ``u`` Float64[B, N], the uniforms of its region's corruption (0 elsewhere); with
        ``objective.block_time``, ``t_tokens`` Float[B, N], each position's time (``t``, or
        one per block of the picture's token grid), else None."""
        samples = [self._sample(i) for i in indices]
        records = [r for r, _ in samples]
        lay = stack_layouts([record_layout(r) for r in records], self.tokenizer.pad_id)
        is_gen = torch.tensor([int(r["kind"]) == 0 for r in records])
        x1 = lay.input_ids.clone()
        for b, r in enumerate(records):
            if "target" in r:
                x1[b, lay.region[b]] = r["target"]
        encode = [b for b, r in enumerate(records) if "target" not in r]
        und = [Image.fromarray(r["picture"].numpy()) for r in records if int(r["kind"]) == 1]
        pixels = preprocess_understanding(und, self.understanding_size) if und else None
        B, N = x1.shape
        t, u = torch.zeros(B), torch.zeros(B, N, dtype=torch.float64)
        if self.obj.kind != "ar":  # teacher forcing draws nothing
            o = self.obj
            for b, (_, g) in enumerate(samples):
                hi = o.t_max if is_gen[b] or o.text_t_max is None else o.text_t_max
                t[b] = o.t_min + (hi - o.t_min) * float(torch.rand((), generator=g))
                u[b, lay.region[b]] = uniforms(int(lay.region[b].sum()), g, "cpu")[:, 0]
        t_tokens = None
        if self.obj.kind != "ar" and self.obj.block_time > 0:
            o, t_tokens = self.obj, t[:, None].repeat(1, N)
            for b, (_, g) in enumerate(samples):  # drawn after, so block_time 0 draws nothing
                if is_gen[b] and float(torch.rand((), generator=g)) < o.block_time:
                    n = int(lay.region[b].sum())
                    t_tokens[b, lay.region[b]] = block_times(n, o.block_size, o.t_min, o.t_max, g)
        pictures = torch.stack([records[b]["picture"] for b in encode]) if encode else None
        rows = torch.tensor(encode, dtype=torch.long)
        pack = plan_packing(lay.attention_mask, self.data.pack_length) if self.data.pack else None
        return {"layout": lay, "x1": x1, "is_gen": is_gen, "pixels": pixels, "t": t, "u": u,
                "t_tokens": t_tokens,
                "pictures": pictures, "encode_rows": rows, "pack": pack}  # fmt: skip

    @torch.no_grad()
    def _encode(self, pictures: Tensor) -> Tensor:
        """uint8 [G, S, S, 3] pictures -> VQ ids Long[G, L] (pixels scaled to [-1, 1]), in
        float32 even under autocast (codes are an argmin: they must not depend on precision)."""
        if self.encoder is None:
            self.encoder = frozen_copy(self.model.gen_vision_model)
        vq = self.encoder.to(pictures.device)
        with torch.autocast(pictures.device.type, enabled=False):
            return vq.encode(picture_tensor(pictures, pictures.device)).flatten(1)

    def targets(self, batch: dict[str, Any]) -> Tensor:
        """``x1`` with the on-the-fly pictures' VQ codes on their regions (on their device)."""
        x1 = batch["x1"]
        if batch["pictures"] is None:
            return x1
        at = torch.zeros_like(batch["layout"].region)
        rows = batch["encode_rows"].to(at.device)
        at[rows] = batch["layout"].region[rows]
        x1 = x1.clone()
        x1[at] = self._encode(batch["pictures"]).flatten()  # rows ascending, row-major
        return x1

    def corrupt(self, batch: dict[str, Any], x1: Tensor) -> Tensor:
        """``x_t``: one path call per modality over every region position of the batch, each
        with its sample's ``t`` and pre-drawn uniform, so the same tokens as a call per sample
        with its generator (:meth:`DiscretePath.sample`)."""
        if self.obj.kind == "ar":
            return x1
        lay: Layout = batch["layout"]
        is_gen = batch["is_gen"].to(x1.device)
        t_tokens = batch.get("t_tokens")
        t = (batch["t"][:, None].expand(x1.shape) if t_tokens is None else t_tokens).to(x1.device)
        xt = x1.clone()
        for path, at in ((self.image_path, lay.region & is_gen[:, None]),
                         (self.text_path, lay.region & ~is_gen[:, None])):  # fmt: skip
            if at.any():
                path.to(x1.device)
                xt[at] = path.sample(x1[at], t[at], u=batch["u"].to(x1.device)[at][:, None])
        return xt

    def losses(self, batch: dict[str, Any], model: nn.Module) -> dict[str, Tensor]:
        """The shifted region cross-entropy (:func:`~kineflow.flow.loss.region_cross_entropy`):
        image head on the regions of generation samples, text head on the others; the heads
        run inside ``model``'s forward, so DDP / FSDP see them. With ``data.pack`` the model
        reads packed rows (:func:`~kineflow.inputs.packing.pack_inputs`); the per-sample
        losses do not change."""
        lay: Layout = batch["layout"]
        is_gen = batch["is_gen"].to(lay.region.device)
        x1 = self.targets(batch)
        inputs = {
            "input_ids": self.corrupt(batch, x1),
            "image_mask": lay.image_mask,
            "understanding_mask": lay.understanding_mask,
            "attention_mask": lay.attention_mask,
            "image_at": lay.region & is_gen[:, None],
            "text_at": lay.region & ~is_gen[:, None],
            "x1": x1,
        }
        pixels = batch["pixels"]
        plan: PackPlan | None = batch.get("pack")
        if plan is not None:
            inputs, pixels = pack_inputs(plan, inputs, pixels, ~batch["is_gen"])
        text_logits, image_logits = model(
            inputs["input_ids"], image_mask=inputs["image_mask"], pixel_values=pixels,
            understanding_mask=inputs["understanding_mask"],
            attention_mask=inputs["attention_mask"],
            mask="causal" if self.obj.kind == "ar" else "full",
            heads=(inputs["text_at"], inputs["image_at"]),
            **({} if plan is None else {"segment_ids": plan.segment_ids,
                                        "position_ids": plan.position_ids}),
        )  # fmt: skip
        per_sample = region_cross_entropy(
            [image_logits, text_logits], [inputs["image_at"], inputs["text_at"]], inputs["x1"],
            samples=None if plan is None else plan.segment_ids, num_samples=int(is_gen.shape[0]),
        )  # fmt: skip
        B = per_sample.shape[0]
        is_gen = is_gen.to(per_sample.device)
        out = {"loss": per_sample.mean()}
        # Shares of the batch loss (they add up to it), exact under any data split.
        out["loss_gen"] = (per_sample * is_gen).sum() / B
        out["loss_und"] = (per_sample * ~is_gen).sum() / B
        return out


# -- the run ------------------------------------------------------------------------------------
def train_fudoki(config: FudokiTrainConfig, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a training run; writes ``out/model`` (a kineflow FUDOKI folder that
    :func:`kineflow.load` reads), ``out/model_step{s}`` for each of ``export_steps``, and
    returns the loop's summary. ``out`` is held for the whole run
    (:func:`~kineflow.train.run_folder.hold_run_folder`). Under torchrun only rank 0 writes
    ``out/model`` and the summary; every rank returns the summary."""
    with held_run(config) as out:
        return _train(config, out, progress)


def _metric_tables(model: FudokiModel) -> dict[str, Tensor]:
    """The tables the metric paths are built from: the text input embeddings and the codebook."""
    K = model.config.gen_vision.codebook_size
    return {"text": model.language_model.model.embed_tokens.weight.detach().clone(),
            "image": model.gen_vision_model.quantize.codebook()[:K].detach().clone()}  # fmt: skip


def _train(config: FudokiTrainConfig, out: Path, progress: bool) -> dict[str, Any]:
    tokenizer = TextTokenizer.load(config.text_tokenizer)
    torch.manual_seed(config.optim.seed)
    model = build_model(config, tokenizer)
    # The VQ is the config's (a stage may swap it); the position table starts at zero.
    swapped = init_weights_from(
        model, config.init_from, out, ("understanding_pos_embed",), own=("gen_vision_model.",)
    )
    if swapped:  # another VQ: the copied code embeddings meant other pictures
        with torch.no_grad():
            K = model.config.gen_vision.codebook_size
            model.gen_embed.weight[:K].copy_(model.gen_vision_model.quantize.codebook())
    if config.lora is not None:  # a vq other than the base's replaces it (kineflow.train.lora)
        codebook = {"image": _metric_tables(model)["image"]}
        prepare_lora(model, config.lora, out, ("gen_vision_model", "gen_embed"), codebook)
    tables_file = out / "metric.safetensors"
    if tables_file.is_file():
        tables = load_file(str(tables_file))
    else:
        tables = _metric_tables(model)
        atomic_save_safetensors(tables_file, tables)
    task = FudokiTask(model, tokenizer, config, tables["text"], tables["image"])

    def pipeline() -> FudokiPipeline:
        return FudokiPipeline(
            model, tokenizer, tables["text"], tables["image"], task.pipeline_config()
        )

    # e.g. the AR half of an AR -> DFM run at equal compute
    export = step_exports(config, model, out, lambda folder: pipeline().save_pretrained(folder))
    summary = train_task(task, config, out, progress, f"train {config.objective.kind}", export)
    if config.lora is not None:
        finish_lora(model, config.lora, out, "fudoki")  # out/adapter, then merged in place
    if process_rank() == 0:  # every rank holds the same whole model by now
        pipeline().save_pretrained(out / "model", training=card_record(config, summary))
        atomic_write_json(out / "summary.json", summary)
    return summary
