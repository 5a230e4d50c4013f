"""kineflow: unified multimodal models with discrete flow matching and continuous-token AR."""

__version__ = "0.1.0"
