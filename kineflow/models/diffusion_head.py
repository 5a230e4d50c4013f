"""A per-token diffusion head (MAR's "diffusion loss", UniFluid's image head).

Each continuous image token ``x_0 ∈ R^C`` is modelled by a small denoiser conditioned on the
transformer's output ``z ∈ R^{D_z}`` for that token (docs/design.md §2.6). Gaussian diffusion
with ``T`` steps (1000) and the cosine schedule of Nichol & Dhariwal:

    ᾱ(t) = f(t) / f(0),  f(t) = cos²((t/T + s) / (1 + s) · π/2),  s = 0.008
    β_t = min(1 − ᾱ_t / ᾱ_{t−1}, 0.999)                           (t = 0 … T−1, ᾱ_{−1} = 1)
    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I)

The network outputs ``[ε̂, v]`` (2C channels): ε-prediction and a learned variance interpolating
in log space between the two natural choices (Improved DDPM's "learned range"),

    log σ_t² = ((v + 1)/2) · log β_t + (1 − (v + 1)/2) · log β̃_t
    β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)

Reverse step: ``x̂_0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t``, ``x_{t−1} ~ N(μ̃_t(x̂_0, x_t), τ² σ_t²)`` with the
posterior mean ``μ̃_t = (√ᾱ_{t−1} β_t / (1−ᾱ_t)) x̂_0 + (√α_t (1−ᾱ_{t−1}) / (1−ᾱ_t)) x_t`` and
temperature ``τ`` (no noise on the last step).

Training loss per draw: ``‖ε − ε̂‖² / C`` plus the variational bound term that trains ``v``
alone (the mean is detached in it): ``KL(q(x_{t−1}|x_t, x_0) ‖ p(x_{t−1}|x_t)) / log 2`` for
``t > 0`` and the Gaussian negative log-likelihood of ``x_0`` at ``t = 0``, both per channel
averaged. Each token is used ``draws`` times per pass with independent ``(t, ε)`` (MAR's
``diffusion_batch_mul``): the denoiser is tiny, so more draws cost little next to the backbone.

Sampling uses a respaced chain of ``sample_steps`` (100) steps: the kept steps ``k_i`` are
evenly spread over ``0 … T−1`` and the chain's betas are ``1 − ᾱ_{k_i} / ᾱ_{k_{i−1}}``, so each
kept step has exactly the original ᾱ; the network sees the original index ``k_i``.

Classifier-free guidance acts on ε: ``ε̂ = ε̂(x|∅) + w (ε̂(x|z) − ε̂(x|∅))``, with ``w`` a number
or one weight per token (UniFluid raises it over the generated tokens); the variance is the
conditional one.

The denoiser (:class:`DiffusionMLP`) is MAR's ``SimpleMLPAdaLN``: residual MLP blocks with
adaptive LayerNorm (shift, scale and gate from ``SiLU(emb(t) + proj(z))``), zero-initialised
modulations and output layer. As in MAR, each block's LayerNorm has a learnable weight and bias
(MAR's ``ResBlock.in_ln``) and the final one has none, so MAR ``DiffLoss`` weights load as they
are (:mod:`kineflow.interop.mar`). Checkpoints written before the block norms had parameters
lack them: :func:`add_identity_norms` (and a load hook of :class:`DiffusionMLP`) fill in the
identity (weight 1, bias 0), which is exactly what those heads computed.

One difference from MAR remains, in training only: at ``t = 0`` the bound term here is the
*continuous* Gaussian negative log-likelihood of ``x_0``, where MAR (ADM's code) uses
``discretized_gaussian_log_likelihood``, the probability of the 8-bit bin of width 2/255 around
``x_0``, a rule for pixels in [−1, 1] that does not fit continuous latent tokens. It touches
only the variance output ``v`` on draws with ``t = 0`` (1 in ``steps``); ``ε̂``, the MSE term,
every ``t > 0`` term and sampling are the same, so loaded MAR weights sample as in MAR.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kineflow.config import check_config_keys

__all__ = [
    "CosineSchedule",
    "DiffusionHead",
    "DiffusionHeadConfig",
    "DiffusionMLP",
    "add_identity_norms",
]


@dataclass
class DiffusionHeadConfig:
    """``token_dim``: C; ``cond_dim``: D_z; ``width`` / ``depth``: the MLP (MAR: 1024 / 3 for
    its small models); ``steps``: T; ``sample_steps``: the respaced chain; ``draws``: (t, ε)
    draws per token per training pass."""

    token_dim: int
    cond_dim: int
    width: int = 256
    depth: int = 3
    steps: int = 1000
    sample_steps: int = 100
    draws: int = 4

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.sample_steps > self.steps:
            raise ValueError(f"sample_steps={self.sample_steps} exceeds steps={self.steps}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiffusionHeadConfig:
        check_config_keys(d, cls, "DiffusionHeadConfig")
        return cls(**d)


class CosineSchedule:
    """The (possibly respaced) Gaussian diffusion quantities of the module docstring, in
    float64. ``kept`` lists the original step of each of this chain's steps."""

    def __init__(self, steps: int = 1000, kept: list[int] | None = None, s: float = 0.008):
        t = torch.arange(steps + 1, dtype=torch.float64)
        f = torch.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas_bar = torch.cumprod(1 - betas, 0)
        self.kept = list(range(steps)) if kept is None else list(kept)
        if self.kept != sorted(set(self.kept)) or not 0 <= self.kept[0] <= self.kept[-1] < steps:
            raise ValueError(f"kept steps must be increasing and within [0, {steps})")
        a = alphas_bar[self.kept]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
        self.alphas_bar = a
        self.alphas_bar_prev = prev
        self.betas = 1 - a / prev
        self.posterior_variance = self.betas * (1 - prev) / (1 - a)
        # β̃_0 = 0: use β̃_1 in the log, as the learned range needs a finite lower end.
        self.posterior_log_variance = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.coef_x0 = prev.sqrt() * self.betas / (1 - a)
        self.coef_xt = (1 - self.betas).sqrt() * (1 - prev) / (1 - a)

    @classmethod
    def respaced(cls, steps: int, sample_steps: int) -> CosineSchedule:
        """``sample_steps`` kept steps evenly spread over ``0 … steps − 1`` (both ends kept)."""
        last = max(sample_steps - 1, 1)
        kept = sorted({round(i * (steps - 1) / last) for i in range(sample_steps)})
        return cls(steps, kept)

    def __len__(self) -> int:
        return len(self.kept)

    def to(self, device: torch.device | str) -> CosineSchedule:
        """A copy whose tables live on ``device``, so that a sampling loop on a GPU indexes
        them there instead of copying them over at every step (same float64 values). Kept per
        device: UniFluid samples once per image token, and the copy need only happen once."""
        device = torch.device(device)
        copies = self.__dict__.setdefault("_copies", {})
        if device not in copies:
            moved = object.__new__(CosineSchedule)
            for name, value in vars(self).items():
                if name != "_copies":
                    setattr(moved, name, value.to(device) if isinstance(value, Tensor) else value)
            copies[device] = moved
        return copies[device]

    def gather(self, name: str, index: Tensor, like: Tensor) -> Tensor:
        """``getattr(self, name)[index]`` as ``like``'s dtype / device, shaped ``[M, 1]``."""
        values = getattr(self, name).to(like.device)[index]
        return values.to(like.dtype)[:, None]

    def q_sample(self, x0: Tensor, index: Tensor, noise: Tensor) -> Tensor:
        """``x_t = √ᾱ x_0 + √(1 − ᾱ) ε`` for rows ``[M, C]`` at chain steps ``index [M]``."""
        a = self.gather("alphas_bar", index, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def log_variance(self, index: Tensor, v: Tensor) -> Tensor:
        """The learned-range ``log σ²`` for ``v ∈ [−1, 1]`` (``[M, C]``)."""
        frac = (v + 1) / 2
        log_beta = torch.log(self.gather("betas", index, v).clamp(min=1e-20))
        return frac * log_beta + (1 - frac) * self.gather("posterior_log_variance", index, v)

    def predict_x0(self, x_t: Tensor, index: Tensor, eps: Tensor) -> Tensor:
        a = self.gather("alphas_bar", index, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def posterior_mean(self, x0: Tensor, x_t: Tensor, index: Tensor) -> Tensor:
        return self.gather("coef_x0", index, x0) * x0 + self.gather("coef_xt", index, x_t) * x_t


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[M, dim]`` of (possibly fractional) steps ``t [M]``:
    ``[cos(t ω_k), sin(t ω_k)]`` with ``ω_k = max_period^(−k / (dim/2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def _missing_norms(weights: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The identity norm parameters that a :class:`DiffusionMLP` state dict under ``prefix``
    lacks: for every block ``i`` with ``blocks.i.mlp.0.weight`` but *neither*
    ``blocks.i.norm.weight`` nor ``.bias`` (a half-present pair is left for the strict check)."""
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.mlp\.0\.weight")
    added = {}
    for key, value in weights.items():
        match = pattern.fullmatch(key)
        if match is None:
            continue
        norm = f"{prefix}blocks.{match.group(1)}.norm."
        if norm + "weight" in weights or norm + "bias" in weights:
            continue
        like = {"dtype": value.dtype, "device": value.device}
        added[norm + "weight"] = torch.ones(value.shape[1], **like)
        added[norm + "bias"] = torch.zeros(value.shape[1], **like)
    return added


def add_identity_norms(weights: Mapping[str, Tensor], prefix: str = "net.") -> dict[str, Tensor]:
    """``weights`` plus identity block-norm parameters where a checkpoint predates them.

    Heads saved before the block LayerNorms became affine have no ``blocks.i.norm.weight`` /
    ``.bias``; they computed an un-scaled norm, which is the affine one at weight 1, bias 0.
    ``prefix`` locates the :class:`DiffusionMLP` in ``weights``: ``"net."`` for a
    :class:`DiffusionHead`'s state dict, ``"diffusion_head.net."`` for a UniFluid model's.
    Call this before a key-by-key check such as :func:`kineflow.io.check_state_dict`; plain
    ``load_state_dict`` does it by itself (a load hook of :class:`DiffusionMLP`).
    """
    return {**weights, **_missing_norms(weights, prefix)}


class _AdaLNBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        # Affine like MAR's ResBlock.in_ln, so its trained weight and bias can be loaded.
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """``(x_t [M, C], t [M], z [M, D_z]) -> [ε̂, v] [M, 2C]`` (see the module docstring)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int) -> None:
        super().__init__()
        self.time_dim = 256
        self.time_embed = nn.Sequential(
            nn.Linear(self.time_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(_AdaLNBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.output = nn.Linear(width, 2 * token_dim)
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(self._fill_legacy_norms)

    @staticmethod
    def _fill_legacy_norms(module: nn.Module, state_dict: dict, prefix: str, *_args) -> None:
        # load_state_dict hands every module's hooks the same (copied) dict, and runs the
        # parent's before its children read their keys: identity norms for old checkpoints.
        state_dict.update(_missing_norms(state_dict, prefix))

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.time_embed:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        # Zero modulations and output: every block starts as the identity, the head at ε̂ = 0.
        for block in self.blocks:
            nn.init.ones_(block.norm.weight)
            nn.init.zeros_(block.norm.bias)
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final_modulation[-1], self.output):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        y = self.time_embed(timestep_embedding(t, self.time_dim).to(x.dtype)) + self.cond_embed(z)
        h = self.input_proj(x)
        for block in self.blocks:
            h = block(h, y)
        shift, scale = self.final_modulation(y).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1 + scale) + shift)


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """``KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2))`` element-wise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )  # fmt: skip


class DiffusionHead(nn.Module):
    """The per-token diffusion loss and sampler (see the module docstring)."""

    def __init__(self, config: DiffusionHeadConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.net = DiffusionMLP(c.token_dim, c.cond_dim, c.width, c.depth)
        self.train_schedule = CosineSchedule(c.steps)
        self.sample_schedule = CosineSchedule.respaced(c.steps, c.sample_steps)

    def _check(self, x: Tensor | None, z: Tensor) -> None:
        c = self.config
        if z.ndim != 2 or z.shape[1] != c.cond_dim:
            raise ValueError(f"z must be [M, {c.cond_dim}], got shape {tuple(z.shape)}")
        if x is not None and (x.ndim != 2 or tuple(x.shape) != (z.shape[0], c.token_dim)):
            raise ValueError(
                f"tokens must be [M, {c.token_dim}] with M = {z.shape[0]} (one per condition), "
                f"got shape {tuple(x.shape)}"
            )

    def loss(
        self,
        x0: Tensor,
        z: Tensor,
        generator: torch.Generator | None = None,
        draws: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Per-token loss ``[M]`` (mean over its ``draws`` draws) for tokens ``x0 [M, C]``
        conditioned on ``z [M, D_z]``. Each draw takes a step ``t ~ U{0 … T−1}`` and noise
        ``ε ~ N(0, I)``, from ``generator``, or pre-drawn: ``draws = (t Long[k·M],
        ε [k·M, C])``, row ``r·M + m`` = draw ``r`` of token ``m`` (e.g. each sample's from its
        own generator, so a token's draws do not depend on its batch)."""
        self._check(x0, z)
        k, (M, C) = self.config.draws, x0.shape
        x0 = x0.repeat(k, 1)
        z = z.repeat(k, 1)
        sched = self.train_schedule
        if draws is None:
            index = torch.randint(0, len(sched), (k * M,), generator=generator, device="cpu")
            noise = torch.randn(x0.shape, generator=generator, device="cpu")
        else:
            index, noise = draws
            if tuple(index.shape) != (k * M,) or tuple(noise.shape) != tuple(x0.shape):
                raise ValueError(
                    f"draws must be t [{k * M}] and noise {list(x0.shape)}, got "
                    f"{list(index.shape)} and {list(noise.shape)}"
                )
        index, noise = index.to(x0.device), noise.to(x0)
        x_t = sched.q_sample(x0, index, noise)
        out = self.net(x_t, index.to(x0.dtype), z)  # the training chain is the original one
        eps, v = out[:, :C], out[:, C:]
        mse = ((noise - eps) ** 2).mean(-1)
        vb = self._vb(sched, x0, x_t, index, eps.detach(), v)
        return (mse + vb).view(k, M).mean(0)

    def _vb(self, sched: CosineSchedule, x0: Tensor, x_t: Tensor, index: Tensor, eps: Tensor,
            v: Tensor) -> Tensor:  # fmt: skip
        """The bound term in bits per channel, through ``v`` only (``eps`` is detached)."""
        true_mean = sched.posterior_mean(x0, x_t, index)
        true_logvar = sched.gather("posterior_log_variance", index, x0).expand_as(x0)
        mean = sched.posterior_mean(sched.predict_x0(x_t, index, eps), x_t, index)
        logvar = sched.log_variance(index, v)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(-1) / math.log(2.0)
        nll = 0.5 * (math.log(2 * math.pi) + logvar + (x0 - mean) ** 2 * torch.exp(-logvar))
        nll = nll.mean(-1) / math.log(2.0)
        return torch.where(index == 0, nll, kl)

    @torch.no_grad()
    def sample(
        self,
        z: Tensor,
        *,
        z_uncond: Tensor | None = None,
        cfg_scale: float | Tensor = 1.0,
        temperature: float = 1.0,
        clip_x0: float | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Tokens ``[M, C]`` for conditions ``z [M, D_z]``; with ``z_uncond`` guided by
        ``cfg_scale`` (a number or ``[M]``, 1 = conditional only).

        ``clip_x0`` clamps ``x̂_0`` to ``[−c, c]`` before the posterior mean (ADM's
        ``clip_denoised``; off in MAR). At the first, near-pure-noise steps the posterior mean
        multiplies the error of ``ε̂`` by ``sqrt(ᾱ_{t−1} / ᾱ_t)`` (~350 for the last respaced
        step of the cosine schedule), so an under-trained head may diverge without it.
        """
        self._check(None, z)
        if z_uncond is not None and z_uncond.shape != z.shape:
            raise ValueError(f"z_uncond must have z's shape {tuple(z.shape)}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        M, C = z.shape[0], self.config.token_dim
        sched = self.sample_schedule.to(z.device)
        w = torch.as_tensor(cfg_scale, dtype=z.dtype, device=z.device).reshape(-1, 1)
        # All the noise up front, drawn on the CPU in the order the loop uses it (so a seed gives
        # the same tokens on every device), then one copy: the loop reads nothing from the host
        # and draws nothing, so it can be compiled or captured as a CUDA graph.
        draws = [torch.randn((M, C), generator=generator, device="cpu") for _ in range(len(sched))]
        noise = torch.stack(draws).to(z)
        x = noise[0]
        for i in reversed(range(len(sched))):
            x = self.denoise_step(
                x, i, z, noise[len(sched) - i] if i > 0 else None, sched=sched, z_uncond=z_uncond,
                cfg_scale=w, temperature=temperature, clip_x0=clip_x0,
            )  # fmt: skip
        return x

    def denoise_step(
        self,
        x: Tensor,
        i: int,
        z: Tensor,
        noise: Tensor | None,
        *,
        sched: CosineSchedule,
        z_uncond: Tensor | None = None,
        cfg_scale: Tensor | float = 1.0,
        temperature: float = 1.0,
        clip_x0: float | None = None,
    ) -> Tensor:
        """One reverse step of :meth:`sample` at chain step ``i``: ``x_i [M, C] -> x_{i−1}``
        (the posterior mean at ``i = 0``, where ``noise`` is None), with static shapes and no
        host reads, so that ``torch.compile(fullgraph=True)`` takes it whole."""
        C = self.config.token_dim
        M = x.shape[0]
        index = torch.full((M,), i, device=z.device)
        t = torch.full((M,), float(sched.kept[i]), device=z.device)
        if z_uncond is None:
            out = self.net(x, t, z)
        else:
            both = self.net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z_uncond]))
            cond, uncond = both.chunk(2)
            out = torch.cat([uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C]),
                             cond[:, C:]], dim=-1)  # fmt: skip
        eps, v = out[:, :C], out[:, C:]
        x0 = sched.predict_x0(x, index, eps)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = sched.posterior_mean(x0, x, index)
        if noise is None:
            return mean
        std = torch.exp(0.5 * sched.log_variance(index, v))
        return mean + temperature * std * noise
