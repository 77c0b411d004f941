"""Text <-> token ids, and streaming detokenization.

Three backends share one small interface: `HFTokenizer` (a `tokenizer.json` read by the
`tokenizers` library), `SentencePieceTokenizer` (a `tokenizer.model`) and `ByteTokenizer`
(raw UTF-8 bytes, for random-weight models that ship no tokenizer). `load_tokenizer` picks the
backend for a Hugging Face model folder and takes BOS/EOS ids from the model's own config
files, because those (not the tokenizer) say which ids end generation.

`encode` never lets the backend insert special tokens itself; BOS is prepended by us, once,
according to `add_bos`. That keeps the "BOS or not" rule in one place and rules out a
doubled BOS when a backend's post-processor also adds one.

`IncrementalDetokenizer` turns a growing id list into text deltas. Decoding tokens one at a
time is wrong for byte-fallback pieces (a character split over several tokens) and for
sentencepiece's "▁" word-boundary marker (a lone piece loses its leading space), so it decodes
a small window of ids and emits only the text beyond what the window already produced.
"""

from __future__ import annotations

import abc
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxinfer.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

_REPLACEMENT_CHAR = "\ufffd"
# Single-character tokens tried, in order, as the anchor for context-free window decoding.
_ANCHOR_CANDIDATES = ("a", "e", "t", "o", "n", "x", "0")
# How many prompt tokens the detokenizer re-decodes as context for the first generated token.
_PROMPT_CONTEXT_TOKENS = 5


