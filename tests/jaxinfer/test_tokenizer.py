"""Tests for jaxinfer.tokenizer: loading rules, BOS/EOS handling and streaming detokenization.

The Llama-3 and Qwen2 style tokenizers are trained here on a few sentences, so nothing is
downloaded. The sentencepiece checks use the small TinyStories checkpoints in shared/models and
skip when that folder is absent.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    IncrementalDetokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

MODELS_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "models"
STORIES = "stories260K-hf"
BABYLLAMA = "babyllama-tok105-940K-hf"

MULTIBYTE = "héllo 世界 🙂"
CORPUS = [
    "Once upon a time there was a little girl named Lily.",
    "She liked to play outside in the sun with her dog.",
    "héllo 世界 🙂 naïve café, über straße; 東京 and ünïcödé.",
    "The quick brown fox jumps over the lazy dog 0123456789!",
    "  spaces\tand\nnewlines  ",
]
# Texts both sentencepiece and tokenizer.json encode alike: no runs of spaces, no edge spaces.
PLAIN_TEXTS = [
    "Once upon a time",
    "Once upon a time, there was a little girl named Lily.",
    "She said: \"Hello!\" and ran away.",
    "héllo 世界 🙂",
    "line one\nline two",
    "x",
]
# Whitespace sentencepiece normalizes and tokenizer.json keeps.
SPACY_TEXTS = ["  two  spaces ", " leading", "trailing ", "a\t\tb"]


def _model_dir(name: str) -> Path:
    path = MODELS_DIR / name
    if not path.is_dir():
        pytest.skip(f"{path} not present")
    return path


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


def _train_byte_level_bpe(specials: list[str], *, bos: str | None) -> object:
    """A small byte-level BPE like Llama 3's / Qwen2's; `bos` set adds a BOS post-processor."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(CORPUS * 3, trainer=trainer)
    if bos is None:
        raw.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos_id = raw.token_to_id(bos)
        raw.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
            ),
        ])
    return raw


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-3 style: BOS added by the post-processor, several EOS ids in generation_config."""
    folder = tmp_path_factory.mktemp("llama3")
    raw = _train_byte_level_bpe(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], bos="<|begin_of_text|>"
    )
    raw.save(str(folder / "tokenizer.json"))
    _write_json(folder / "config.json", {"bos_token_id": 0, "eos_token_id": 1})
    _write_json(folder / "generation_config.json", {"bos_token_id": 0, "eos_token_id": [1, 2]})
    _write_json(
        folder / "tokenizer_config.json",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
    )
    return folder


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 style: no BOS at all, EOS ids from generation_config."""
    folder = tmp_path_factory.mktemp("qwen2")
    raw = _train_byte_level_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None)
    raw.save(str(folder / "tokenizer.json"))
    _write_json(folder / "config.json", {"bos_token_id": None, "eos_token_id": 0})
    _write_json(folder / "generation_config.json", {"eos_token_id": [2, 0]})
    _write_json(folder / "tokenizer_config.json", {"bos_token": None, "eos_token": "<|im_end|>"})
    return folder


def _copy_tokenizer(src: Path, dst: Path, **configs: object) -> Path:
    """A folder with src's tokenizer files and the given config files (name -> JSON)."""
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer.model"):
        if (src / name).is_file():
            (dst / name).write_bytes((src / name).read_bytes())
    for name, data in configs.items():
        _write_json(dst / f"{name}.json", data)
    return dst


# -- ByteTokenizer ---------------------------------------------------------------------------


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    ids = tok.encode(MULTIBYTE)
    assert ids == [256, *MULTIBYTE.encode("utf-8")]
    assert tok.encode(MULTIBYTE, add_bos=False) == list(MULTIBYTE.encode("utf-8"))
    assert tok.decode(ids) == MULTIBYTE
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids, tok.add_bos) == (258, 256, (257,), True)


def test_byte_tokenizer_big_vocab_ids_decode_to_nothing() -> None:
    tok = ByteTokenizer(vocab_size=32000)
    assert tok.vocab_size == 32000
    assert tok.decode([256, ord("h"), 300, 31999, ord("i"), 257, 40000, -1]) == "hi"
    with pytest.raises(ConfigError):
        ByteTokenizer(vocab_size=257)


def test_byte_tokenizer_streams_emoji_split_over_tokens() -> None:
    tok = ByteTokenizer()
    emoji = list("🙂".encode("utf-8"))
    assert len(emoji) == 4
    det = IncrementalDetokenizer(tok, tok.encode("hi "))
    assert det.add([ord("a")]) == "a"
    assert [det.add([b]) for b in emoji] == ["", "", "", "🙂"]
    assert det.add([ord("!")]) == "!"
    assert det.flush() == ""
    # A character cut off by the end of the stream comes out once, at flush, as U+FFFD.
    det = IncrementalDetokenizer(tok)
    assert det.add(emoji[:2]) == ""
    assert det.flush() == "\ufffd"


# -- tokenizer.json models built in the test -------------------------------------------------


