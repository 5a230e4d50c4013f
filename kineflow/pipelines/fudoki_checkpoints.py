"""FUDOKI pipelines on disk: a kineflow folder written by ``save_pretrained``, or a Janus /
FUDOKI release (see :mod:`kineflow.pipelines.loading` for both layouts).

:class:`FudokiCheckpoints` is the checkpoint half of
:class:`~kineflow.pipelines.fudoki.FudokiPipeline` (the sampling half lives there): it
builds pipelines with ``cls(model, tokenizer, text_table, image_table, config, provenance)``
and reads its own folders, so it needs neither the sampling code nor
:mod:`kineflow.pipelines.loading`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import torch
from safetensors.torch import load_file
from torch import Tensor

from kineflow.config import check_config_keys
from kineflow.interop.janus import fudoki_model_from_janus
from kineflow.interop.load_checks import check_finite as check_finite_tensors
from kineflow.interop.load_checks import check_floating
from kineflow.io import (
    TYPE_FIELD,
    atomic_save_safetensors,
    load_pretrained_folder,
    save_pretrained_folder,
)
from kineflow.models.fudoki import FudokiConfig, FudokiModel
from kineflow.pipelines.checkpoints import header_dtypes, load_checked, open_checkpoint
from kineflow.pipelines.fudoki_config import KIND, METRIC_FILE, FudokiPipelineConfig
from kineflow.pipelines.janus_release import read_janus_release
from kineflow.pipelines.model_card import card_writer
from kineflow.tokenizers.text import TextTokenizer

__all__ = ["FudokiCheckpoints"]


class FudokiCheckpoints:
    """Saving and loading for :class:`~kineflow.pipelines.fudoki.FudokiPipeline`."""

    model: FudokiModel
    tokenizer: TextTokenizer
    config: FudokiPipelineConfig
    text_embeddings: Tensor
    image_embeddings: Tensor

    def save_pretrained(self, folder: str | os.PathLike[str], **card: Any) -> Path:
        """Write a kineflow FUDOKI folder: ``config.json`` (``kineflow_type: fudoki``, the model
        and pipeline configs), ``model.safetensors`` (Janus key names), ``metric.safetensors``
        (``text``, ``image`` tables), the tokenizer files and the ``README.md`` model card
        (``card``: :func:`~kineflow.pipelines.model_card.model_card`'s ``training``,
        ``scores``, ``name``), swapped in whole: see :func:`kineflow.io.save_pretrained_folder`
        (and its ValueErrors)."""

        def tokenizer_and_tables(temp: Path) -> None:
            self.tokenizer.save(temp)
            atomic_save_safetensors(
                temp / METRIC_FILE,
                {"text": self.text_embeddings, "image": self.image_embeddings},
                {"format": "pt"},
            )

        config = {"model": self.model.config.to_dict(), "pipeline": self.config.to_dict()}
        weights, c = self.model.state_dict(), self.model.config
        facts = {
            "image_size": c.gen_vision.image_size,
            "image_tokens": c.image_token_count,
            "codebook_size": c.gen_vision.codebook_size,
            "text_vocab_size": c.language.vocab_size,
            "layers": c.language.num_hidden_layers,
            "hidden_size": c.language.hidden_size,
            "text_budget": self.config.text_budget,
        }
        extra = card_writer(self, weights, facts, tokenizer_and_tables, **card)  # type: ignore[arg-type]
        return save_pretrained_folder(folder, weights, config, KIND, extra=extra)

    @classmethod
    def from_pretrained(
        cls,
        name: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """What :func:`kineflow.load` returns for a Janus / FUDOKI release, a kineflow FUDOKI
        folder or a hub id holding either (a UniFluid checkpoint is refused)."""
        return open_checkpoint(name, device=device, dtype=dtype, expect=cls)

    @classmethod
    def load_checkpoint(
        cls,
        folder: Path,
        config: Mapping[str, Any],
        *,
        max_bytes: int | None = None,
        check_finite: bool | None = None,
    ) -> Self:
        """A kineflow FUDOKI folder (after :func:`~kineflow.pipelines.checkpoints.load_checked`
        and the metric tables' checks) or a Janus / FUDOKI release (float32); on the CPU."""
        if config.get(TYPE_FIELD) != KIND:
            release = cls.from_janus_release(folder, config, max_bytes=max_bytes,
                                             check_finite=check_finite)  # fmt: skip
            return release.to(dtype=torch.float32)
        return load_checked(
            folder, lambda: FudokiConfig.from_dict(config["model"]), FudokiModel,
            cls.from_kineflow_folder, max_bytes=max_bytes, check_finite=check_finite,
            also=lambda check: _check_metric_tables(folder / METRIC_FILE, check),
        )  # fmt: skip

    @classmethod
    def from_janus_release(
        cls,
        folder: str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        *,
        max_bytes: int | None = None,
        check_finite: bool | None = None,
    ) -> Self:
        """A Janus / FUDOKI release folder as a pipeline, on the CPU (the checks are
        :func:`~kineflow.pipelines.janus_release.read_janus_release`'s)."""
        release = read_janus_release(folder, config, max_bytes=max_bytes,
                                     check_finite=check_finite)  # fmt: skip
        tables, provenance = release.tables, release.provenance
        try:
            return cls(release.model, release.tokenizer, tables["text"], tables["image"],
                       release.config, provenance)  # fmt: skip
        except ValueError as e:
            sources = "; ".join(f"{k}: {v}" for k, v in provenance.items())
            raise ValueError(f"{folder}: {e} (metric tables: {sources})") from e

    @classmethod
    def from_kineflow_folder(cls, folder: str | os.PathLike[str]) -> Self:
        """Read what :meth:`save_pretrained` wrote (see :func:`kineflow.load`)."""
        folder = Path(folder)
        config, weights = load_pretrained_folder(folder, KIND, "FUDOKI checkpoint")
        check_config_keys(config, _SavedConfig, f"{folder / 'config.json'}")
        try:
            model_config = FudokiConfig.from_dict(config["model"])
            pipeline_config = FudokiPipelineConfig.from_dict(config.get("pipeline", {}))
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{folder / 'config.json'}: {e}") from e
        model = fudoki_model_from_janus(weights, model_config)
        dtypes = {t.dtype for t in weights.values() if t.is_floating_point()}
        if len(dtypes) == 1:  # a bfloat16 save loads as bfloat16 (exact: fp32 holds bf16)
            model.to(dtypes.pop())
        tables = _read_metric_tables(folder / METRIC_FILE)
        tokenizer = TextTokenizer.load(folder)
        provenance = {name: f"{folder / METRIC_FILE}[{name}]" for name in tables}
        return cls(model, tokenizer, tables["text"], tables["image"], pipeline_config, provenance)


def _check_metric_tables(path: Path, check: bool) -> None:
    """The metric tables must be floating-point and, when ``check``, finite: the pipeline
    casts and uses them as they are. A missing or damaged file is left to the loader."""
    tables = header_dtypes(path)
    if tables is None:
        return
    floats = {name: torch.empty(0) for name in ("text", "image")}  # both tables are floats
    check_floating(floats, tables, lambda key: path)
    if check:
        loaded = load_file(str(path), device="cpu")
        check_finite_tensors((f"{path}: {name}", t) for name, t in loaded.items())


def _read_metric_tables(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent} has no {path.name} (the metric tables)")
    try:
        tables = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if set(tables) != {"text", "image"}:
        raise ValueError(
            f"{path} must hold exactly the tensors 'text' and 'image', got {sorted(tables)}"
        )
    return tables


@dataclass
class _SavedConfig:
    """The keys of a kineflow FUDOKI ``config.json`` (for the unknown-key check)."""

    model: dict
    pipeline: dict | None = None
