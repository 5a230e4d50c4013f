"""What decides a FUDOKI pipeline's behaviour besides the network: its config and its paths.

Shared by sampling (:mod:`kineflow.pipelines.fudoki`), its checkpoint files
(:mod:`kineflow.pipelines.fudoki_checkpoints`, :mod:`kineflow.pipelines.janus_release`) and
training (:mod:`kineflow.train.fudoki`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from kineflow.config import check_config_keys
from kineflow.flow import MaskedPath, MetricPath
from kineflow.flow.path import DiscretePath
from kineflow.inputs.checks import check_options
from kineflow.models.fudoki import FudokiConfig

__all__ = [
    "JANUS_SYSTEM_PROMPT",
    "KIND",
    "METRIC_FILE",
    "PATHS",
    "FudokiPipelineConfig",
    "make_paths",
]

#: The system prompt of Janus's / FUDOKI's understanding processor.
JANUS_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual "
    "content that the user provides, and assist the user with a variety of tasks using natural "
    "language."
)
KIND = "fudoki"
PATHS = ("metric", "masked", "ar")
METRIC_FILE = "metric.safetensors"


@dataclass
class FudokiPipelineConfig:
    """Everything besides the network that decides what the pipeline does.

    ``metric_exponent``, ``beta_a``, ``beta_c``: the metric path ``softmax(−β_t d)``,
    ``d = ‖ê_x − ê_y‖^p``, ``β_t = c (t / (1 − t))^a`` (FUDOKI: p = 4, a = 0.9, c = 3).
    ``text_budget``: text tokens a sequence may hold besides the image (FUDOKI's
    ``txt_max_length``, 500). ``image_mean``/``image_std``/``background``: understanding
    preprocessing (:mod:`kineflow.inputs.images`). ``steps``, ``cfg_scale``,
    ``answer_tokens``: defaults of the sampling calls (``answer_tokens=None``: the official
    layout, answers fill the text budget). ``path``: ``"metric"`` (FUDOKI) or ``"masked"``
    (the absorbing-state baseline: text mask = the pad token, image mask = the extra image id
    ``K`` of a model built with ``image_mask_token``) or ``"ar"`` (the autoregressive
    baseline: causal attention, left-to-right decoding with a KV cache; ``steps`` is unused).
    """

    metric_exponent: float = 4.0
    beta_a: float = 0.9
    beta_c: float = 3.0
    text_budget: int = 500
    system_prompt: str = JANUS_SYSTEM_PROMPT
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    background: tuple[int, int, int] = (127, 127, 127)
    steps: int = 50
    cfg_scale: float = 5.0
    answer_tokens: int | None = None
    path: str = "metric"

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        # The sampling defaults obey the rules of the calls' own options.
        check_options(answer_tokens=self.answer_tokens, steps=self.steps, cfg_scale=self.cfg_scale)
        for name in ("image_mean", "image_std", "background"):
            value = tuple(getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 entries (RGB), got {value!r}")
            setattr(self, name, value)
        if any(not s > 0 for s in self.image_std):
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        budget = self.text_budget
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"text_budget must be a positive integer, got {budget!r}")
        for name in ("metric_exponent", "beta_a", "beta_c"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FudokiPipelineConfig:
        check_config_keys(d, cls, "FUDOKI pipeline config")
        return cls(**d)


def make_paths(
    config: FudokiPipelineConfig,
    text_embeddings: Tensor,
    image_embeddings: Tensor,
    pad_id: int,
    model_config: FudokiConfig,
) -> tuple[DiscretePath, DiscretePath] | tuple[None, None]:
    """The text and image paths of ``config.path`` (shared by sampling and training).

    metric: ``softmax(−β_t ‖ê_x − ê_y‖^p)`` over each table; masked: absorbing paths whose
    masks are the pad token (text) and the extra image id ``K``; ar: none (no corruption).
    """
    if config.path == "ar":
        return None, None
    if config.path == "metric":
        return tuple(
            MetricPath.from_embeddings(t, config.metric_exponent, config.beta_a, config.beta_c)
            for t in (text_embeddings, image_embeddings)
        )
    if not model_config.image_mask_token:
        raise ValueError("the masked path needs a model built with image_mask_token=True")
    K = model_config.gen_vision.codebook_size
    return MaskedPath(model_config.language.vocab_size, pad_id), MaskedPath(K + 1, K)
