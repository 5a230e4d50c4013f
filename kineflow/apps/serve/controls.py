"""What the page of ``kineflow serve`` shows for a pipeline, asked of the Pipeline interface.

The tabs follow :meth:`~kineflow.pipelines.base.Pipeline.supports` (a family that edits gets
the "Edit" tab, one that infills the "Infill" tab; a "Caption" button appears where the family
has a ``caption`` task), and each tab's controls follow
:meth:`~kineflow.pipelines.base.Pipeline.uses_option` (FUDOKI's text-to-image shows steps and
top-k, UniFluid's does not; UniFluid's answer shows beams). Nothing here names a family.

Each control's starting value is the value the pipeline would use by default, resolved to a
number so the run card states it: the pipeline config's field of that name when there is one
(``steps``, ``cfg_scale``, ``temperature``), else the default of the task method's keyword.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kineflow.pipelines.base import Pipeline

__all__ = [
    "CONTROLS",
    "TABS",
    "Control",
    "Tab",
    "checked_value",
    "default_value",
    "tabs_for",
    "visible_controls",
]


@dataclass(frozen=True)
class Control:
    """A number box: ``integer`` ones reject fractions; values outside ``[low, high]`` are
    refused with a message (the pipeline checks its own rules again); with ``zero_is_none`` a
    0 means "not set" (a number box cannot be left empty)."""

    label: str
    info: str
    integer: bool
    low: float
    high: float
    zero_is_none: bool = False


#: Every sampling control a tab may show, in page order, by the pipeline keyword it sets.
CONTROLS: Mapping[str, Control] = {
    "seed": Control("seed", "same seed + same settings = same result", True, 0, 2**53 - 1),
    "steps": Control("steps", "solver steps (= model calls)", True, 1, 1024),
    "cfg_scale": Control("CFG", "classifier-free guidance weight", False, 0.0, 100.0),
    "temperature": Control("temperature", "sampling temperature (0 = greedy)", False, 0.0, 10.0),
    "top_k": Control("top-k", "sample among the k likeliest (0 = all)", True, 1, 10**6, True),
    "beams": Control("beams", "beam search width (1 = greedy)", True, 1, 16),
}


@dataclass(frozen=True)
class Tab:
    """A tab of the page: its title, the pipeline task it runs (None: no task of its own)."""

    title: str
    task: str | None


#: Every tab the page can have, in page order.
TABS: tuple[Tab, ...] = (
    Tab("Text to image", "text_to_image"),
    Tab("Ask about a picture", "answer"),
    Tab("Edit", "edit"),
    Tab("Infill", "infill"),
    Tab("Reproduce a run card", None),
)


def tabs_for(pipeline: type[Pipeline] | Pipeline) -> list[Tab]:
    """The tabs a pipeline's page has: those whose task the family supports, and the
    "Reproduce" tab (which replays a run card of any task)."""
    return [tab for tab in TABS if tab.task is None or pipeline.supports(tab.task)]


def visible_controls(pipeline: type[Pipeline] | Pipeline, task: str) -> list[str]:
    """The :data:`CONTROLS` that ``task`` of this family uses, in page order."""
    return [name for name in CONTROLS if pipeline.uses_option(task, name)]


def checked_value(name: str, value: Any) -> Any:
    """``value`` of control ``name`` as the pipeline takes it: None stays None (the default),
    whole numbers become ``int``, a 0 of a ``zero_is_none`` control becomes None.

    Raises:
        ValueError: not a number, a fraction where a whole number is needed, or out of
            ``[low, high]`` (naming the control, its bounds and the value).
    """
    control = CONTROLS[name]
    if value is None or (control.zero_is_none and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise ValueError(f"{control.label} must be a number, got {value!r}")
    if control.integer:
        if not float(value).is_integer():
            raise ValueError(f"{control.label} must be a whole number, got {value!r}")
        value = int(value)
    if not control.low <= value <= control.high:
        raise ValueError(f"{control.label} must be between {control.low:g} and "
                         f"{control.high:g}, got {value!r}")  # fmt: skip
    return value


def default_value(pipeline: Pipeline, task: str, name: str) -> Any:
    """The value ``task`` uses for option ``name`` when not given (module docstring): the
    config's field ``name`` if it has one, else the keyword default of the method ``task``
    (None when it has none). ``seed`` starts at 0."""
    if name == "seed":
        return 0
    config_value = getattr(getattr(pipeline, "config", None), name, None)
    if config_value is not None:
        return config_value
    parameter = inspect.signature(getattr(pipeline, task)).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default
