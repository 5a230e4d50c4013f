"""Inference pipelines: one interface (:mod:`kineflow.pipelines.base`), one class per model
family, registered by the ``kineflow_type`` of its checkpoints; ``kineflow.load`` dispatches
through that registry (:mod:`kineflow.pipelines.loading`).

Importing this package registers every family: FUDOKI first, then UniFluid.
"""

from kineflow.pipelines.base import ImageResult, Pipeline, TextResult, pipeline_class, register
from kineflow.pipelines.fudoki import FudokiPipeline, FudokiPipelineConfig
from kineflow.pipelines.sampling_options import SamplingOptions
from kineflow.pipelines.unifluid import UnifluidPipeline, UnifluidPipelineConfig

__all__ = [
    "FudokiPipeline",
    "FudokiPipelineConfig",
    "ImageResult",
    "Pipeline",
    "SamplingOptions",
    "TextResult",
    "UnifluidPipeline",
    "UnifluidPipelineConfig",
    "pipeline_class",
    "register",
]
