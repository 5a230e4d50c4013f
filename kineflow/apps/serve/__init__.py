"""``kineflow serve``: a web app (gradio) for a FUDOKI or UniFluid checkpoint.

- :mod:`.controls`: which tabs and controls the page shows, asked of the Pipeline interface;
- :mod:`.handlers`: what the buttons do, as plain functions (:class:`Session`), no gradio;
- :mod:`.run_card`: the exact settings of every result, as downloadable JSON;
- :mod:`.page`: the gradio page and its queue (gradio is imported there only).
"""

from kineflow.apps.serve.handlers import Outcome, Session
from kineflow.apps.serve.run_card import RunCard

__all__ = ["Outcome", "RunCard", "Session"]
