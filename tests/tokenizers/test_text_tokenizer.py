"""The text tokenizer: byte-level losslessness, special-token ids, the chat template, files.

A small BPE is trained on a synthetic shape-world corpus. Parity tests load the saved folder
with transformers (a test-only reference) and require the same ids, the same decoded text and
the same chat-template rendering. A hand-built "Janus-like" tokenizer.json (specials as added
tokens at other ids) checks that the wrapper is not tied to the trained layout.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kineflow.tokenizers.text import (
    BOI,
    BOS,
    CHAT_TEMPLATE,
    EOI,
    EOS,
    IMAGE,
    PAD,
    SPECIAL_TOKENS,
    SpecialTokens,
    TextTokenizer,
    apply_chat_template,
    image_span,
    train_text_tokenizer,
)

SIZES = ["small", "large", "tiny", "huge"]
COLORS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle"]
PLACES = ["top left", "top right", "bottom left", "bottom right", "centre"]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]


def shape_world() -> list[str]:
    """Deterministic captions, questions and answers about coloured shapes."""
    corpus = [
        f"a {size} {color} {shape} at the {place}."
        for size, color, shape, place in itertools.product(SIZES, COLORS, SHAPES, PLACES)
    ]
    corpus += [f"how many {shape}s are there?" for shape in SHAPES]
    corpus += [f"what color is the {shape}?" for shape in SHAPES]
    corpus += [
        f"is the {color} {shape} above the {s2}?"
        for color in COLORS
        for shape in SHAPES
        for s2 in SHAPES
    ]
    corpus += NUMBERS + COLORS + ["yes", "no"]
    return corpus


CORPUS = shape_world()
UNSEEN = [
    "Ünïcødé — naïve café, 日本語のテキスト, Ελληνικά, עברית",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand a NUL \x00 and \x7f",
    "zzqx   multiple   spaces ... !!!",
    "",
]
MIXED = f"{BOS}User: {BOI}{IMAGE}{IMAGE}{EOI} how many circles?\n\nAssistant: two{EOS}{PAD}{PAD}"

SINGLE = [{"role": "user", "content": "what color is the circle?"}]
MULTI = [
    {"role": "user", "content": f"{image_span(2)}\nhow many squares are there?"},
    {"role": "assistant", "content": "three"},
    {"role": "user", "content": "and circles?"},
]
WITH_SYSTEM = [{"role": "system", "content": "You are a helpful assistant."}, *MULTI]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return train_text_tokenizer(CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok: TextTokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tok.save(tmp_path_factory.mktemp("tok") / "text")


@pytest.fixture(scope="module")
def hf(saved: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(saved))


# ------------------------------------------------------------------------- special tokens


def test_special_strings_are_janus_exact() -> None:
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert PAD == "<\uff5c\u2581pad\u2581\uff5c>"
    assert (BOI, EOI, IMAGE) == ("<begin_of_image>", "<end_of_image>", "<image_placeholder>")
    assert SPECIAL_TOKENS.as_tuple() == (BOS, EOS, PAD, BOI, EOI, IMAGE)
    assert SpecialTokens() == SPECIAL_TOKENS
    with pytest.raises(AttributeError):
        SPECIAL_TOKENS.bos = "x"  # frozen


def test_specials_get_ids_0_to_5_then_the_bytes(tok: TextTokenizer) -> None:
    ids = (tok.bos_id, tok.eos_id, tok.pad_id, tok.boi_id, tok.eoi_id, tok.image_id)
    assert ids == (0, 1, 2, 3, 4, 5) == tok.special_ids
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS.as_tuple()] == [0, 1, 2, 3, 4, 5]
    byte_symbols = {tok.backend.id_to_token(i) for i in range(6, 6 + 256)}
    assert byte_symbols == set(pre_tokenizers.ByteLevel.alphabet())


def test_vocab_size_counts_specials_and_merges(tok: TextTokenizer) -> None:
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)
    assert 6 + 256 < tok.vocab_size <= 400  # merges were learned, the bound is respected
    small = train_text_tokenizer(CORPUS, vocab_size=270)
    assert small.vocab_size == 270


def test_specials_inside_text_are_single_ids(tok: TextTokenizer) -> None:
    ids = tok.encode(MIXED)
    assert ids[0] == tok.bos_id
    boi = ids.index(tok.boi_id)
    assert ids[boi : boi + 4] == [tok.boi_id, tok.image_id, tok.image_id, tok.eoi_id]
    assert ids[-3:] == [tok.eos_id, tok.pad_id, tok.pad_id]
    assert sum(i in tok.special_ids for i in ids) == 8  # nothing else decoded as special
    assert tok.decode(ids, skip_special=False) == MIXED
    plain = MIXED
    for s in SPECIAL_TOKENS.as_tuple():
        plain = plain.replace(s, "")
    assert tok.decode(ids) == plain


# ------------------------------------------------------------------------- encode / decode


def test_lossless_round_trip_on_corpus(tok: TextTokenizer) -> None:
    for text in CORPUS:
        assert tok.decode(tok.encode(text)) == text


def test_lossless_round_trip_on_unseen_unicode(tok: TextTokenizer) -> None:
    for text in UNSEEN:
        ids = tok.encode(text)
        assert not set(ids) & set(tok.special_ids)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # Byte level: unseen characters cost at most one token per UTF-8 byte.
    emoji = "😀👍🏽"
    assert len(tok.encode(emoji)) <= len(emoji.encode("utf-8"))


def test_corpus_words_encode_compactly(tok: TextTokenizer) -> None:
    sentence = "a large red circle at the top left."
    ids = tok.encode(sentence)
    # One token per word (with its leading space) or fewer, against 35 bytes.
    assert len(ids) <= len(sentence.split()) + 1
    for word in [" circle", " triangle", " square", " yellow", "how", " many"]:
        assert len(tok.encode(word)) == 1, word
    unseen = "qzxv jwpk"
    assert len(tok.encode(unseen)) > len(tok.encode(" triangle")) * 4


def test_bos_flag_and_batch(tok: TextTokenizer) -> None:
    texts = [*CORPUS[:5], *UNSEEN, MIXED]
    assert tok.encode(texts[0], bos=True) == [tok.bos_id, *tok.encode(texts[0])]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]


def test_decode_accepts_tensors(tok: TextTokenizer) -> None:
    text = "two red squares 😀"
    ids = tok.encode(text, bos=True)
    for dtype in (torch.long, torch.int32):
        assert tok.decode(torch.tensor(ids, dtype=dtype)) == text
    assert tok.decode(torch.tensor(ids), skip_special=False) == BOS + text
    assert tok.decode([]) == ""


def test_decode_rejects_bad_ids(tok: TextTokenizer) -> None:
    V = tok.vocab_size
    for bad in (V, V + 7, -1):
        with pytest.raises(ValueError, match=rf"token id {bad} .*vocabulary of {V} ids"):
            tok.decode([7, bad])
    with pytest.raises(ValueError, match=rf"token id {V} "):
        tok.decode(torch.tensor([V]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        tok.decode(torch.zeros(3))
    with pytest.raises(TypeError, match="ints"):
        tok.decode([1, 2.0])
    with pytest.raises(TypeError, match="ints"):
        tok.decode([True])
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        tok.encode_batch(["ok", 3])


def test_token_to_id_unknown_names_token(tok: TextTokenizer) -> None:
    assert tok.token_to_id("Ġcircle") == tok.encode(" circle")[0]
    with pytest.raises(KeyError, match="<no_such_token>"):
        tok.token_to_id("<no_such_token>")


# ------------------------------------------------------------------------- chat template


def test_chat_template_exact_text() -> None:
    assert apply_chat_template(SINGLE) == "User: what color is the circle?\n\nAssistant:"
    assert (
        apply_chat_template(SINGLE, add_generation_prompt=False)
        == "User: what color is the circle?\n\n"
    )
    span = BOI + IMAGE * 2 + EOI
    multi = (
        f"User: {span}\nhow many squares are there?\n\n"
        f"Assistant: three{EOS}"
        "User: and circles?\n\n"
        "Assistant:"
    )
    assert apply_chat_template(MULTI) == multi
    system = "You are a helpful assistant.\n\n"
    assert apply_chat_template(WITH_SYSTEM) == system + multi
    assert apply_chat_template(MULTI, system="You are a helpful assistant.") == system + multi
    # An empty system prompt adds nothing; a trailing assistant turn ends with EOS.
    done = [*SINGLE, {"role": "assistant", "content": "red"}]
    expected = f"User: what color is the circle?\n\nAssistant: red{EOS}"
    assert (
        apply_chat_template([{"role": "system", "content": ""}, *done], add_generation_prompt=False)
        == expected
    )


@pytest.mark.parametrize(
    ("messages", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "empty"),
        ([{"role": "robot", "content": "hi"}], {}, ValueError, "unknown role 'robot'"),
        ([{"role": "assistant", "content": "hi"}], {}, ValueError, "start with a user turn"),
        ([{"role": "system", "content": "s"}], {}, ValueError, "start with a user turn"),
        (
            [*SINGLE, {"role": "system", "content": "s"}],
            {},
            ValueError,
            r"system message is only allowed as the first message, found one at messages\[1\]",
        ),
        (WITH_SYSTEM, {"system": "another"}, ValueError, "not both"),
        ([{"role": "user"}], {}, ValueError, "'role' and 'content'"),
        ([{"role": "user", "content": 3}], {}, TypeError, "content'] must be a str"),
        (SINGLE, {"system": 1}, TypeError, "system must be a str"),
        ("User: hi", {}, TypeError, "list of dicts"),
    ],
)
def test_chat_template_errors(messages, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        apply_chat_template(messages, **kwargs)


def test_image_span() -> None:
    assert (
        image_span(3) == "<begin_of_image><image_placeholder><image_placeholder>"
        "<image_placeholder><end_of_image>"
    )
    assert image_span(576).count(IMAGE) == 576
    for bad, error in [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(error, match="num_tokens"):
            image_span(bad)


def test_image_span_encodes_to_placeholder_ids(tok: TextTokenizer) -> None:
    ids = tok.encode(tok.image_span(576))
    assert ids == [tok.boi_id, *[tok.image_id] * 576, tok.eoi_id]


# ------------------------------------------------------------------------- files


def test_save_writes_hugging_face_layout(tok: TextTokenizer, saved: Path) -> None:
    assert {p.name for p in saved.iterdir()} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((saved / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (BOS, EOS, PAD)
    assert config["unk_token"] is None
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["model_max_length"] == tok.model_max_length
    assert config["chat_template"] == CHAT_TEMPLATE
    special_map = json.loads((saved / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special_map["additional_special_tokens"] == [BOI, EOI, IMAGE]


def test_save_load_round_trip(tok: TextTokenizer, saved: Path, tmp_path: Path) -> None:
    texts = [*CORPUS[::7], *UNSEEN, MIXED]
    for source in (saved, saved / "tokenizer.json", str(saved)):
        loaded = TextTokenizer.load(source)
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.special_ids == tok.special_ids
        assert loaded.encode_batch(texts, bos=True) == tok.encode_batch(texts, bos=True)
        assert [loaded.decode(tok.encode(t)) for t in texts] == [
            tok.decode(tok.encode(t)) for t in texts
        ]
    custom = TextTokenizer(tok.backend, model_max_length=1234).save(tmp_path / "custom")
    assert TextTokenizer.load(custom).model_max_length == 1234
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextTokenizer.load(tmp_path / "nowhere")


# ------------------------------------------------------------------------- transformers parity


def test_transformers_encodes_and_decodes_identically(tok: TextTokenizer, saved: Path, hf) -> None:
    assert hf.is_fast
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert hf.convert_tokens_to_ids([BOI, EOI, IMAGE]) == [3, 4, 5]
    assert len(hf) == tok.vocab_size
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(saved))
    assert fast.encode(MIXED, add_special_tokens=False) == tok.encode(MIXED)
    for text in [*CORPUS[::5], *UNSEEN, MIXED]:
        ours = tok.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ours
        assert hf(text)["input_ids"] == tok.encode(text, bos=True)  # BOS by default, like Janus
        assert hf.decode(ours, skip_special_tokens=True) == tok.decode(ours)
        assert hf.decode(ours, skip_special_tokens=False) == tok.decode(ours, skip_special=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [SINGLE, MULTI, WITH_SYSTEM], ids=["single", "multi", "sys"])
def test_transformers_chat_template_parity(hf, messages, add_generation_prompt) -> None:
    theirs = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert theirs == apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def test_transformers_chat_template_system_keyword_and_errors(hf) -> None:
    # transformers defaults to add_generation_prompt=False, we default to True.
    theirs = hf.apply_chat_template(
        MULTI, tokenize=False, add_generation_prompt=True, system="Be brief."
    )
    assert theirs == apply_chat_template(MULTI, system="Be brief.")
    assert theirs.startswith("Be brief.\n\nUser: ")
    from jinja2.exceptions import TemplateError

    for bad, match in [
        ([{"role": "robot", "content": "hi"}], "unknown role robot"),
        ([{"role": "assistant", "content": "hi"}], "start with a user turn"),
        ([{"role": "system", "content": "s"}], "start with a user turn"),
        ([*SINGLE, {"role": "system", "content": "s"}], "only allowed as the first"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "robot", "content": 3}, {"role": "assistant", "content": "x"}], "robot"),
    ]:
        with pytest.raises(TemplateError, match=match):
            hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TemplateError, match="not both"):
        hf.apply_chat_template(WITH_SYSTEM, tokenize=False, system="another")


# ------------------------------------------------------------------------- other tokenizers


def plain_bpe(corpus: list[str], vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE trained without any special token (ids 0..255 are the bytes)."""
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    t.train_from_iterator(corpus, trainer)
    return t


