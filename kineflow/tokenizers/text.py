"""The text tokenizer: byte-level BPE with Janus's special tokens and chat template.

The same :class:`TextTokenizer` drives a small tokenizer trained here
(:func:`train_text_tokenizer`) and a real Janus / FUDOKI ``tokenizer.json``, because both carry
the six special tokens under Janus's exact strings (:mod:`kineflow.tokenizers.chat`); only
their ids differ. A trained tokenizer gives them the ids 0..5, then the 256 byte symbols (so
any text, emoji included, encodes losslessly), then the merges. The chat format and image
spans are those of :mod:`kineflow.tokenizers.chat`.

:meth:`TextTokenizer.save` writes a folder that ``transformers.AutoTokenizer`` loads as a fast
tokenizer with the same ids and a Jinja ``chat_template`` that renders the same text as
:func:`apply_chat_template`. kineflow itself never imports transformers.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from kineflow.io import atomic_write, atomic_write_json, read_json_object
from kineflow.tokenizers.chat import (
    BOI,
    BOS,
    CHAT_TEMPLATE,
    EOI,
    EOS,
    IMAGE,
    PAD,
    SPECIAL_TOKENS,
    SpecialTokens,
    apply_chat_template,
    image_span,
)

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
    "TextTokenizer",
    "apply_chat_template",
    "image_span",
    "train_text_tokenizer",
]

NUM_BYTES = 256  # the byte-level initial alphabet: every byte is a token, so nothing is unknown
DEFAULT_MODEL_MAX_LENGTH = 16384  # only recorded in tokenizer_config.json; nothing truncates


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` plus the ids of the six special tokens.

    Args:
        tokenizer: the backend; not modified (a copy is taken if specials need registering).
        model_max_length: the context length recorded in ``tokenizer_config.json``.

    Raises:
        ValueError: if any special token of :data:`SPECIAL_TOKENS` is missing (all are named),
            or two of them share an id.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH
    ) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        specials = SPECIAL_TOKENS
        missing = [
            f"{name} {tok!r}"
            for name, tok in specials.named()
            if tokenizer.token_to_id(tok) is None
        ]
        if missing:
            raise ValueError(f"the tokenizer lacks required special token(s): {', '.join(missing)}")
        # A special that is only a BPE vocabulary entry would be split by the pre-tokenizer when
        # it appears in text; registering it as an added token (same id) keeps it whole.
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        unregistered = [tok for tok in specials.as_tuple() if tok not in added]
        if unregistered:
            tokenizer = Tokenizer.from_str(tokenizer.to_str())
            tokenizer.add_special_tokens(
                [AddedToken(tok, special=True, normalized=False) for tok in unregistered]
            )
        ids = [tokenizer.token_to_id(tok) for tok in specials.as_tuple()]
        if len(set(ids)) != len(ids):
            shared = dict(zip(specials.as_tuple(), ids, strict=True))
            raise ValueError(f"special tokens share ids: {shared}")

        self._tok = tokenizer
        self.special_tokens = specials
        self.model_max_length = int(model_max_length)
        self._special_ids: tuple[int, ...] = tuple(ids)
        self._special_id_set = frozenset(ids)
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Embedding tables are indexed by id, so the size is max id + 1 even if ids have gaps.
        self._vocab_size = max(vocab.values()) + 1
        self._unassigned = frozenset(range(self._vocab_size)) - frozenset(vocab.values())

    # ----------------------------------------------------------------------------- ids

    @property
    def backend(self) -> Tokenizer:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (max id + 1)."""
        return self._vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of (bos, eos, pad, boi, eoi, image)."""
        return self._special_ids

    @property
    def bos_id(self) -> int:
        return self._special_ids[0]

    @property
    def eos_id(self) -> int:
        return self._special_ids[1]

    @property
    def pad_id(self) -> int:
        return self._special_ids[2]

    @property
    def boi_id(self) -> int:
        return self._special_ids[3]

    @property
    def eoi_id(self) -> int:
        return self._special_ids[4]

    @property
    def image_id(self) -> int:
        return self._special_ids[5]

    def token_to_id(self, token: str) -> int:
        """The id of ``token`` (a vocabulary entry or added token); KeyError if unknown."""
        idx = self._tok.token_to_id(token)
        if idx is None:
            raise KeyError(
                f"unknown token {token!r}: not in this vocabulary of {self._vocab_size} ids"
            )
        return idx

    # ----------------------------------------------------------------------------- text

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings inside it become their single ids.

        ``bos=True`` prepends BOS. No other token is added, whatever the backend's
        post-processor says, so a real Janus tokenizer behaves the same.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_batch(self, texts: Sequence[str], *, bos: bool = False) -> list[list[int]]:
        """:meth:`encode` for each text (the backend encodes them in parallel)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a list of str, got {type(texts).__name__}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        batch = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [[self.bos_id, *e.ids] if bos else e.ids for e in batch]

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special: bool = True) -> str:
        """Text of ``ids`` (a list of ints or a 1-D integer tensor).

        ``skip_special`` drops the six special tokens (and any the backend marks special).
        """
        ids = self._as_id_list(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._special_id_set]
        return self._tok.decode(ids, skip_special_tokens=skip_special)

    def _as_id_list(self, ids: Sequence[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"ids must be an integer tensor, got dtype {ids.dtype}")
            if ids.ndim != 1:
                raise ValueError(f"ids must be a 1-D tensor, got shape {tuple(ids.shape)}")
            out = ids.tolist()
        elif isinstance(ids, Sequence) and not isinstance(ids, (str, bytes)):
            out = []
            for i in ids:
                if isinstance(i, bool):
                    raise TypeError(f"token ids must be ints, got {i!r}")
                try:
                    out.append(operator.index(i))
                except TypeError:
                    raise TypeError(f"token ids must be ints, got {i!r}") from None
        else:
            raise TypeError(f"ids must be a list of ints or a 1-D tensor, got {type(ids).__name__}")
        for i in out:
            if not 0 <= i < self._vocab_size or i in self._unassigned:
                raise ValueError(
                    f"token id {i} is outside the vocabulary of {self._vocab_size} ids"
                )
        return out

    # ----------------------------------------------------------------------------- chat

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        system: str = "",
        add_generation_prompt: bool = True,
    ) -> str:
        """Module-level :func:`apply_chat_template`."""
        return apply_chat_template(
            messages, system=system, add_generation_prompt=add_generation_prompt
        )

    def image_span(self, num_tokens: int) -> str:
        """Module-level :func:`image_span`."""
        return image_span(num_tokens)

    # ----------------------------------------------------------------------------- files

    def save(self, folder: str | Path) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
        into ``folder`` (created if needed) in the Hugging Face layout, each atomically;
        returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "tokenizer.json", lambda temp: self._tok.save(str(temp)))
        sp = self.special_tokens
        special_map = {
            "bos_token": sp.bos,
            "eos_token": sp.eos,
            "pad_token": sp.pad,
            "additional_special_tokens": [sp.boi, sp.eoi, sp.image],
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            # Byte-level BPE covers every byte, so there is no unknown token.
            "unk_token": None,
            # Janus's convention: BOS starts every sequence, EOS only ends assistant turns.
            # tokenizer.json's post-processor does the adding; these flags document it.
            "add_bos_token": True,
            "add_eos_token": False,
            # Cleaning up spaces before punctuation would break the lossless round trip.
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        # Non-ASCII is written as is: the full-width special strings stay readable.
        atomic_write_json(folder / "tokenizer_config.json", config)
        atomic_write_json(folder / "special_tokens_map.json", special_map)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load from a folder holding ``tokenizer.json`` (``tokenizer_config.json`` optional) or
        from a ``tokenizer.json`` file. A file ``tokenizers`` cannot read (not JSON, nested too
        deeply, an unknown model type, ...) or without kineflow's special tokens raises a
        ValueError naming it."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer file at {file}")
        model_max_length = DEFAULT_MODEL_MAX_LENGTH
        config_file = path / "tokenizer_config.json"
        if path.is_dir() and config_file.is_file():
            config = read_json_object(config_file)
            if isinstance(config.get("model_max_length"), (int, float)):
                model_max_length = int(config["model_max_length"])
        try:
            backend = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust library raises plain Exception for every bad file
            reason = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            raise ValueError(f"{file} is not a readable tokenizer file: {reason}") from None
        try:
            return cls(backend, model_max_length=model_max_length)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None

    def __repr__(self) -> str:
        return (
            f"TextTokenizer(vocab_size={self._vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id}, boi={self.boi_id}, eoi={self.eoi_id}, image={self.image_id})"
        )


