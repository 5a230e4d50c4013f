"""A kineflow checkpoint as an lmms-eval model (needs ``pip install kineflow[eval]``).

``lmms-eval --model kineflow --model_args pretrained=checkpoints/fudoki-shapes,steps=16,
answer_tokens=None --tasks ...`` builds :class:`KineflowLmms` through lmms-eval's
``lmms_eval.models`` entry point (:mod:`kineflow.eval.plugins.lmms_requests`). Generation only:
``loglikelihood`` raises NotImplementedError, as lmms-eval's generative-only models do.
"""

from __future__ import annotations

from typing import Any

from kineflow.eval.plugins.answerer import Answerer
from kineflow.eval.plugins.lmms_requests import answer_requests

try:
    from lmms_eval.api.model import lmms
except ImportError as e:  # the optional extra is missing: say how to get it
    raise ImportError("kineflow's lmms-eval model needs lmms-eval: pip install "
                      "'kineflow[eval]' (or pip install lmms-eval)") from e  # fmt: skip

__all__ = ["KineflowLmms"]


class KineflowLmms(lmms):
    """lmms-eval's ``lmms`` for a FUDOKI or UniFluid checkpoint (a "simple" model: raw
    context + pictures).

    Args:
        pretrained: a checkpoint folder or hub id (lmms-eval's usual name for it).
        steps, answer_tokens, seed, beams, batch_size, device, dtype: see
            :class:`~kineflow.eval.plugins.answerer.Answerer`; ``answer_tokens=None`` is
            FUDOKI's full answer budget. Other keywords lmms-eval passes to every model
            (e.g. ``max_length``) are ignored.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str = "checkpoints/fudoki-shapes",
        steps: Any = None,
        answer_tokens: Any = None,
        seed: Any = 0,
        beams: Any = None,
        batch_size: Any = 1,
        device: str | None = None,
        dtype: str = "float32",
        **unused: Any,
    ) -> None:
        super().__init__()
        self.answerer = Answerer(
            pretrained, device=device or "cpu", dtype=dtype, steps=steps,
            answer_tokens=answer_tokens, seed=seed, beams=beams, batch_size=batch_size,
        )  # fmt: skip
        self.batch_size_per_gpu = self.answerer.batch_size

    def generate_until(self, requests: list[Any]) -> list[str]:
        """One answer per request (see
        :func:`~kineflow.eval.plugins.lmms_requests.answer_requests`)."""
        return answer_requests(self.answerer, requests, self.task_dict)

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("kineflow models answer single-round questions only")

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        raise NotImplementedError("kineflow models are evaluated generatively (generate_until); "
                                  "loglikelihood is not implemented")  # fmt: skip
