"""Inference pipelines: prompt layouts, preprocessing, sampling and output files per model."""

from kineflow.pipelines.fudoki import (
    FudokiPipeline,
    FudokiPipelineConfig,
    ImageResult,
    TextResult,
)

__all__ = ["FudokiPipeline", "FudokiPipelineConfig", "ImageResult", "TextResult"]
