"""The sampling options the pipelines' calls share, checked once at the API boundary."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kineflow.inputs.checks import check_options

__all__ = ["SamplingOptions"]


@dataclass(frozen=True)
class SamplingOptions:
    """The options of a sampling call (``text_to_image``, ``answer``, ``generate_text``,
    ``edit``), validated on construction by :func:`kineflow.inputs.checks.check_options`
    (integers >= 1 for ``steps`` and ``top_k``, finite numbers >= 0 for ``cfg_scale`` and
    ``temperature``, ``seed`` in ``[0, 2**64 − 1]``) and stored normalised (``int`` /
    ``float``). None means "the pipeline's default" (``temperature``: 1; ``cfg_scale``: the
    config's); a family ignores the options it has no use for (see
    :attr:`~kineflow.pipelines.base.Pipeline.task_options`).

    ``generator`` (a ``torch.Generator`` on the model's device) replaces ``seed``; giving both
    is refused. ``return_trajectory``: also return the states along the way; ``progress``: a
    tqdm bar.

    Raises:
        ValueError: naming the first bad field, its rule and the value given.
    """

    steps: int | None = None
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    seed: int | None = None
    generator: torch.Generator | None = None
    return_trajectory: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        checked = check_options(steps=self.steps, cfg_scale=self.cfg_scale,
                                temperature=self.temperature, top_k=self.top_k,
                                seed=self.seed)  # fmt: skip
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: normalised once, here

    def generator_on(self, device: torch.device) -> torch.Generator:
        """The generator to draw with: ``generator`` as given, else a new one on ``device``
        seeded with ``seed`` (or from the OS without one).

        Raises:
            ValueError: both ``seed`` and ``generator`` were given.
        """
        if self.generator is not None:
            if self.seed is not None:
                raise ValueError("pass seed or generator, not both")
            return self.generator
        generator = torch.Generator(device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(self.seed))
        return generator
