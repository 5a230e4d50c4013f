"""FUDOKI's sequence layouts (docs/design.md §1.6), built for a batch of different prompts.

Every row is one prompt rendered with Janus's chat template (:mod:`kineflow.tokenizers.text`),
BOS first; rows are **left-padded** so the generated region sits in the same columns for every
row (position ids count real tokens only, so padding changes nothing). ``·`` is a padding
column (attention off), ``[…]`` the region the sampler generates::

    text-to-image  · · BOS "User: {prompt}\\n\\nAssistant:" <boi> [n image codes] <eoi>
    understanding  · · BOS "{system}\\n\\nUser: " <boi> <img>×P <eoi> "{question}\\n\\n"
                       "Assistant:" [A answer slots]
    text           · · BOS "User: {prompt}\\n\\nAssistant:" [A slots]   (or BOS "{prompt}" [A])

For classifier-free guidance the *prompt span* (after BOS through ``"Assistant:"``) is what the
unconditional input replaces with the pad token. The official understanding layout fills the
text budget: ``A = text_budget + P − len(prompt)`` answer slots per row, so every row has the
same length ``text_budget + P`` (``answer_tokens=None`` here); a fixed ``A`` is much cheaper
when answers are short.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kineflow.inputs.checks import check_texts, too_many_positions
from kineflow.tokenizers.text import TextTokenizer

#: Answer slots of text-only generation when none are asked for (fewer if the budget is short).
DEFAULT_TEXT_TOKENS = 64

__all__ = [
    "DEFAULT_TEXT_TOKENS",
    "Layout",
    "stack_layouts",
    "text_layout",
    "text_to_image_layout",
    "understanding_layout",
]


@dataclass
class Layout:
    """A padded batch ready for :class:`~kineflow.models.fudoki.FudokiModel`.

    Attributes:
        input_ids: Long[B, N]; pad id in padding columns, the placeholder / pad id in the
            region until the sampler fills it.
        attention_mask: Bool[B, N], real tokens (the region included).
        region: Bool[B, N], the positions to generate.
        prompt_span: Bool[B, N], the positions blanked for the unconditional input.
        image_mask: Bool[B, N] of generation-image positions (text-to-image), else None.
        understanding_mask: Bool[B, N] of understanding placeholders, else None.
        window: ``(lo, hi)``: columns holding every row's region (``lo >= 1``).
        prompt_lengths: tokens of each row before its region.
    """

    input_ids: Tensor
    attention_mask: Tensor
    region: Tensor
    prompt_span: Tensor
    image_mask: Tensor | None
    understanding_mask: Tensor | None
    window: tuple[int, int]
    prompt_lengths: list[int]

    def to(self, device: torch.device | str) -> Layout:
        """The same layout with every tensor on ``device``."""
        move = {
            name: getattr(self, name).to(device) if getattr(self, name) is not None else None
            for name in (
                "input_ids",
                "attention_mask",
                "region",
                "prompt_span",
                "image_mask",
                "understanding_mask",
            )
        }
        return Layout(**move, window=self.window, prompt_lengths=list(self.prompt_lengths))


@dataclass
class _Row:
    ids: list[int]
    region: tuple[int, int]  # [start, end) within the row
    span_end: int  # the prompt span is [1, span_end)
    image: tuple[int, int] | None = None  # generation image columns within the row


def _check_texts(tokenizer: TextTokenizer, texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):  # a layout is a batch; the pipelines wrap one text themselves
        raise TypeError(f"{what}s must be a list of strings, got str")
    return check_texts(texts, what, tokenizer.special_tokens.as_tuple())


def _check_budget(
    i: int, what: str, tokens: int, limit: int,
    fix: str = "shorten it, or raise the pipeline's text_budget",
) -> None:  # fmt: skip
    if tokens > limit:
        raise ValueError(
            f"{what} {i} needs {tokens} text tokens with the chat template, more than the "
            f"{limit} its text budget allows: {fix}"
        )


def _check_positions(
    what: str, i: int, tokens: int, limit: int | None, reserved: int, reserved_for: str,
    knob: str = "",
) -> None:  # fmt: skip
    """Refuse a row longer than the model's positions (``limit``; None: no check)."""
    if limit is None:
        return
    error = too_many_positions(what, i, tokens, limit, reserved, reserved_for, knob=knob)
    if error is not None:
        raise error


