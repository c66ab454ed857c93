"""CLIP byte-pair tokenizer for the runtime, id for id identical to transformers' CLIPTokenizer.

transformers 5 builds CLIPTokenizer on the `tokenizers` library; this module and
sdtrt.runtime.clip_text reproduce that pipeline with numpy and the `regex` module only:

1. Added tokens (<|startoftext|>, <|endoftext|>, an SD 2.x pad "!", ...) are cut out first: those
   marked normalized=False from the raw text, those marked normalized=True from the normalized text.
2. Normalize: NFC, every whitespace run -> " ", lowercase character by character.
3. Split with CLIP's regex (whitespace is dropped), then with GPT-2's byte-level regex, which only
   splits a lowercased literal "<|endoftext|>" further: "<|", "endoftext", "|>".
4. Each piece: its UTF-8 bytes become GPT-2's printable characters, the last one gets the
   end-of-word mark "</w>", and BPE merges pairs by rank.
5. bos + ids + eos, truncated to max_length (eos kept last) and padded with the pad id.

Steps 1 to 3 use sdtrt.runtime.clip_text (which holds `tokenizers`' own Unicode tables); 4 and 5 are here.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sdtrt.engine.clip_bpe import BOS, END_OF_WORD, EOS, bytes_to_unicode
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.runtime.clip_text import (
    BYTE_LEVEL_SPLIT,
    CLIP_SPLIT,
    CLIP_SPLIT_ASCII,
    added_token_pattern,
    cut_added_tokens,
    normalize,
)

logger = logging.getLogger("sdtrt.runtime.tokenizer")

SURROGATE = re.compile("[\ud800-\udfff]")  # str can hold them, UTF-8 cannot
# a truncated prompt's warning names up to SHOWN_TOKENS dropped tokens, else how many and their first SHOWN_CHARS
SHOWN_TOKENS, SHOWN_CHARS = 100, 200
DEFAULT_MAX_LENGTH = 77  # CLIP's text context; used when tokenizer_config.json does not set it
_NO_RANK = 1 << 62  # above every merge rank
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order
_DEFAULT_TOKENS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}


@dataclass(frozen=True)
class AddedToken:
    """A token matched whole before BPE, with the flags `tokenizers` gives it."""

    content: str
    normalized: bool  # matched in the normalized text (True) or the raw text (False)
    special: bool
    single_word: bool = False  # these three only take part in equality: CLIP's configs leave
    lstrip: bool = False  # them False and this tokenizer does not implement them
    rstrip: bool = False


class CLIPTokenizer:
    """CLIP's BPE tokenizer: `tokenizer(prompts)` gives the (B, max_length) int32 ids CLIP reads."""

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        named_tokens: Mapping[str, str | AddedToken | None] | None = None,
        added_tokens: Sequence[AddedToken] = (),
        extra_special_tokens: Sequence[str | AddedToken] = (),
        max_length: int = DEFAULT_MAX_LENGTH,
    ) -> None:
        """Build from a vocabulary, ranked merges and the special tokens as transformers loads them.

        named_tokens: bos/eos/unk/pad_token (missing keys take CLIP's defaults, None drops one);
        added_tokens: a tokenizer_config.json "added_tokens_decoder", in id order.
        """
        if max_length < 2:
            raise ManifestError(f"tokenizer max_length must be at least 2 (bos + eos), got {max_length}")
        self.max_length = int(max_length)
        self._vocab = dict(vocab)
        self._ranks: dict[tuple[str, str], int] = {}
        for rank, (left, right) in enumerate(merges):
            for part in (left, right, left + right):
                if part not in self._vocab:
                    raise ManifestError(f"tokenizer merge {rank + 1} ({left} {right}): {part!r} is not in vocab.json")
            self._ranks[(left, right)] = rank  # a repeated merge keeps its last rank, as tokenizers does

        named = {key: _DEFAULT_TOKENS[key] for key in _NAMED_TOKENS}
        named.update({k: v for k, v in (named_tokens or {}).items() if k in _NAMED_TOKENS})
        self._added = self._register_added_tokens(named, list(added_tokens), list(extra_special_tokens))
        self._id_to_token = {i: t for t, i in self._vocab.items()}
        self._id_to_token.update({i: t.content for t, i in self._added.values()})
        self._special_ids = {i for t, i in self._added.values() if t.special}
        odd = sorted(t.content for t, _ in self._added.values() if t.lstrip or t.rstrip or t.single_word)
        if odd:  # CLIP's configs never set these
            logger.warning("tokenizer ignores lstrip/rstrip/single_word of added tokens %s; ids may differ", odd)

        for key in ("bos_token", "eos_token", "pad_token"):
            if named[key] is None:
                raise ManifestError(f"tokenizer has no {key}; CLIP needs bos, eos and pad tokens")
        self.bos_id = self.token_to_id(_content(named["bos_token"]))
        self.eos_id = self.token_to_id(_content(named["eos_token"]))
        self.pad_id = self.token_to_id(_content(named["pad_token"]))
        unk = named["unk_token"]
        self._unk_id = None if unk is None else self._token_or_none(_content(unk))
        if None in (self.bos_id, self.eos_id, self.pad_id):
            raise ManifestError("tokenizer bos/eos/pad tokens are neither in vocab.json nor added tokens")

        # Added tokens are cut out whole; the longest one wins where several match at one place.
        raw = {t.content: i for t, i in self._added.values() if not t.normalized and t.content}
        norm = {normalize(t.content): i for t, i in self._added.values() if t.normalized}
        norm.pop("", None)
        self._raw_added, self._raw_added_re = raw, added_token_pattern(raw)
        self._norm_added, self._norm_added_re = norm, added_token_pattern(norm)
        # Ids of one pre-tokenized piece; prompts repeat words, so BPE runs once per distinct piece.
        self._piece_ids = functools.lru_cache(maxsize=1 << 16)(self._piece_ids_uncached)

    # -- loading ----------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Load a Hugging Face CLIP tokenizer folder (vocab.json, merges.txt and its configs)."""
        folder = Path(path)
        if not folder.is_dir():
            raise ManifestError(f"tokenizer folder {folder} does not exist")
        vocab = _read_json(folder / "vocab.json", required=True)
        if not isinstance(vocab, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in vocab.items()
        ):
            raise ManifestError(f"{folder / 'vocab.json'} is not a JSON object of token -> integer id")
        merges = _read_merges(folder / "merges.txt")
        config = _read_json(folder / "tokenizer_config.json", required=False)
        special_map = _read_json(folder / "special_tokens_map.json", required=False)
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
            if not isinstance(obj, dict):
                raise ManifestError(f"{folder / name} is not a JSON object")
        try:
            kwargs = _resolve_special_tokens(config, special_map)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"{folder}: bad special tokens in the tokenizer configs: {exc}") from exc
        max_length = config.get("model_max_length", config.get("max_len"))
        if max_length is None or (isinstance(max_length, (int, float)) and max_length >= 2**31):
            # transformers writes 1e30 for "no limit"; CLIP's text encoder always reads 77 positions
            max_length = DEFAULT_MAX_LENGTH
        if not isinstance(max_length, int) or isinstance(max_length, bool):
            raise ManifestError(
                f"{folder / 'tokenizer_config.json'}: model_max_length {max_length!r} is not an integer"
            )
        return cls(vocab, merges, max_length=max_length, **kwargs)

    def _register_added_tokens(
        self,
        named: dict[str, str | AddedToken | None],
        decoder: list[AddedToken],
        extra: list[str | AddedToken],
    ) -> dict[str, tuple[AddedToken, int]]:
        """Register added tokens exactly as transformers' TokenizersBackend.__init__ does.

        The added_tokens_decoder entries come first; then each named token (bos, eos, unk, pad) and
        extra special token unless its text is among those entries or an equal value (str == str,
        token == token on every flag) was queued already. A str becomes a special token matched in
        the raw text. Registering a text again overwrites its flags; a text outside the vocabulary
        gets the next free id.
        """
        queue: list[str | AddedToken] = list(decoder)
        known = {t.content for t in decoder}
        for value in [named[k] for k in _NAMED_TOKENS] + extra:
            if value is None or _content(value) in known or value in queue:
                continue
            queue.append(value)
        named_contents = {_content(v) for v in named.values() if v is not None}
        added: dict[str, tuple[AddedToken, int]] = {}
        for value in queue:
            if isinstance(value, str):
                token = AddedToken(value, normalized=False, special=True)
            elif not value.special and value.content in named_contents:
                token = replace(value, special=True)
            else:
                token = value
            if token.content in added:
                token_id = added[token.content][1]
            elif token.content in self._vocab:
                token_id = self._vocab[token.content]
            else:
                top = max((i for _, i in added.values()), default=-1)
                token_id = top + 1 if top >= len(self._vocab) else len(self._vocab)
            added[token.content] = (token, token_id)
        return added

    # -- encoding ---------------------------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        """The id of a token text (added tokens first), the unknown token's id, or None."""
        found = self._token_or_none(token)
        return self._unk_id if found is None else found

    def _token_or_none(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token][1]
        return self._vocab.get(token)

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without bos/eos (added tokens written in the text do count)."""
        ids: list[int] = []
        for raw in cut_added_tokens(text, self._raw_added_re, self._raw_added):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            for part in cut_added_tokens(normalize(raw), self._norm_added_re, self._norm_added):
                if isinstance(part, int):
                    ids.append(part)
                    continue
                split = CLIP_SPLIT_ASCII if part.isascii() else CLIP_SPLIT  # same pieces, ASCII is faster
                for piece in split.findall(part):
                    ids.extend(self._piece_ids(piece))
        return ids

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """(B, max_length) int32: bos + ids + eos, truncated to max_length, padded with pad_id.

        A prompt that does not fit logs one warning naming the words that were dropped.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        for text in texts:
            if not isinstance(text, str):
                raise InvalidInputError(f"a prompt must be a string, got {type(text).__name__}")
            if surrogate := SURROGATE.search(text):  # UTF-8 cannot encode it: no tokens, no picture
                raise InvalidInputError(
                    f"a prompt is not valid text: it holds {surrogate[0]!a} at character {surrogate.start()} "
                    "(a lone UTF-16 surrogate, or bytes that are not UTF-8 on a command line)"
                )
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        room = self.max_length - 2
        for row, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > room:
                _warn_truncated(self.decode(ids[room : room + SHOWN_TOKENS]), len(ids) - room, self.max_length)
                ids = ids[:room]
            out[row, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return out

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ids as transformers decodes it: bytes joined, each "</w>" a space, ends stripped."""
        chunks = []
        for token_id in ids:
            token_id = int(token_id)
            token = self._id_to_token.get(token_id)
            if token is None or (skip_special_tokens and token_id in self._special_ids):
                continue
            try:
                chunks.append(bytes(_CHAR_TO_BYTE[c] for c in token))
            except KeyError:  # not a byte-level token (an added one): its own UTF-8
                chunks.append(token.encode("utf-8"))
        text = b"".join(chunks).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ").strip()  # transformers strips in Python, so str.strip()

    def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
        ids: list[int] = []
        for word in BYTE_LEVEL_SPLIT.findall(piece):
            # UTF-8 bytes -> GPT-2's printable stand-ins (latin-1 maps byte b to chr(b) first)
            ids.extend(self._bpe(word.encode("utf-8").decode("latin-1").translate(_BYTE_TO_CHAR)))
        return tuple(ids)

    def _bpe(self, word: str) -> list[int]:
        """Merge the lowest-ranked adjacent pair everywhere it occurs, until no pair has a rank."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._ranks
        while len(symbols) > 1:
            best, best_rank = None, _NO_RANK
            for pair in itertools.pairwise(symbols):
                rank = ranks.get(pair, best_rank)
                if rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        vocab = self._vocab
        return [vocab.get(s, self._unk_id) for s in symbols]  # unknown only if vocab lacks bytes

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer(vocab={len(self._vocab)}, max_length={self.max_length}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"
        )


# -- config files ---------------------------------------------------------------------------------


def _warn_truncated(shown: str, dropped: int, max_length: int) -> None:
    """One warning for a prompt cut to ``max_length`` tokens: the ``dropped`` tokens' text, or, beyond
    SHOWN_TOKENS of them, how many and the start of ``shown`` (a 10 MB prompt makes no 10 MB log line)."""
    if dropped <= SHOWN_TOKENS:
        logger.warning('prompt truncated to %d tokens; dropped: "%s"', max_length, shown)
        return
    start = shown[:SHOWN_CHARS].rstrip()
    logger.warning('prompt truncated to %d tokens; dropped %d tokens: "%s ..."', max_length, dropped, start)


def _read_json(path: Path, *, required: bool) -> Any:
    if not path.is_file():
        if required:
            raise ManifestError(f"tokenizer file {path} is missing")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"tokenizer file {path} is not valid JSON: {exc}") from exc


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """merges.txt: an optional "#version" line, then one "left right" pair a line, best first."""
    if not path.is_file():
        raise ManifestError(f"tokenizer file {path} is missing")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"tokenizer file {path} cannot be read as UTF-8 text: {exc}") from exc
    if lines and lines[-1] == "":
        lines.pop()
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.removesuffix("\r")
        if line.startswith("#version"):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ManifestError(f"{path} line {number} is not a merge 'left right': {line[:40]!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _added_token(value: Any, *, special: bool | None = None) -> AddedToken:
    """An AddedToken from a config dict; special=True forces it (special_tokens_map.json entries)."""
    if not isinstance(value, dict) or not isinstance(value.get("content"), str):
        raise TypeError(f"expected a token string or object with 'content', got {value!r}")
    is_special = bool(value.get("special", False)) if special is None else special
    return AddedToken(
        content=value["content"],
        normalized=bool(value.get("normalized", not is_special)),  # tokenizers' default
        special=is_special,
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
    )


def _resolve_special_tokens(config: dict, special_map: dict) -> dict[str, Any]:
    """The named, added and extra special tokens transformers 5 derives from the two config files.

    With an "added_tokens_decoder" in tokenizer_config.json only that file counts, and a named token
    whose text is one of those entries takes that entry's flags. Without it special_tokens_map.json
    overrides tokenizer_config.json, its objects always special.
    """
    values: dict[str, Any] = {}
    decoder: list[AddedToken] = []
    extra: list[Any] = []
    for key in (*_NAMED_TOKENS, "additional_special_tokens", "extra_special_tokens"):
        if key in config:
            values[key] = config[key]
    if "added_tokens_decoder" in config:
        entries = config["added_tokens_decoder"]
        if not isinstance(entries, dict):
            raise TypeError("added_tokens_decoder is not an object")
        decoder = [_added_token(v) for _, v in sorted(entries.items(), key=lambda kv: int(kv[0]))]
        values = {k: v if isinstance(v, (str, list)) or v is None else _added_token(v) for k, v in values.items()}
        by_content = {t.content: t for t in decoder}
        for key in _NAMED_TOKENS:
            if isinstance(values.get(key), (str, AddedToken)):
                values[key] = by_content.get(_content(values[key]), values[key])
    else:
        values = {k: v if isinstance(v, (str, list)) or v is None else _added_token(v) for k, v in values.items()}
        for key, value in special_map.items():
            if key in _NAMED_TOKENS:
                values[key] = value if isinstance(value, str) or value is None else _added_token(value, special=True)
            elif key in ("additional_special_tokens", "extra_special_tokens") and isinstance(value, list):
                values[key] = list(values.get(key) or []) + [v for v in value if v not in (values.get(key) or [])]
    for key in ("extra_special_tokens", "additional_special_tokens"):
        if isinstance(values.get(key), list):
            extra = [v if isinstance(v, (str, AddedToken)) else _added_token(v, special=True) for v in values[key]]
            break
    named = {k: values[k] for k in _NAMED_TOKENS if k in values}
    for key, value in named.items():
        if value is not None and not isinstance(value, (str, AddedToken)):
            raise TypeError(f"{key} is {value!r}")
    return {"named_tokens": named, "added_tokens": decoder, "extra_special_tokens": extra}


def _content(value: str | AddedToken) -> str:
    return value if isinstance(value, str) else value.content


_BYTE_TO_CHAR = bytes_to_unicode()  # also a str.translate table: chr(b) -> stand-in
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}
