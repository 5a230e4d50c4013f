"""Best-of-N text-to-image with the model judging itself (:mod:`kineflow.pipelines.judge`) on
the shipped tiny checkpoints: the kept candidate is the one its scores say, ``best_of=1`` is the
plain call, bad options are refused by name, the real scores are deterministic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kineflow
from kineflow.pipelines.judge import QUESTION, self_scores

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
PROMPTS = ["a red circle", "a blue square above a green triangle"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["fudoki-shapes", "unifluid-shapes"])
def pipe(request):
    return kineflow.load(CHECKPOINTS / request.param)


def _fast(pipe) -> dict:
    """Cheap sampling options: 2 solver steps for FUDOKI (UniFluid has no steps)."""
    return {"steps": 2} if pipe.uses_option("text_to_image", "steps") else {}


def _same(a, b) -> bool:
    """Two lists of pictures, pixel for pixel."""
    if len(a) != len(b):
        return False
    return all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(a, b, strict=True))


def test_best_of_one_is_the_plain_call(pipe) -> None:
    plain = pipe.text_to_image(PROMPTS, seed=7, **_fast(pipe))
    one = pipe.text_to_image(PROMPTS, seed=7, best_of=1, judge="self", **_fast(pipe))
    assert _same(plain.images, one.images)
    assert torch.equal(plain.codes, one.codes)
    assert one.scores is None and one.chosen is None and one.candidate_scores is None


def test_the_judge_keeps_the_candidate_its_scores_say(pipe, monkeypatch) -> None:
    """A stub first-answer scorer with known yes − no logits: candidate 2 of prompt 0 and
    candidate 1 of prompt 1 score highest; the kept pictures are those candidates of one
    batched call of the 6 repeated prompts with the same seed."""
    N, V = 3, pipe.model.config.language.vocab_size
    (yes,), (no,) = pipe.tokenizer.encode("yes", bos=False), pipe.tokenizer.encode("no", bos=False)
    known = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, 1.0])  # rows b·N + j
    asked: list[str] = []

    def stub(images, questions):
        asked.extend(questions)
        logits = torch.zeros(len(images), V)
        logits[:, yes] = known[: len(images)]
        logits[:, no] = -1.0
        return logits

    monkeypatch.setattr(pipe, "first_answer_logits", stub)
    result = pipe.text_to_image(PROMPTS, seed=5, best_of=N, **_fast(pipe))
    assert result.chosen == [2, 1]
    assert result.scores == pytest.approx([3.0, 4.0])  # yes − no = known + 1
    assert torch.allclose(result.candidate_scores, (known + 1).view(2, N))
    assert asked == [QUESTION.format(prompt=p) for p in PROMPTS for _ in range(N)]
    assert result.timings["candidates"] == N and result.timings["judge_s"] >= 0
    candidates = pipe.text_to_image([p for p in PROMPTS for _ in range(N)], seed=5, **_fast(pipe))
    kept = [candidates.images[2], candidates.images[N + 1]]
    assert _same(result.images, kept)
    assert torch.equal(result.codes, candidates.codes[[2, N + 1]])
    assert len(result.images) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"best_of": 0}, "best_of must be >= 1, got 0"),
        ({"best_of": 2.5}, "best_of must be an integer, got 2.5"),
        ({"best_of": True}, "best_of must be an integer, got True"),
        ({"best_of": None}, "best_of must be an integer >= 1, got None"),
        ({"best_of": 2, "judge": "detector"}, "judge must be one of 'self'.*got 'detector'"),
        ({"judge": "oracle"}, "judge must be one of 'self'.*got 'oracle'"),
    ],
)
def test_bad_best_of_or_judge_is_refused_by_name(pipe, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        pipe.text_to_image(PROMPTS, seed=0, **options)


def test_self_scores_are_deterministic_and_batch_independent(pipe) -> None:
    pictures = pipe.text_to_image(PROMPTS, seed=1, **_fast(pipe)).images
    both = self_scores(pipe, pictures, PROMPTS)
    assert both.shape == (2,) and torch.isfinite(both).all()
    alone = self_scores(pipe, pictures[1:], PROMPTS[1:])
    assert torch.allclose(both[1:], alone, atol=1e-4)
    assert torch.allclose(self_scores(pipe, pictures, PROMPTS, batch_size=1), both, atol=1e-4)


def test_best_of_keeps_the_trajectory_of_the_kept_candidate(pipe) -> None:
    if not pipe.uses_option("text_to_image", "return_trajectory"):
        pytest.skip("no trajectories")
    result = pipe.text_to_image(PROMPTS, seed=3, best_of=2, return_trajectory=True, **_fast(pipe))
    assert len(result.trajectory) == 2
    assert _same([frames[-1] for frames in result.trajectory], result.images)
    if result.states is not None:  # FUDOKI: the kept rows of the states
        assert torch.equal(result.states[-1].reshape(result.codes.shape).cpu(), result.codes)


def test_both_families_declare_best_of_and_judge() -> None:
    for cls in kineflow.pipelines.base.registered():
        assert cls.uses_option("text_to_image", "best_of")
        assert cls.uses_option("text_to_image", "judge")