def _positive(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _chat(tokenizer: TextTokenizer, message: str, system: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], system=system)
    return tokenizer.encode(text, bos=True)


def text_to_image_layout(
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    num_image_tokens: int,
    text_budget: int,
    *,
    max_positions: int | None = None,
) -> Layout:
    """``BOS "User: {prompt}\\n\\nAssistant:" <boi> [n codes] <eoi>`` per prompt (no system
    prompt, as in FUDOKI's text-to-image script); the region holds the image codes.

    Raises:
        ValueError: an empty prompt, one longer than ``text_budget`` tokens (the official
            limit: prompt + <boi> + <eoi> must stay under the budget), or a row longer than
            ``max_positions`` (the model's ``max_position_embeddings``, when given).
    """
    _positive("num_image_tokens", num_image_tokens)
    rows = []
    for i, prompt in enumerate(_check_texts(tokenizer, prompts, "prompt")):
        ids = _chat(tokenizer, prompt, system="")
        _check_budget(i, "prompt", len(ids) + 2, text_budget - 1)
        _check_positions("prompt", i, len(ids) + 2, max_positions, num_image_tokens, "the picture")
        start = len(ids) + 1
        row = ids + [tokenizer.boi_id] + [tokenizer.image_id] * num_image_tokens
        row.append(tokenizer.eoi_id)
        span = (start, start + num_image_tokens)
        rows.append(_Row(row, region=span, span_end=len(ids), image=span))
    return _assemble(rows, tokenizer.pad_id, understanding_id=None)


def understanding_layout(
    tokenizer: TextTokenizer,
    questions: Sequence[str],
    num_image_tokens: int,
    text_budget: int,
    answer_tokens: int | None = None,
    system_prompt: str = "",
    *,
    max_positions: int | None = None,
) -> Layout:
    """``BOS "{system}\\n\\nUser: " <boi> <img>×P <eoi> "{question}\\n\\nAssistant:" [A]`` per
    question: the image comes first in the user turn, as in FUDOKI's understanding script.
    ``answer_tokens=None`` fills the official text budget (see the module docstring).

    Raises:
        ValueError: an empty question, a prompt leaving no room for an answer, or a row
            (prompt, image and answer slots) longer than ``max_positions`` when given.
    """
    _positive("num_image_tokens", num_image_tokens)
    _positive("answer_tokens", answer_tokens)
    rows = []
    for i, question in enumerate(_check_texts(tokenizer, questions, "question")):
        ids = _chat(tokenizer, tokenizer.image_span(1) + question, system=system_prompt)
        at = ids.index(tokenizer.image_id)
        ids[at : at + 1] = [tokenizer.image_id] * num_image_tokens
        text_tokens = len(ids) - num_image_tokens
        _check_budget(i, "question", text_tokens, text_budget - 1)  # >= 1 answer slot
        slots = answer_tokens or text_budget - text_tokens
        knob = "answer_tokens= (--answer-tokens)" if answer_tokens else ""
        _check_positions("question", i, len(ids), max_positions, slots, "the answer", knob)
        rows.append(_Row(ids + [tokenizer.pad_id] * slots, (len(ids), len(ids) + slots), len(ids)))
    return _assemble(rows, tokenizer.pad_id, understanding_id=tokenizer.image_id)


def text_layout(
    tokenizer: TextTokenizer,
    prompts: Sequence[str],
    answer_tokens: int | None,
    text_budget: int,
    chat: bool = True,
    system_prompt: str = "",
    *,
    max_positions: int | None = None,
) -> Layout:
    """Text-only generation: the chat prompt (``chat=True``) or ``BOS prompt`` (a plain
    continuation), then ``answer_tokens`` slots. ``answer_tokens=None`` gives each row what
    its text budget (and ``max_positions``) leaves after its prompt, at most
    :data:`DEFAULT_TEXT_TOKENS`, so a short prompt works with the defaults of any model.

    Raises:
        ValueError: an empty prompt, or prompt + answer slots beyond the text budget or
            ``max_positions`` (the message says which knob to turn).
    """
    _positive("answer_tokens", answer_tokens)
    rows = []
    for i, prompt in enumerate(_check_texts(tokenizer, prompts, "prompt")):
        if chat:
            ids = _chat(tokenizer, prompt, system_prompt)
        else:
            ids = tokenizer.encode(prompt, bos=True)
        limit = text_budget if max_positions is None else min(text_budget, max_positions)
        slots = answer_tokens or min(DEFAULT_TEXT_TOKENS, limit - len(ids))
        if answer_tokens is None and slots < 1:
            raise ValueError(
                f"prompt {i} needs {len(ids)} text tokens with the chat template, leaving no "
                f"room for an answer in the {limit} its text budget allows: shorten it"
            )
        fix = (
            f"ask for fewer answer tokens (max_tokens= / --answer-tokens; {len(ids)} are "
            f"the prompt's) or shorten the prompt"
        )
        _check_budget(i, "prompt", len(ids) + slots, text_budget, fix)
        knob = "max_tokens= (--answer-tokens)" if answer_tokens else ""
        _check_positions("prompt", i, len(ids), max_positions, slots, "the answer", knob)
        region = (len(ids), len(ids) + slots)
        rows.append(_Row(ids + [tokenizer.pad_id] * slots, region, len(ids)))
    return _assemble(rows, tokenizer.pad_id, understanding_id=None)