def test_llama3_style_bos_and_eos(llama3_dir: Path) -> None:
    tok = load_tokenizer(llama3_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == 0
    assert tok.add_bos  # from the post-processor: tokenizer_config has no add_bos_token
    assert tok.eos_ids == (1, 2)  # generation_config's list wins over config.json's int
    ids = tok.encode("hello world")
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.encode("hello world", add_bos=False) == ids[1:]
    assert 1 not in ids and 2 not in ids  # never EOS
    # A template that spells out BOS does not get a second one.
    spelled = tok.encode("<|begin_of_text|>hello world")
    assert spelled == ids


def test_llama3_style_decode_skips_specials_and_round_trips(llama3_dir: Path) -> None:
    tok = load_tokenizer(llama3_dir)
    for text in [MULTIBYTE, *CORPUS, "unseen words: ζ Ω ∑ ☃"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode([*ids, 2, 1, 1]) == text
    assert tok.decode([tok.vocab_size + 5]) == ""


def test_qwen2_style_has_no_bos(qwen2_dir: Path) -> None:
    tok = load_tokenizer(qwen2_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id is None
    assert not tok.add_bos
    assert tok.eos_ids == (2, 0)
    ids = tok.encode(MULTIBYTE)
    assert tok.encode(MULTIBYTE, add_bos=True) == ids  # nothing to add
    assert tok.decode(ids) == MULTIBYTE
    assert tok.decode([1, *ids, 2]) == MULTIBYTE  # <|im_start|> / <|im_end|> are skipped


def test_special_ids_fall_back_to_tokenizer_config(llama3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(
        llama3_dir,
        tmp_path / "m",
        tokenizer_config={
            "bos_token": {"content": "<|begin_of_text|>", "__type": "AddedToken"},
            "eos_token": "<|eot_id|>",
        },
    )
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, (2,), True)


def test_config_json_alone_and_add_bos_flag(llama3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(
        llama3_dir,
        tmp_path / "m",
        config={"bos_token_id": 0, "eos_token_id": [1]},
        tokenizer_config={"add_bos_token": False},
    )
    tok = load_tokenizer(folder)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (0, (1,), False)
    assert tok.encode("hello")[0] != 0
    assert tok.encode("hello", add_bos=True)[0] == 0


def test_bad_config_is_a_checkpoint_error(llama3_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(llama3_dir, tmp_path / "m", config={"eos_token_id": "oops"})
    with pytest.raises(CheckpointError, match="eos_token_id"):
        load_tokenizer(folder)


def test_missing_or_unreadable_tokenizer(llama3_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(empty)
    with pytest.raises(CheckpointError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path / "does-not-exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError):
        load_tokenizer(bad)
    # An unreadable tokenizer.model (e.g. Llama 3's tiktoken file) falls back to tokenizer.json.
    (bad / "tokenizer.json").write_bytes((llama3_dir / "tokenizer.json").read_bytes())
    assert isinstance(load_tokenizer(bad), HFTokenizer)


# -- the sentencepiece checkpoints in shared/models ------------------------------------------


@pytest.mark.parametrize("name", [STORIES, BABYLLAMA])
def test_real_models_prefer_sentencepiece(name: str) -> None:
    import sentencepiece

    folder = _model_dir(name)
    tok = load_tokenizer(folder)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert tok.vocab_size == sp.vocab_size()
    for text in [*PLAIN_TEXTS, *SPACY_TEXTS, *CORPUS]:
        assert tok.encode(text) == [1, *sp.encode(text)]
        assert tok.encode(text, add_bos=False) == sp.encode(text)
        # sentencepiece writes <unk> as its unk_surface; decode skips it like tokenizer.json.
        known = [i for i in sp.encode(text) if not sp.is_unknown(i)]
        assert tok.decode(tok.encode(text)) == sp.decode(known)


def test_stories_known_ids() -> None:
    tok = load_tokenizer(_model_dir(STORIES))
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.decode([1, 403, 407, 261, 378, 2]) == "Once upon a time"
    assert tok.decode([403, 0, 407]) == "Once upon"  # <unk> is skipped, like tokenizer.json does
    assert tok.decode([403, 5000]) == "Once"  # ids past the tokenizer vocab decode to nothing


@pytest.mark.parametrize("name", [STORIES, BABYLLAMA])
def test_real_models_match_transformers(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    folder = _model_dir(name)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    sp_tok = load_tokenizer(folder)
    hf_tok = HFTokenizer(folder / "tokenizer.json")
    assert (hf_tok.bos_id, hf_tok.add_bos) == (1, True)
    # The character-level vocab has no byte pieces: sentencepiece maps characters it lacks
    # ("世", "\n") to <unk> while tokenizer.json drops them, so compare only texts it covers.
    texts = [t for t in PLAIN_TEXTS if name == STORIES or (t.isascii() and "\n" not in t)]
    for text in texts:
        expected = ref(text)["input_ids"]
        assert sp_tok.encode(text) == expected
        assert hf_tok.encode(text) == expected
        assert sp_tok.decode(expected) == ref.decode(expected, skip_special_tokens=True)
    # tokenizer.json keeps runs of spaces that sentencepiece collapses; HFTokenizer follows it.
    for text in SPACY_TEXTS:
        assert hf_tok.encode(text) == ref(text)["input_ids"]


def test_char_vocab_unknown_characters() -> None:
    folder = _model_dir(BABYLLAMA)
    sp_tok, hf_tok = load_tokenizer(folder), HFTokenizer(folder / "tokenizer.json")
    space, a, b = sp_tok.encode("ab", add_bos=False)
    assert space == 3  # the "▁" piece: this vocab has no "▁a"
    assert sp_tok.encode("a\nb", add_bos=False) == [space, a, 0, b]  # 0 is <unk>
    assert hf_tok.encode("a\nb", add_bos=False) == [space, a, b]  # tokenizer.json drops "\n"
    assert sp_tok.decode([space, a, 0, b]) == "ab"


def test_sentencepiece_stream_keeps_leading_space_and_split_chars() -> None:
    tok = load_tokenizer(_model_dir(STORIES))
    prompt = tok.encode("Once upon a")
    time_id = tok.encode(" time", add_bos=False)[-1]
    assert tok.decode([time_id]) == "time"  # one piece alone loses its space...
    det = IncrementalDetokenizer(tok, prompt)
    assert det.add([time_id]) == " time"  # ...the stream keeps it
    world = tok.encode(" 世", add_bos=False)
    assert len(world) >= 4  # "▁" plus three byte-fallback pieces
    outs = [det.add([i]) for i in world]
    assert "".join(outs) == " 世" and "\ufffd" not in "".join(outs)
    assert outs[-1].endswith("世")
    assert det.flush() == ""


# -- the streaming property, for every tokenizer kind ----------------------------------------


def _tricky_ids(tok: Tokenizer) -> list[int]:
    """Ids that stress detokenization: specials, spaces, byte pieces of multi-byte chars."""
    pool = set(tok.encode("  世界 🙂 é\n\t x  y", add_bos=False))
    pool.update(tok.eos_ids)
    if tok.bos_id is not None:
        pool.add(tok.bos_id)
    pool.update(range(min(tok.vocab_size, 8)))
    return sorted(pool)


def _check_stream_property(tok: Tokenizer, *, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    tricky = _tricky_ids(tok)
    texts = ["", "Once upon", "hi there ", "世", "x\n"]

    def random_ids(n: int) -> list[int]:
        return [
            rng.choice(tricky) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
            for _ in range(n)
        ]

    checked = 0
    for _ in range(trials):
        if rng.random() < 0.6:
            prompt = tok.encode(rng.choice(texts), add_bos=rng.random() < 0.5)
        else:
            prompt = random_ids(rng.randrange(10))
        gen = random_ids(rng.randrange(1, 30))
        prompt_text = tok.decode(prompt)
        full_text = tok.decode(prompt + gen)
        if not full_text.startswith(prompt_text):
            continue  # the prompt itself ends inside a character: no well-defined answer
        det = IncrementalDetokenizer(tok, prompt)
        pieces, i = [], 0
        while i < len(gen):
            step = rng.randrange(1, 4)
            pieces.append(det.add(gen[i : i + step]))
            i += step
        held = det.flush()
        assert all(not p.endswith("\ufffd") for p in pieces), (prompt, gen, pieces)
        assert "".join(pieces) + held == full_text[len(prompt_text):], (prompt, gen, pieces)
        checked += 1
    assert checked > trials // 2


TokenizerFactory = Callable[[pytest.FixtureRequest], Tokenizer]
STREAM_CASES: Sequence[tuple[str, TokenizerFactory]] = [
    ("byte", lambda req: ByteTokenizer(vocab_size=300)),
    ("llama3", lambda req: load_tokenizer(req.getfixturevalue("llama3_dir"))),
    ("qwen2", lambda req: load_tokenizer(req.getfixturevalue("qwen2_dir"))),
    ("stories-sp", lambda req: load_tokenizer(_model_dir(STORIES))),
    ("stories-json", lambda req: HFTokenizer(_model_dir(STORIES) / "tokenizer.json")),
    ("babyllama-sp", lambda req: load_tokenizer(_model_dir(BABYLLAMA))),
    ("babyllama-json", lambda req: HFTokenizer(_model_dir(BABYLLAMA) / "tokenizer.json")),
]


@pytest.mark.parametrize("factory", [f for _, f in STREAM_CASES], ids=[n for n, _ in STREAM_CASES])
def test_incremental_detokenizer_matches_full_decode(
    factory: TokenizerFactory, request: pytest.FixtureRequest
) -> None:
    _check_stream_property(factory(request), trials=400, seed=1234)


def test_stream_multibyte_round_trip(llama3_dir: Path) -> None:
    for tok in (load_tokenizer(llama3_dir), ByteTokenizer()):
        ids = tok.encode(MULTIBYTE, add_bos=False)
        det = IncrementalDetokenizer(tok)
        outs = [det.add([i]) for i in ids]
        assert "".join(outs) + det.flush() == MULTIBYTE
        assert not any("\ufffd" in o for o in outs)