class Tokenizer(abc.ABC):
    """The interface the runtime uses; backends implement `_encode_plain` and `_decode_plain`.

    Attributes:
        vocab_size: number of ids the tokenizer knows (the model's vocabulary may be larger).
        bos_id: id of the beginning-of-sequence token, or None when the model has none.
        eos_ids: every id that ends generation.
        add_bos: whether `encode(text)` prepends BOS by the model's rule.
    """

    vocab_size: int
    bos_id: int | None
    eos_ids: tuple[int, ...]
    add_bos: bool

    def __init__(
        self,
        *,
        vocab_size: int,
        bos_id: int | None,
        eos_ids: Sequence[int],
        add_bos: bool,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self._anchor: tuple[int, str] | None = None
        self._anchor_searched = False
        self._set_special_ids(bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    # -- backend hooks -------------------------------------------------------------------

    @abc.abstractmethod
    def _encode_plain(self, text: str) -> list[int]:
        """Encode without any special tokens added by the backend."""

    @abc.abstractmethod
    def _decode_plain(self, ids: list[int]) -> str:
        """Decode ids that are known to be in range and not to be skipped."""

    @abc.abstractmethod
    def _backend_special_ids(self) -> frozenset[int]:
        """Ids the backend itself marks special (control, unknown, special added tokens)."""

    @abc.abstractmethod
    def _token_id(self, token: str) -> int | None:
        """Id of a token string in the vocabulary, or None."""

    @abc.abstractmethod
    def _default_add_bos(self, bos_id: int | None) -> bool:
        """Whether the tokenizer itself would prepend `bos_id` when encoding."""

    def _num_backend_ids(self) -> int:
        """Ids below this are passed to the backend; others decode to nothing."""
        return self.vocab_size

    def _may_change_with_more_ids(self, ids: Sequence[int]) -> bool:
        """Whether text already decoded from `ids` can still change when more ids follow.

        Beyond an unfinished character (U+FFFD, checked by the detokenizer) most backends never
        revise text; tokenizer.json's ByteFallback decoder does (see HFTokenizer).
        """
        return False

    # -- public API ----------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS is prepended when asked (None: `self.add_bos`), EOS never.

        A BOS already produced by the text itself (a chat template that spells out the BOS
        token) is not doubled.
        """
        ids = self._encode_plain(text)
        use_bos = self.add_bos if add_bos is None else add_bos
        if use_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, skipping special tokens (BOS, EOS, pad, unknown) and unknown ids."""
        limit = self._num_backend_ids()
        kept = [i for i in map(int, ids) if 0 <= i < limit and i not in self._skip_ids]
        return self._decode_plain(kept) if kept else ""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={self.eos_ids}, add_bos={self.add_bos})"
        )

    # -- internals shared by backends and the detokenizer --------------------------------

    def _set_special_ids(
        self, *, bos_id: int | None, eos_ids: Sequence[int], add_bos: bool
    ) -> None:
        """Install BOS/EOS and the set of ids `decode` drops; used by load_tokenizer too."""
        self.bos_id = None if bos_id is None else int(bos_id)
        self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
        if add_bos and self.bos_id is None:
            logger.warning("add_bos requested but the tokenizer has no BOS id; not adding one")
            add_bos = False
        self.add_bos = bool(add_bos)
        for i in (self.bos_id, *self.eos_ids):
            if i is not None and not 0 <= i < self.vocab_size:
                logger.warning(
                    "special id %d is outside the tokenizer vocab (%d)", i, self.vocab_size
                )
        skip = set(self._backend_special_ids())
        skip.update(self.eos_ids)
        if self.bos_id is not None:
            skip.add(self.bos_id)
        self._skip_ids = frozenset(skip)
        self._anchor_searched = False
        self._anchor = None

    def _find_anchor(self) -> tuple[int, str] | None:
        """A plain one-character token whose text never merges with what follows it."""
        if not self._anchor_searched:
            self._anchor_searched = True
            for cand in _ANCHOR_CANDIDATES:
                i = self._token_id(cand)
                if i is None or i in self._skip_ids:
                    continue
                if self.decode([i]) == cand and self.decode([i, i]) == cand + cand:
                    self._anchor = (i, cand)
                    break
            else:
                logger.debug("%r: no anchor token; detokenizing with relative windows", self)
        return self._anchor

    def _decode_continuation(self, ids: Sequence[int]) -> str:
        """Text of `ids` as it reads after some earlier, non-empty text.

        `decode` treats its first token as the start of the text: sentencepiece drops leading
        "▁" spaces there and tokenizer.json "Strip" decoders drop one space. Decoding behind a
        plain anchor token turns that off, so a window's text equals its slice of the full text.
        """
        anchor = self._find_anchor()
        if anchor is None:
            return self.decode(ids)
        anchor_id, anchor_text = anchor
        return self.decode([anchor_id, *ids])[len(anchor_text):]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (byte-level BPE for Llama 3 / Qwen2, Metaspace for Llama 2).

    Unless given, `bos_id` is the token the file's post-processor prepends (if any) and
    `add_bos` whether it prepends `bos_id`; `eos_ids` defaults to none.
    """

    def __init__(
        self,
        tokenizer_file: str | os.PathLike,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] = (),
        add_bos: bool | None = None,
    ) -> None:
        import tokenizers  # noqa: PLC0415  (optional dependency; only this backend needs it)

        path = Path(tokenizer_file)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot read tokenizer.json: {e}") from e
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._special = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        self._byte_pieces = frozenset()
        if self._tok.decoder is not None and _has_decoder(
            json.loads(self._tok.decoder.__getstate__()), "ByteFallback"
        ):
            self._byte_pieces = frozenset(
                i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t[-1] == ">"
            )
        if bos_id is None:
            bos_id = self._post_processor_bos()
        if add_bos is None:
            add_bos = self._default_add_bos(bos_id)
        super().__init__(
            vocab_size=max(vocab.values(), default=-1) + 1,
            bos_id=bos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
        )

    def _post_processor_bos(self) -> int | None:
        """The id the post-processor puts in front of a text, found by encoding a sample."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        if len(full) > len(plain) and full[1 : 1 + len(plain)] == plain:
            return full[0]
        return None

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def _backend_special_ids(self) -> frozenset[int]:
        return self._special

    def _token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def _default_add_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None and self._post_processor_bos() == bos_id

    def _may_change_with_more_ids(self, ids: Sequence[int]) -> bool:
        # ByteFallback turns a whole run of byte pieces into U+FFFDs when the run is not valid
        # UTF-8, valid characters in it included; so a run is final only once it has ended.
        if not self._byte_pieces:
            return False
        for i in reversed(ids):
            if i not in self._skip_ids and 0 <= i < self.vocab_size:
                return i in self._byte_pieces
        return False