def _assemble(rows: list[_Row], pad_id: int, understanding_id: int | None) -> Layout:
    """Left-pad the rows to one length and turn their spans into masks."""
    B, N = len(rows), max(len(r.ids) for r in rows)
    input_ids = torch.full((B, N), pad_id, dtype=torch.long)
    masks = {
        name: torch.zeros(B, N, dtype=torch.bool)
        for name in ("attention", "region", "span", "image", "understanding")
    }
    lo, hi = N, 0
    for b, row in enumerate(rows):
        off = N - len(row.ids)
        input_ids[b, off:] = torch.tensor(row.ids)
        masks["attention"][b, off:] = True
        masks["region"][b, off + row.region[0] : off + row.region[1]] = True
        masks["span"][b, off + 1 : off + row.span_end] = True
        if row.image is not None:
            masks["image"][b, off + row.image[0] : off + row.image[1]] = True
        lo, hi = min(lo, off + row.region[0]), max(hi, off + row.region[1])
    if understanding_id is not None:
        region_free = masks["attention"] & ~masks["region"]
        masks["understanding"] = region_free & (input_ids == understanding_id)
    has_image = any(r.image is not None for r in rows)
    return Layout(
        input_ids=input_ids,
        attention_mask=masks["attention"],
        region=masks["region"],
        prompt_span=masks["span"],
        image_mask=masks["image"] if has_image else None,
        understanding_mask=masks["understanding"] if understanding_id is not None else None,
        window=(lo, hi),
        prompt_lengths=[r.region[0] for r in rows],
    )


def stack_layouts(layouts: list[Layout], pad_id: int) -> Layout:
    """One left-padded batch from several layouts (e.g. generation and understanding rows
    mixed for training). Masks a layout lacks are all-False rows."""
    if not layouts:
        raise ValueError("no layouts to stack")
    N = max(lay.input_ids.shape[1] for lay in layouts)

    def pad(t: Tensor | None, like: Tensor, value: int | bool) -> Tensor:
        if t is None:
            t = torch.zeros_like(like, dtype=torch.bool)
        return torch.nn.functional.pad(t, (N - t.shape[1], 0), value=value)

    parts: dict[str, list[Tensor]] = {k: [] for k in ("ids", "att", "reg", "span", "img", "und")}
    lengths: list[int] = []
    lo, hi = N, 0
    for lay in layouts:
        off = N - lay.input_ids.shape[1]
        parts["ids"].append(pad(lay.input_ids, lay.input_ids, pad_id))
        parts["att"].append(pad(lay.attention_mask, lay.input_ids, False))
        parts["reg"].append(pad(lay.region, lay.input_ids, False))
        parts["span"].append(pad(lay.prompt_span, lay.input_ids, False))
        parts["img"].append(pad(lay.image_mask, lay.input_ids, False))
        parts["und"].append(pad(lay.understanding_mask, lay.input_ids, False))
        lengths += lay.prompt_lengths
        lo, hi = min(lo, lay.window[0] + off), max(hi, lay.window[1] + off)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Layout(
        input_ids=cat["ids"],
        attention_mask=cat["att"],
        region=cat["reg"],
        prompt_span=cat["span"],
        image_mask=cat["img"] if cat["img"].any() else None,
        understanding_mask=cat["und"] if cat["und"].any() else None,
        window=(lo, hi),
        prompt_lengths=lengths,
    )