def test_janus_like_tokenizer_json_loads(tmp_path: Path) -> None:
    # Like Janus: the model vocabulary first, then the specials as added tokens, some special
    # and some plain (the image tokens), in an order unlike ours.
    backend = plain_bpe(CORPUS)
    V = backend.get_vocab_size()
    backend.add_special_tokens([AddedToken(EOS, special=True), AddedToken(BOS, special=True)])
    backend.add_tokens([PAD, IMAGE, BOI, EOI])
    folder = tmp_path / "janus"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))  # no tokenizer_config.json, as allowed

    for source in (folder, folder / "tokenizer.json"):
        tok = TextTokenizer.load(source)
        assert (tok.eos_id, tok.bos_id) == (V, V + 1)
        assert (tok.pad_id, tok.image_id, tok.boi_id, tok.eoi_id) == (V + 2, V + 3, V + 4, V + 5)
        assert tok.vocab_size == V + 6
        ids = tok.encode(MIXED)
        assert ids[0] == tok.bos_id and ids[-3:] == [tok.eos_id, tok.pad_id, tok.pad_id]
        assert ids.count(tok.image_id) == 2
        assert tok.decode(ids, skip_special=False) == MIXED
        assert all(s not in tok.decode(ids) for s in SPECIAL_TOKENS.as_tuple())
        assert tok.encode("two", bos=True) == [V + 1, *backend.encode("two").ids]


