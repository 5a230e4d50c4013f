"""kineflow: unified multimodal models with discrete flow matching and continuous-token AR."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # Lazy: ``import kineflow`` (and the CLI's start-up) should not pay for the model code.
    if name == "load":
        from kineflow.pipelines.loading import load

        return load
    raise AttributeError(f"module 'kineflow' has no attribute {name!r}")