def _has_decoder(spec: Any, kind: str) -> bool:
    """Whether a tokenizer.json decoder spec (possibly a Sequence) contains decoder `kind`."""
    if isinstance(spec, dict):
        return spec.get("type") == kind or any(_has_decoder(v, kind) for v in spec.values())
    if isinstance(spec, list):
        return any(_has_decoder(v, kind) for v in spec)
    return False


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model` (Llama 2 style); the reference for those models.

    Unless given, BOS/EOS are the model's own `<s>`/`</s>` and `add_bos` is True when a BOS
    exists.
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        *,
        bos_id: int | None = None,
        eos_ids: Sequence[int] | None = None,
        add_bos: bool | None = None,
    ) -> None:
        import sentencepiece  # noqa: PLC0415  (optional dependency; only this backend needs it)

        path = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # RuntimeError / OSError depending on the failure
            raise CheckpointError(f"{path}: cannot read sentencepiece model: {e}") from e
        n = self._sp.vocab_size()
        self._special = frozenset(
            i for i in range(n) if self._sp.is_control(i) or self._sp.is_unknown(i)
        )
        if bos_id is None and self._sp.bos_id() >= 0:
            bos_id = self._sp.bos_id()
        if eos_ids is None:
            eos_ids = (self._sp.eos_id(),) if self._sp.eos_id() >= 0 else ()
        if add_bos is None:
            add_bos = self._default_add_bos(bos_id)
        super().__init__(vocab_size=n, bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def _decode_plain(self, ids: list[int]) -> str:
        return self._sp.decode(ids)

    def _backend_special_ids(self) -> frozenset[int]:
        return self._special

    def _token_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if self._sp.is_unknown(i) else i

    def _default_add_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes: ids 0..255 are bytes, 256 is BOS, 257 is EOS.

    Needs no files, so random-weight models can run end to end. Ids from 258 up to
    `vocab_size` are valid model outputs that decode to nothing; that lets a model with a
    large vocabulary use this tokenizer unchanged.
    """

    BOS_ID = 256
    EOS_ID = 257

    def __init__(self, vocab_size: int = 258, *, add_bos: bool = True) -> None:
        if vocab_size < 258:
            raise ConfigError(f"ByteTokenizer needs vocab_size >= 258, got {vocab_size}")
        super().__init__(
            vocab_size=vocab_size, bos_id=self.BOS_ID, eos_ids=(self.EOS_ID,), add_bos=add_bos
        )

    def _encode_plain(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode_plain(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def _num_backend_ids(self) -> int:
        return 256

    def _backend_special_ids(self) -> frozenset[int]:
        return frozenset()

    def _token_id(self, token: str) -> int | None:
        data = token.encode("utf-8")
        return data[0] if len(data) == 1 else None

    def _default_add_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None


def load_tokenizer(model_dir: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face model folder, with BOS/EOS from its config files.

    `tokenizer.model` wins over `tokenizer.json` when both exist: for sentencepiece models it is
    the original, and the converted tokenizer.json differs from it (e.g. on runs of spaces).
    Raises CheckpointError when the folder holds neither or they cannot be read.
    """
    folder = Path(model_dir)
    sp_file, hf_file = folder / "tokenizer.model", folder / "tokenizer.json"
    tok: Tokenizer | None = None
    if sp_file.is_file():
        try:
            tok = SentencePieceTokenizer(sp_file)
        except CheckpointError as e:
            # Llama 3 "original/" folders hold a tiktoken file under this name.
            if not hf_file.is_file():
                raise
            logger.warning("%s; falling back to tokenizer.json", e)
    if tok is None:
        if not hf_file.is_file():
            raise CheckpointError(f"{folder}: no tokenizer.json or tokenizer.model")
        tok = HFTokenizer(hf_file)
    _apply_model_special_ids(tok, folder)
    logger.info("loaded %r from %s", tok, folder)
    return tok


def tokenizer_for_model(model: str) -> Tokenizer | None:
    """The tokenizer for a `--model` value without loading any weights or JAX: the byte-level
    one for a random preset, a directory's tokenizer files, or None when the directory has none
    (token ids only)."""
    from jaxinfer.config import ModelConfig, model_source  # config is JAX-free too

    folder = model_source(model)
    if isinstance(folder, ModelConfig):
        return ByteTokenizer(vocab_size=folder.vocab_size)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        return None
    return load_tokenizer(folder)


def _apply_model_special_ids(tok: Tokenizer, folder: Path) -> None:
    """Set BOS/EOS/add_bos from config.json, generation_config.json and tokenizer_config.json."""
    config = _read_json(folder / "config.json")
    gen_config = _read_json(folder / "generation_config.json")
    tok_config = _read_json(folder / "tokenizer_config.json")

    bos_ids = _config_ids(gen_config, config, "bos_token_id", folder)
    if bos_ids:
        bos_id: int | None = bos_ids[0]
    else:
        bos_id = _token_config_id(tok, tok_config, "bos_token")
        if bos_id is None:
            bos_id = tok.bos_id

    eos_ids = _config_ids(gen_config, config, "eos_token_id", folder)
    if eos_ids is None:
        eos = _token_config_id(tok, tok_config, "eos_token")
        eos_ids = [eos] if eos is not None else list(tok.eos_ids)
    if not eos_ids:
        logger.warning("%s: no EOS id found; generation only stops at max length", folder)

    flag = tok_config.get("add_bos_token")
    add_bos = flag if isinstance(flag, bool) else tok._default_add_bos(bos_id)
    tok._set_special_ids(bos_id=bos_id, eos_ids=eos_ids, add_bos=add_bos)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _config_ids(
    gen_config: dict[str, Any], config: dict[str, Any], key: str, folder: Path
) -> list[int] | None:
    """`key` as a list of ids, generation_config.json first; None when neither sets it."""
    for cfg in (gen_config, config):
        value = cfg.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{folder}: {key} must be an int or a list of ints: {value!r}")
        return list(values)
    return None


def _token_config_id(tok: Tokenizer, tok_config: dict[str, Any], key: str) -> int | None:
    """Id of a token named in tokenizer_config.json (a string or an AddedToken dict)."""
    value = tok_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        return None
    i = tok._token_id(value)
    if i is None:
        logger.warning("tokenizer_config %s %r is not in the vocabulary", key, value)
    return i


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas, one request at a time.

    Keeps two offsets into the full id list: text is decoded for the window
    `ids[prefix:]`, and what `ids[prefix:read]` already produced is cut off the front. Text
    ending in U+FFFD is held back, since it is usually a character whose remaining bytes are
    still to come. The outputs of all `add` calls plus `flush` concatenate to
    `decode(prompt_ids + ids)` minus `decode(prompt_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        self._ids = [int(i) for i in prompt_ids]
        self._read = len(self._ids)
        # Some prompt context keeps the first generated word's leading space.
        self._prefix = max(self._read - _PROMPT_CONTEXT_TOKENS, 0)
        if self._prefix and not tokenizer.decode(self._ids[: self._prefix]):
            # Nothing visible yet: the start-of-text rules still apply, decode from the start.
            self._prefix = 0

    def add(self, ids: Sequence[int]) -> str:
        """Append generated ids; returns only the text that is new since the last call."""
        self._ids.extend(int(i) for i in ids)
        return self._advance(is_final=False)

    def flush(self) -> str:
        """At the end of the stream: whatever text is still held back."""
        return self._advance(is_final=True)

    def _window_text(self, start: int, end: int) -> str:
        ids = self._ids[start:end]
        return self._tok.decode(ids) if start == 0 else self._tok._decode_continuation(ids)

    def _advance(self, *, is_final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._window_text(self._prefix, self._read)
        new_text = self._window_text(self._prefix, len(self._ids))
        if not is_final and (
            new_text.endswith(_REPLACEMENT_CHAR)
            or self._tok._may_change_with_more_ids(self._ids[self._read :])
        ):
            return ""
        if new_text.startswith(prefix_text):
            delta = new_text[len(prefix_text):]
        else:  # only when the prompt itself ended inside a character
            delta = new_text[len(os.path.commonprefix([prefix_text, new_text])):]
        if not delta and not is_final:
            return ""
        # A window that starts at 0 must stay there until it produced text (see __init__).
        if self._prefix or prefix_text:
            self._prefix = self._read
        self._read = len(self._ids)
        return delta