def train_text_tokenizer(
    corpus: Iterable[str], *, vocab_size: int = 512, min_frequency: int = 1
) -> TextTokenizer:
    """Train a byte-level BPE tokenizer on ``corpus``.

    Ids: the six specials 0..5 (order of :class:`SpecialTokens`), the 256 byte symbols, then
    merges until ``vocab_size`` (an upper bound: a small corpus may yield fewer merges).
    The corpus is streamed, not held in memory.

    Raises:
        TypeError: ``corpus`` is a single str, or yields a non-str item.
        ValueError: ``corpus`` is empty, or ``vocab_size < 256 + 6``, or ``min_frequency < 1``.
    """
    floor = NUM_BYTES + len(SPECIAL_TOKENS.as_tuple())
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < floor:
        raise ValueError(
            f"vocab_size must be an int >= {floor} (256 bytes + 6 special tokens), "
            f"got {vocab_size!r}"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    if isinstance(corpus, str):
        raise TypeError("corpus must be an iterable of strings, not a single str")

    count = 0

    def checked() -> Iterator[str]:
        nonlocal count
        for item in corpus:
            if not isinstance(item, str):
                raise TypeError(
                    f"corpus item {count} must be a str, got {type(item).__name__}: {item!r}"
                )
            count += 1
            yield item

    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normaliser: decode(encode(text)) == text byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.as_tuple()),  # listed first, so ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(checked(), trainer)
    if count == 0:
        raise ValueError("corpus is empty: nothing to train on")
    # For transformers users: encode(text) with add_special_tokens=True gives BOS + text.
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    return TextTokenizer(tokenizer)