def test_specials_only_in_model_vocab_are_kept_whole() -> None:
    # A BPE whose vocabulary lists the specials but never registered them as added tokens:
    # the pre-tokenizer alone would split "<begin_of_image>" into pieces.
    vocab = {sym: i for i, sym in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab.update({s: 256 + k for k, s in enumerate(SPECIAL_TOKENS.as_tuple())})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    assert len(backend.encode(f"x{BOI}y").ids) > 3

    tok = TextTokenizer(backend)
    assert tok.encode(f"x{BOI}y") == [vocab["x"], 256 + 3, vocab["y"]]
    assert tok.special_ids == tuple(range(256, 262))
    assert len(backend.encode(f"x{BOI}y").ids) > 3  # the caller's tokenizer is untouched


def test_missing_specials_are_named(tmp_path: Path) -> None:
    backend = plain_bpe(CORPUS[:20], vocab_size=270)
    backend.add_special_tokens([BOS, EOS, BOI, EOI])  # no PAD, no IMAGE
    file = tmp_path / "tokenizer.json"
    backend.save(str(file))
    with pytest.raises(ValueError, match="lacks required special token") as info:
        TextTokenizer.load(file)
    message = str(info.value)
    assert PAD in message and IMAGE in message
    assert BOS not in message and BOI not in message


# ------------------------------------------------------------------------- training errors


@pytest.mark.parametrize(
    ("corpus", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "corpus is empty"),
        (iter(()), {}, ValueError, "corpus is empty"),
        (["fine", 3, "x"], {}, TypeError, "corpus item 1 must be a str, got int"),
        ("a single string", {}, TypeError, "not a single str"),
        (CORPUS, {"vocab_size": 261}, ValueError, r"vocab_size must be an int >= 262"),
        (CORPUS, {"vocab_size": 512.0}, ValueError, "vocab_size"),
        (CORPUS, {"min_frequency": 0}, ValueError, "min_frequency must be an int >= 1"),
    ],
)
def test_training_errors(corpus, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        train_text_tokenizer(corpus, **kwargs)


def test_training_streams_a_generator() -> None:
    tok = train_text_tokenizer((s for s in CORPUS), vocab_size=300)
    assert tok.decode(tok.encode(CORPUS[0])) == CORPUS[0]
    assert tok.special_ids == (0, 1, 2, 3, 4, 5)
