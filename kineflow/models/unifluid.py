"""UniFluid: one decoder over discrete text and continuous image tokens (docs/design.md §2).

Sequences (``·`` = padding on the left, ``[…]`` = what the model predicts)::

    generation     · · BOS prompt <boi> x_π(0) … x_π(L−2)        → [x_π(0) … x_π(L−1)]
    editing        · · BOS s_0 … s_(L−1) instruction <boi> x_π(0) … → [x_π(0) … x_π(L−1)]
    understanding  · · BOS <img>×P question               answer → [answer, EOS]

**Image tokens.** A picture is encoded by the frozen KL-VAE and patchified (2 × 2) into
``L`` continuous tokens ``x_i ∈ R^C`` (``C = 4 · 2 · 2 = 16``). They are generated in an order
``π`` (a random permutation per sample, or raster order for the ablation). The input at
image slot ``j`` is

    e_j = W_in x_π(j) + P_in[π(j)] + P_next[π(j+1)]

and the ``<boi>`` token's input is its text embedding plus ``P_next[π(0)]``: each input carries
the learnable 2-D position embedding (one vector per grid cell) of the token to predict next, so
a causal model knows *where* it is asked to generate. The hidden state ``z`` at ``<boi>`` and at
slot ``j`` conditions the per-token diffusion head
(:class:`~kineflow.models.diffusion_head.DiffusionHead`) for ``x_π(0)`` and ``x_π(j+1)``.

**Editing.** The source picture enters the prompt as its own ``L`` continuous tokens in grid
order, ``s_i = W_in x^src_i + P_in[i]`` (:meth:`UnifluidModel.source_embeds`), attended
bidirectionally with the instruction. And as each input already announces the cell ``π(j+1)``
to generate next, in editing it also says what the source holds there:

    e_j = W_in x_π(j) + P_in[π(j)] + P_next[π(j+1)] + W_src x^src_π(j+1)

(``W_src`` starts at zero). The untouched objects must survive pixel for pixel, which SigLIP's
pooled understanding features do not describe; with the source cell in the input, keeping it
is the easy default and the instruction decides where to depart from it.

With ``edit_features`` the prompt is ``BOS f_0 … f_(P−1) s_0 … s_(L−1) instruction <boi>``:
the source also as understanding reads it, ``f = aligner(SigLIP(source))``. The latents keep the
pixels; the features (one per cell for the 9-patch tower) say which object sits where.

**Attention** (PaliGemma prefix-LM, :func:`~kineflow.models.masking.build_attention_mask`):
generation is bidirectional over the prompt through ``<boi>`` and causal over image tokens;
understanding is bidirectional over the SigLIP features and the question and causal over the
answer.

**Loss.** ``L = L_image + λ · L_text``: the diffusion loss of every image token (mean over the
sample's tokens) and the cross-entropy of the shifted text logits (tied embeddings, final
soft-cap) on the answer / caption slots only; λ = ``text_loss_weight`` (0.005).

The backbone is the shared decoder (:class:`~kineflow.models.llama.LlamaModel`) with Gemma-2
options; ``LlamaConfig.gemma2_2b()`` is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from kineflow.models.diffusion_head import DiffusionHead, DiffusionHeadConfig
from kineflow.models.llama import LlamaConfig, LlamaModel, softcap
from kineflow.models.masking import KVCache
from kineflow.models.siglip import SiglipConfig, SiglipVisionModel
from kineflow.tokenizers.kl_vae import AutoencoderKL, KLConfig

__all__ = ["ORDERS", "UnifluidConfig", "UnifluidModel", "generation_order"]

ORDERS = ("random", "raster")


@dataclass
class UnifluidConfig:
    """Shape of a :class:`UnifluidModel`. ``head`` holds the diffusion head's width, depth,
    steps, sample_steps and draws (its token and condition sizes come from ``vae`` and
    ``language``)."""

    language: LlamaConfig
    vae: KLConfig
    vision: SiglipConfig | None = None
    head: dict[str, int] = field(default_factory=dict)
    text_loss_weight: float = 0.005
    order: str = "random"
    edit_features: bool = False  # editing prompts also hold the source's SigLIP features

    def __post_init__(self) -> None:
        if isinstance(self.language, dict):
            self.language = LlamaConfig.from_dict(self.language)
        if isinstance(self.vae, dict):
            self.vae = KLConfig.from_dict(self.vae)
        if isinstance(self.vision, dict):
            self.vision = SiglipConfig.from_dict(self.vision)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if not self.text_loss_weight >= 0:
            raise ValueError(f"text_loss_weight must be >= 0, got {self.text_loss_weight!r}")
        if self.edit_features and self.vision is None:
            raise ValueError("edit_features needs the understanding tower (config.vision)")
        self.head_config()  # validates the head fields now

    def head_config(self) -> DiffusionHeadConfig:
        return DiffusionHeadConfig(
            token_dim=self.vae.token_dim, cond_dim=self.language.hidden_size, **self.head
        )

    @property
    def num_image_tokens(self) -> int:
        return self.vae.num_tokens

    @property
    def edit_placeholders(self) -> int:
        """Picture positions of an editing prompt: ``L`` latent tokens, plus the ``P``
        understanding features before them with ``edit_features``."""
        features = self.vision.num_patches if self.edit_features and self.vision else 0
        return features + self.num_image_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "language": self.language.to_dict(),
            "vae": self.vae.to_dict(),
            "vision": None if self.vision is None else self.vision.to_dict(),
            "head": dict(self.head),
            "text_loss_weight": self.text_loss_weight,
            "order": self.order,
            "edit_features": self.edit_features,
        }


def generation_order(
    batch: int, length: int, order: str, generator: torch.Generator | None = None
) -> Tensor:
    """``[B, L]`` permutations of the ``L`` grid cells: raster (``0 … L−1``) or uniformly
    random per row."""
    if order == "raster":
        return torch.arange(length).expand(batch, length).clone()
    if order != "random":
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    return torch.argsort(torch.rand(batch, length, generator=generator), dim=1)


class UnifluidModel(nn.Module):
    """See the module docstring."""

    def __init__(self, config: UnifluidConfig) -> None:
        super().__init__()
        self.config = config
        D, L = config.language.hidden_size, config.num_image_tokens
        self.backbone = LlamaModel(config.language)
        self.vae = AutoencoderKL(config.vae)
        self.image_in = nn.Linear(config.vae.token_dim, D)
        self.pos_in = nn.Parameter(torch.randn(L, D) * 0.02)
        self.pos_next = nn.Parameter(torch.randn(L, D) * 0.02)
        self.source_in = nn.Linear(config.vae.token_dim, D)
        nn.init.zeros_(self.source_in.weight)  # generation and editing start out alike
        nn.init.zeros_(self.source_in.bias)
        self.vision_model: SiglipVisionModel | None = None
        self.aligner: nn.Linear | None = None
        if config.vision is not None:
            self.vision_model = SiglipVisionModel(config.vision)
            self.aligner = nn.Linear(config.vision.hidden_size, D)
        self.diffusion_head = DiffusionHead(config.head_config())

    @property
    def _head_dtype(self) -> torch.dtype:
        return next(self.diffusion_head.parameters()).dtype

    # -- inputs ----------------------------------------------------------------------------------
    def text_logits(self, hidden: Tensor) -> Tensor:
        """Tied, soft-capped logits ``[..., V]`` read from hidden states ``[..., D]``."""
        logits = hidden @ self.backbone.embed_tokens.weight.t()
        return softcap(logits.float(), self.config.language.final_logit_softcapping)

    def next_cell(self, cells: Tensor, source: Tensor | None = None) -> Tensor:
        """What an input announces about the cells ``[B, K]`` generated next: ``P_next[cell]``,
        plus ``W_src x^src_cell`` when editing ``source [B, L, C]`` (grid order)."""
        out = self.pos_next[cells]
        if source is not None:
            picked = source.gather(1, cells[..., None].expand(-1, -1, source.shape[-1]))
            out = out + self.source_in(picked.to(out.dtype))
        return out

    def image_inputs(self, tokens: Tensor, order: Tensor, source: Tensor | None = None) -> Tensor:
        """Inputs of the ``L − 1`` image slots ``[B, L−1, D]`` for tokens ``[B, L, C]`` (grid
        order) generated in ``order [B, L]``, editing ``source`` if given (see the module
        docstring)."""
        ordered = tokens.gather(1, order[..., None].expand_as(tokens))
        own = self.image_in(ordered[:, :-1]) + self.pos_in[order[:, :-1]]
        return own + self.next_cell(order[:, 1:], source)

    def check_tokens(self, tokens: Tensor, what: str) -> None:
        L, C = self.config.num_image_tokens, self.config.vae.token_dim
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (L, C):
            size = self.config.vae.image_size
            raise ValueError(
                f"{what} must be [B, {L}, {C}] (the {size} px VAE's latent tokens), got shape "
                f"{tuple(tokens.shape)}"
            )

    def source_embeds(self, tokens: Tensor) -> Tensor:
        """An editing source picture's tokens ``[B, L, C]`` (grid order) as prompt inputs
        ``W_in x_i + P_in[i]``: ``[B, L, D]``."""
        self.check_tokens(tokens, "source image tokens")
        return self.image_in(tokens.to(self.pos_in.dtype)) + self.pos_in

    def edit_embeds(self, input_ids: Tensor, source_mask: Tensor, tokens: Tensor,
                    features: Tensor | None = None) -> Tensor:  # fmt: skip
        """An editing prompt ``[B, N, D]``: the text embeddings with the ``source_mask``
        positions (:attr:`UnifluidConfig.edit_placeholders` per row) filled, in order, by the
        source's understanding ``features [B, P, D]`` (:meth:`encode_images`; with
        ``config.edit_features`` only) and :meth:`source_embeds` of its ``tokens [B, L, C]``."""
        source = self.source_embeds(tokens)
        if self.config.edit_features:
            if features is None:
                raise ValueError("config.edit_features: pass the source's features too")
            source = torch.cat([features.to(source.dtype), source], dim=1)
        elif features is not None:
            raise ValueError("features given, but config.edit_features is off")
        return self.understanding_embeds(input_ids, source_mask, source)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        """Understanding features ``aligner(SigLIP(x))``: [I, 3, S, S] -> [I, P, D]."""
        if self.vision_model is None or self.aligner is None:
            raise ValueError("this model has no understanding encoder (config.vision is None)")
        return self.aligner(self.vision_model(pixel_values))

    # -- generation ------------------------------------------------------------------------------
    def prompt_embeds(self, prompt: Tensor) -> Tensor:
        """``prompt`` as input embeddings: ids ``[B, N]`` are embedded (text only), embeddings
        ``[B, N, D]`` (e.g. :meth:`edit_embeds` for an editing prompt) pass through."""
        return self.backbone.embed(prompt) if prompt.ndim == 2 else prompt

    def _announce_first(self, prompt: Tensor, order: Tensor, source: Tensor | None) -> Tensor:
        """The ``<boi>`` input (the prompt's last) also announces the first cell ``π(0)``."""
        first = self.next_cell(order[:, :1], source).to(prompt.dtype)
        return torch.cat([prompt[:, :-1], prompt[:, -1:] + first], dim=1)

    def generation_hidden(
        self,
        prompt: Tensor,
        prompt_mask: Tensor,
        tokens: Tensor,
        order: Tensor,
        source: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced hidden states ``z [B, L, D]`` that condition the diffusion head for
        ``x_π(0) … x_π(L−1)``.

        ``prompt`` (ids ``[B, N]`` or embeddings ``[B, N, D]``, see :meth:`prompt_embeds`) ends
        with ``<boi>`` (left-padded; ``prompt_mask`` marks real tokens); ``tokens [B, L, C]``
        are the target image tokens in grid order; ``source [B, L, C]``: the picture being
        edited (its prompt is :meth:`edit_embeds`), None for text-to-image.
        """
        B, N = prompt_mask.shape
        L = self.config.num_image_tokens
        self.check_tokens(tokens, "image tokens")
        if source is not None:
            self.check_tokens(source, "source image tokens")
        text = self._announce_first(self.prompt_embeds(prompt), order, source)
        inputs = self.image_inputs(tokens, order, source).to(text.dtype)
        embeds = torch.cat([text, inputs], dim=1)
        mask = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(B, L - 1).bool()], dim=1)
        hidden = self.backbone(
            inputs_embeds=embeds,
            attention_mask=mask,
            mask="prefix",
            prefix_lengths=prompt_mask.sum(1),
        )
        return hidden[:, N - 1 :]  # <boi> and the L − 1 image slots

    def image_loss(
        self,
        prompt: Tensor,
        prompt_mask: Tensor,
        tokens: Tensor,
        order: Tensor,
        generator: torch.Generator | None = None,
        source: Tensor | None = None,
        draws: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Per-sample diffusion loss ``[B]`` (mean over the sample's image tokens). The head's
        ``(t, ε)`` come from ``generator``, or pre-drawn per sample: ``draws = (t Long[B, k,
        L], ε [B, k, L, C])`` for the ``L`` tokens in generation order."""
        z = self.generation_hidden(prompt, prompt_mask, tokens, order, source)
        B, L, C = tokens.shape
        targets = tokens.gather(1, order[..., None].expand_as(tokens))
        dtype = self._head_dtype  # the small head may run in float32 under a bf16 backbone
        if draws is not None:  # [B, k, L(, C)] -> rows r·(B·L) + b·L + l, as the head reads them
            t, eps = draws
            draws = (t.transpose(0, 1).reshape(-1), eps.transpose(0, 1).reshape(-1, C))
        per_token = self.diffusion_head.loss(
            targets.reshape(B * L, C).to(dtype), z.reshape(B * L, -1).to(dtype), generator, draws
        )
        return per_token.view(B, L).mean(1)

    @torch.no_grad()
    def generate_tokens(
        self,
        prompt: Tensor,
        prompt_mask: Tensor,
        *,
        uncond: Tensor | None = None,
        cfg_scale: float = 1.0,
        temperature: float = 1.0,
        order: Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_x0: float | None = None,
        source: Tensor | None = None,
        progress: bool = False,
        given: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Image tokens ``[B, L, C]`` (grid order) for prompts (ids or embeddings, see
        :meth:`prompt_embeds`) ending in ``<boi>``, one incremental backbone step per token
        (KV cache); ``source [B, L, C]`` when editing (see :meth:`generation_hidden`).
        ``progress``: a tqdm bar over the ``L`` tokens.

        Infilling: ``given [B, L, C]`` tokens with ``keep Bool[B, L]`` (grid order) are fed in
        instead of sampled (teacher forcing) and returned unchanged; the order should put them
        first so the others are generated conditioned on them.

        With ``uncond`` (the prompts blanked, same mask) the ε of the diffusion head is guided
        with a weight rising linearly from 1 to ``cfg_scale`` over the generated tokens.
        """
        B = prompt_mask.shape[0]
        L, C = self.config.num_image_tokens, self.config.vae.token_dim
        device = prompt_mask.device
        if order is None:
            order = generation_order(B, L, self.config.order, generator)
        order = order.to(device)
        guided = uncond is not None
        text = self.prompt_embeds(prompt)
        if guided:
            text = torch.cat([text, self.prompt_embeds(uncond)])
        mask = torch.cat([prompt_mask, prompt_mask]) if guided else prompt_mask
        rows = 2 if guided else 1
        if source is not None:
            self.check_tokens(source, "source image tokens")
            source = source.to(device).repeat(rows, 1, 1)
        order2 = order.repeat(rows, 1)
        text = self._announce_first(text, order2, source)
        cache = KVCache()
        z = self.backbone(
            inputs_embeds=text, attention_mask=mask, mask="prefix",
            prefix_lengths=mask.sum(1), kv_cache=cache,
        )[:, -1]  # fmt: skip
        out = torch.zeros(B, L, C, device=device, dtype=self._head_dtype)
        for j in tqdm(range(L), disable=not progress, desc="UniFluid tokens", leave=False):
            w = 1.0 + (cfg_scale - 1.0) * (j + 1) / L
            cond, uncond = (z[:B], z[B:]) if guided else (z, None)
            dtype = self._head_dtype
            x = self.diffusion_head.sample(
                cond.to(dtype), z_uncond=None if uncond is None else uncond.to(dtype),
                cfg_scale=w, temperature=temperature, generator=generator, clip_x0=clip_x0,
            )  # fmt: skip
            if keep is not None:
                rows_j = torch.arange(B, device=device)
                kept = keep.to(device)[rows_j, order[:, j]][:, None]
                x = torch.where(kept, given.to(device, x.dtype)[rows_j, order[:, j]], x)
            out[torch.arange(B), order[:, j]] = x
            if j == L - 1:
                break
            step = (self.image_in(x.to(z.dtype)) + self.pos_in[order[:, j]]).repeat(rows, 1)
            step = (step + self.next_cell(order2[:, j + 1 : j + 2], source)[:, 0])[:, None]
            z = self.backbone(
                inputs_embeds=step, attention_mask=mask.new_ones(rows * B, 1), mask="prefix",
                prefix_lengths=mask.sum(1), kv_cache=cache,
            )[:, -1]  # fmt: skip
        return out

    # -- training --------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict:
        """Per-sample losses of a training batch in one call (one forward per step, as DDP
        wants): ``{"image": [G + E], "text": [U]}`` for its ``gen`` / ``edit`` / ``und`` parts
        (each a dict or None; see :class:`kineflow.train.unifluid.UnifluidTask`). Editing
        prompts carry the source picture at their ``image_mask`` positions (:meth:`edit_embeds`;
        its understanding pixels are ``source_pixels``). A part
        with ``diffusion_t`` / ``diffusion_noise`` uses those pre-drawn draws
        (:meth:`image_loss`), else ``generator``'s."""
        device = self.pos_in.device
        image, text = [], torch.zeros(0, device=device)
        for part in ("gen", "edit"):
            b = batch.get(part)
            if b is None:
                continue
            prompt, source = b["ids"], b.get("source")
            if part == "edit":
                features = (self.encode_images(b["source_pixels"])
                            if self.config.edit_features else None)  # fmt: skip
                prompt = self.edit_embeds(b["ids"], b["image_mask"], source, features)
            draws = (b["diffusion_t"], b["diffusion_noise"]) if "diffusion_t" in b else None
            image.append(self.image_loss(prompt, b["mask"], b["tokens"], b["order"], generator,
                                         source, draws))  # fmt: skip
        b = batch.get("und")
        if b is not None:
            hidden = self.understanding_hidden(
                b["ids"], b["mask"], b["image_mask"], self.encode_images(b["pixels"]), b["prefix"]
            )
            text = self.text_loss(hidden, b["targets"], b["target_mask"])
        image_loss = torch.cat(image) if image else torch.zeros(0, device=device)
        return {"image": image_loss, "text": text}

    # -- understanding ---------------------------------------------------------------------------
    def understanding_embeds(
        self, input_ids: Tensor, image_mask: Tensor, features: Tensor
    ) -> Tensor:
        """Text embeddings ``[B, N, D]`` with the ``image_mask`` positions filled, row-major,
        by ``features [I, P, D]`` (:meth:`encode_images`)."""
        embeds = self.backbone.embed(input_ids.masked_fill(image_mask, 0))
        if int(image_mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"image_mask marks {int(image_mask.sum())} positions but the features hold "
                f"{features.shape[0]} x {features.shape[1]}"
            )
        return embeds.masked_scatter(image_mask[..., None], features.to(embeds.dtype))

    def understanding_hidden(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_mask: Tensor,
        features: Tensor,
        prefix_lengths: Tensor,
    ) -> Tensor:
        """Hidden states ``[B, N, D]`` of :meth:`understanding_embeds` with prefix-LM attention
        over the first ``prefix_lengths`` real tokens (image + question)."""
        embeds = self.understanding_embeds(input_ids, image_mask, features)
        return self.backbone(
            inputs_embeds=embeds, attention_mask=attention_mask, mask="prefix",
            prefix_lengths=prefix_lengths,
        )  # fmt: skip

    def text_loss(self, hidden: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
        """Per-sample mean cross-entropy ``[B]`` of the shifted logits (position ``i`` read
        from hidden ``i − 1``) at ``target_mask`` positions of ``targets [B, N]``."""
        rows, cols = target_mask.nonzero(as_tuple=True)
        logits = self.text_logits(hidden[rows, cols - 1])
        ce = F.cross_entropy(logits, targets[rows, cols], reduction="none")
        B = targets.shape[0]
        total = torch.zeros(B, device=ce.device).index_add_(0, rows, ce)
        return total / target_mask.sum(1).clamp(min=1)

    @torch.no_grad()
    def generate_text(
        self,
        embeds: Tensor,
        attention_mask: Tensor,
        prefix_lengths: Tensor,
        *,
        max_tokens: int,
        eos_id: int,
        beams: int = 1,
    ) -> list[list[int]]:
        """Continue each row of ``embeds [B, N, D]`` (e.g. :meth:`understanding_embeds`) for at most
        ``max_tokens`` tokens, greedily (``beams=1``) or by beam search, with a KV cache.
        Returns each row's tokens up to (not including) its first EOS.

        Beam search keeps the ``beams`` highest sums of log-probabilities; a finished beam
        (EOS emitted) keeps its score and is extended by EOS at no cost; the best beam wins
        (no length normalisation: ShapesWorld answers and captions are short).
        """
        if beams < 1 or max_tokens < 1:
            raise ValueError(f"need beams >= 1 and max_tokens >= 1, got {beams}, {max_tokens}")
        B, K = embeds.shape[0], beams
        rows = torch.arange(B, device=embeds.device).repeat_interleave(K)
        cache = KVCache()
        h = self.backbone(
            inputs_embeds=embeds[rows], attention_mask=attention_mask[rows], mask="prefix",
            prefix_lengths=prefix_lengths[rows], kv_cache=cache,
        )[:, -1]  # fmt: skip
        scores = torch.zeros(B, K, device=embeds.device, dtype=torch.float64)
        scores[:, 1:] = -torch.inf  # the K copies start identical: expand from the first only
        done = torch.zeros(B, K, dtype=torch.bool, device=embeds.device)
        seqs = torch.empty(B, K, 0, dtype=torch.long, device=embeds.device)
        for _ in range(max_tokens):
            logp = torch.log_softmax(self.text_logits(h).double(), -1).view(B, K, -1)
            V = logp.shape[-1]
            # A finished beam may only repeat EOS, for free.
            frozen = torch.full_like(logp[0, 0], -torch.inf)
            frozen[eos_id] = 0.0
            logp = torch.where(done[..., None], frozen, logp)
            total = (scores[..., None] + logp).view(B, K * V)
            scores, flat = total.topk(K, dim=-1)
            beam, token = flat // V, flat % V
            seqs = torch.cat(
                [seqs.gather(1, beam[..., None].expand_as(seqs)), token[..., None]], -1
            )
            done = done.gather(1, beam) | (token == eos_id)
            if bool(done[:, 0].all()) and (K == 1 or bool(done.all())):
                break
            cache.reorder((torch.arange(B, device=beam.device)[:, None] * K + beam).flatten())
            step = self.backbone.embed(token.view(B * K, 1))
            h = self.backbone(
                inputs_embeds=step, attention_mask=step.new_ones(B * K, 1, dtype=torch.bool),
                mask="prefix", prefix_lengths=prefix_lengths[rows], kv_cache=cache,
            )[:, -1]  # fmt: skip
        out = []
        for b in range(B):
            ids = seqs[b, 0].tolist()
            out.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
        return out
