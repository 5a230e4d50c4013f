"""Janus's text conventions: the six special-token strings, the chat format, image spans.

A trained tokenizer (:func:`kineflow.tokenizers.text.train_text_tokenizer`) gives the special
tokens the ids 0..5 in this fixed order; a real Janus / FUDOKI ``tokenizer.json`` carries the
same strings under other ids::

    0  BOS    <｜begin▁of▁sentence｜>
    1  EOS    <｜end▁of▁sentence｜>
    2  PAD    <｜▁pad▁｜>
    3  BOI    <begin_of_image>
    4  EOI    <end_of_image>
    5  IMAGE  <image_placeholder>

Chat format (Janus "deepseek_old", FUDOKI's SFT format), turns repeated in order::

    [system + "\\n\\n"]
    "User: {msg}\\n\\n"
    "Assistant: {msg}<｜end▁of▁sentence｜>"
    ...
    "Assistant:"            (the generation prompt: no trailing space)

BOS is not part of the chat text; ``TextTokenizer.encode(..., bos=True)`` adds it, as Janus's
processor does. An image enters a prompt as :func:`image_span`: ``<begin_of_image>``, ``n``
placeholders, ``<end_of_image>``. :data:`CHAT_TEMPLATE` is the Jinja twin of
:func:`apply_chat_template` that a saved tokenizer folder carries for ``transformers``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, fields

__all__ = [
    "BOI",
    "BOS",
    "CHAT_TEMPLATE",
    "EOI",
    "EOS",
    "IMAGE",
    "PAD",
    "SPECIAL_TOKENS",
    "SpecialTokens",
    "apply_chat_template",
    "image_span",
]

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
IMAGE = "<image_placeholder>"


@dataclass(frozen=True)
class SpecialTokens:
    """The six special-token strings; field order is the id order of a trained tokenizer."""

    bos: str = BOS
    eos: str = EOS
    pad: str = PAD
    boi: str = BOI
    eoi: str = EOI
    image: str = IMAGE

    def as_tuple(self) -> tuple[str, ...]:
        """The six strings in the documented order."""
        return astuple(self)

    def named(self) -> list[tuple[str, str]]:
        """``[(field name, string), ...]`` in the documented order (for error messages)."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)]


SPECIAL_TOKENS = SpecialTokens()

_ROLE_PREFIX = {"user": "User: ", "assistant": "Assistant: "}
_ROLE_SUFFIX = {"user": "\n\n", "assistant": EOS}
_GENERATION_PROMPT = "Assistant:"

# The Jinja twin of apply_chat_template, stored in tokenizer_config.json for transformers.
# It takes the system prompt from a leading system message or from a ``system=`` keyword, and
# raises (via transformers' ``raise_exception``) in the same cases and order as the Python
# function: roles and contents first, then the conversation's shape.
# Everything is on one logical line, so transformers' trim_blocks/lstrip_blocks are irrelevant.
CHAT_TEMPLATE = (
    "{%- if messages | length == 0 %}"
    "{{ raise_exception('the conversation is empty') }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] | string) }}"
    "{%- elif message['content'] is not string %}"
    "{{ raise_exception('message content must be a string') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- if system is defined and system %}"
    "{{ raise_exception('give the system prompt either as system= or as a leading system "
    "message, not both') }}"
    "{%- endif %}"
    "{%- set system_prompt = messages[0]['content'] %}"
    "{%- set turns = messages[1:] %}"
    "{%- else %}"
    "{%- set system_prompt = system if system is defined else '' %}"
    "{%- set turns = messages %}"
    "{%- endif %}"
    "{%- if system_prompt is not string %}"
    "{{ raise_exception('the system prompt must be a string') }}"
    "{%- endif %}"
    "{%- if turns | length == 0 or turns[0]['role'] != 'user' %}"
    "{{ raise_exception('the conversation must start with a user turn "
    "(after an optional system message)') }}"
    "{%- endif %}"
    "{%- if system_prompt %}{{ system_prompt + '\\n\\n' }}{%- endif %}"
    "{%- for message in turns %}"
    "{%- if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + '" + EOS + "' }}"
    "{%- else %}"
    "{{ raise_exception('a system message is only allowed as the first message') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '" + _GENERATION_PROMPT + "' }}{%- endif %}"
)


def apply_chat_template(
    messages: Sequence[Mapping[str, str]],
    *,
    system: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation in Janus's "deepseek_old" format (see the module docstring).

    Args:
        messages: ``[{"role": "user" | "assistant" | "system", "content": str}, ...]``. A
            system message may only come first; the first other turn must be the user's.
        system: system prompt, an alternative to a leading system message (not both).
        add_generation_prompt: end with ``"Assistant:"`` (no trailing space) so the model
            writes the answer next.

    Returns:
        The prompt text, without BOS.
    """
    if not isinstance(system, str):
        raise TypeError(f"system must be a str, got {type(system).__name__}")
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("the conversation is empty")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}"
            )
        if message["role"] not in ("system", "user", "assistant"):
            raise ValueError(
                f"messages[{i}] has unknown role {message['role']!r}; expected 'system', "
                "'user' or 'assistant'"
            )
        if not isinstance(message["content"], str):
            raise TypeError(
                f"messages[{i}]['content'] must be a str, got {type(message['content']).__name__}"
            )
    turns = list(messages)
    if turns[0]["role"] == "system":
        if system:
            raise ValueError(
                "give the system prompt either as system= or as a leading system message, not both"
            )
        system = turns.pop(0)["content"]
    if not turns or turns[0]["role"] != "user":
        raise ValueError(
            "the conversation must start with a user turn (after an optional system message), "
            f"got {[m['role'] for m in messages]}"
        )
    skipped = len(messages) - len(turns)  # 1 if a leading system message was taken off
    parts = [system + "\n\n"] if system else []
    for i, message in enumerate(turns, start=skipped):
        role = message["role"]
        if role == "system":
            raise ValueError(
                f"a system message is only allowed as the first message, found one at messages[{i}]"
            )
        parts.append(_ROLE_PREFIX[role] + message["content"] + _ROLE_SUFFIX[role])
    if add_generation_prompt:
        parts.append(_GENERATION_PROMPT)
    return "".join(parts)


def image_span(num_tokens: int) -> str:
    """``<begin_of_image>`` + ``num_tokens`` × ``<image_placeholder>`` + ``<end_of_image>``."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
        raise TypeError(f"num_tokens must be an int, got {type(num_tokens).__name__}")
    if num_tokens < 1:
        raise ValueError(f"an image span holds at least one token, got num_tokens={num_tokens}")
    return BOI + IMAGE * num_tokens + EOI
