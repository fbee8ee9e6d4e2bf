"""CLIP BPE tokenizer: ids equal ``open_clip.tokenize`` (prompts, Unicode, truncation, random
text), the documented mojibake difference, decoding, and loud failures on a bad vocabulary."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from csdfd_jax.models import clip_tokenizer as T


@pytest.fixture(scope="module")
def tok() -> T.Tokenizer:
  try:
    return T.default_tokenizer()
  except FileNotFoundError as e:
    pytest.skip(str(e))


@pytest.fixture(scope="module")
def ref():
  """``open_clip.tokenize`` as int32 numpy."""
  open_clip = pytest.importorskip("open_clip")
  return lambda texts, n=77: open_clip.tokenize(texts, context_length=n).numpy().astype(np.int32)


DOMAINS = ["Celeb-DF", "DFDC", "UADFV", "FF++", "wildcard", "FaceForensics++", "DFDCP", "WDF"]
PROMPTS = [
  "a photo of a real face.",
  "a photo of a fake face.",
  "a photo of a fake face from the FaceForensics++ dataset.",
  "A face showing forgery clues",
  *[f"a deepfake face from {d}" for d in DOMAINS],
  *[f"A {d} {c} face showing forgery clues." for d in DOMAINS for c in ("real", "fake")],
]
UNICODE = [
  "Café naïve résumé Ångström façade",
  "e\u0301 composed by NFC, x\u0301 not",
  "日本語のテキスト 中文字符 한국어",
  "emoji 😀🎉👍🏽 👨‍👩‍👧 flags 🇫🇷",
  "Привет, мир! Дипфейк",
  "3.14, 1,000,000 and 2024-01-01; -5°C 50% 1/2 ½ ² Ⅻ",
  "it's don't we're they've I'm you'll he'd IT'S Don't",
  "don’t ‘single’ “double” quotes",
  "multiple   spaces\t\ttabs\n\nnewlines\r\n and\u00a0nbsp\u3000ideographic",
  "Tom &amp; Jerry &lt;3 &amp;amp;amp; &EACUTE;t&eacute; &#39;x&#x27; &notanentity;",
  "a < b &amp;amp;amp; c\nnext line &amp;amp;",
  "ﬁne ﬂour ＬＯＵＤ　ＮＯＩＳＥＳ ｶﾞ",
  "'ſt <ſtart_of_text> <start_of_text>x <end_of_text> !!'s ''ll",
  "x\x85y \x80 \x1b[31mred\x1b[0m \ufeffbom \x00nul",
  "İstanbul ǅ ŉ ß ẞ Σίσυφος",
  "   ",
]


def test_prompts_match_open_clip(tok, ref):
  np.testing.assert_array_equal(tok(PROMPTS), ref(PROMPTS))
  real = tok("a photo of a real face.")[0]
  assert real[:9].tolist() == [49406, 320, 1125, 539, 320, 1532, 1710, 269, 49407]


@pytest.mark.parametrize("text", UNICODE)
def test_unicode_matches_open_clip(tok, ref, text):
  np.testing.assert_array_equal(tok([text]), ref([text]))


def test_truncation_keeps_start_and_ends_with_eot(tok, ref):
  long = " ".join(f"word{i} is a face, from FF++" for i in range(40))
  ids = tok(long)
  assert ids.shape == (1, 77) and ids.dtype == np.int32
  assert ids[0, 0] == T.SOT_ID and ids[0, 76] == T.EOT_ID and (ids[0] != 0).all()
  assert ids[0, 1:76].tolist() == tok.encode(long)[:75]
  np.testing.assert_array_equal(ids, ref(long))
  np.testing.assert_array_equal(tok([long, "a"], context_length=10), ref([long, "a"], 10))
  np.testing.assert_array_equal(T.tokenize(long, 2), [[T.SOT_ID, T.EOT_ID]])


def test_empty_string_and_batch(tok, ref):
  ids = tok(["", "a real face", ""])
  assert ids.shape == (3, 77) and ids.dtype == np.int32
  assert ids[0, :2].tolist() == [T.SOT_ID, T.EOT_ID] and not ids[0, 2:].any()
  np.testing.assert_array_equal(ids, ref(["", "a real face", ""]))
  assert tok([]).shape == (0, 77)
  assert tok.encode("") == []


def test_special_ids(tok):
  assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (49406, 49407, 49408)
  assert tok.encode("<start_of_text>") == [49406]


def test_decode_round_trip(tok, ref):
  import open_clip

  for text in ["a photo of a real face", "a deepfake face from wildcard", "привет мир", "日本"]:
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(text)[0]) == text  # stops at EOT, skips SOT and the padding
  text = "A photo of a FAKE face, from FF++!"
  assert tok.decode(tok.encode(text)) == "a photo of a fake face , from ff ++!"
  ref_text = open_clip.decode(open_clip.tokenize(text)[0])
  assert ref_text.replace("<start_of_text>", "").split("<end_of_text>")[0].strip() == (
    tok.decode(tok.encode(text))
  )


def test_mojibake_is_not_repaired(tok, ref):
  """The one documented difference: ftfy's fix_encoding re-decodes mojibake, this does not."""
  pytest.importorskip("ftfy")
  text = "cafÃ© FaceForensicsâ€™ data"
  assert tok.decode(tok.encode(text)) == "cafã © faceforensicsâ €™ data"
  assert not np.array_equal(tok(text), ref(text))
  np.testing.assert_array_equal(ref(text), tok("café FaceForensics' data"))


def test_bad_arguments(tok):
  with pytest.raises(ValueError, match="at least 2"):
    tok("a", context_length=1)
  with pytest.raises(TypeError, match="must be strings, got bytes"):
    tok([b"a"])


def test_vocab_from_path_and_env(tok, tmp_path, monkeypatch):
  copy = tmp_path / T.VOCAB_FILE
  shutil.copy(tok.vocab_path, copy)
  assert T.Tokenizer(vocab_path=copy).encode("a fake face") == tok.encode("a fake face")
  monkeypatch.setenv(T.VOCAB_ENV, str(copy))
  assert T.find_vocab() == copy
  assert T.find_vocab(tok.vocab_path) == tok.vocab_path  # an explicit path wins over the env


def test_vocab_hash_mismatch_fails(tok, tmp_path, monkeypatch):
  lines = gzip.decompress(tok.vocab_path.read_bytes()).split(b"\n")
  lines[1], lines[2] = lines[2], lines[1]  # a plausible file with two merges swapped
  bad = tmp_path / "corrupt.txt.gz"
  bad.write_bytes(gzip.compress(b"\n".join(lines)))
  with pytest.raises(ValueError, match=f"expected {T.VOCAB_SHA256}.*reinstall open_clip_torch"):
    T.Tokenizer(vocab_path=bad)
  monkeypatch.setenv(T.VOCAB_ENV, str(bad))
  with pytest.raises(ValueError, match="corrupt.txt.gz is not OpenAI's"):
    T.Tokenizer()


def test_missing_vocab_fails_with_the_fix(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"vocab_path=.*nope.*pip install open_clip_torch"):
    T.Tokenizer(vocab_path=tmp_path / "nope.txt.gz")
  monkeypatch.setenv(T.VOCAB_ENV, str(tmp_path / "gone.txt.gz"))
  with pytest.raises(FileNotFoundError, match=r"\$CSDFD_CLIP_VOCAB=.*gone"):
    T.find_vocab()
  monkeypatch.delenv(T.VOCAB_ENV)
  monkeypatch.setattr(T, "PACKAGED_VOCABS", (("no-such-dist-xyz", "x/" + T.VOCAB_FILE),))
  with pytest.raises(FileNotFoundError, match="pip install open_clip_torch.*CSDFD_CLIP_VOCAB"):
    T.find_vocab()


# Random text: any assigned character (Python's Unicode database; see the module docstring for
# why unassigned ones are left out), mixed with pieces that reach the tricky branches.
PIECES = [" ", "  ", "\n", "\t", "'s", "'T", "'ll", "'", "&amp;", "&lt;", "<", "&EACUTE;", "ſ"]
PIECES += ["<start_of_text>", "<end_of_text>", "ﬁ", "’", "“", "e\u0301", "\x85", "12", "++", "É"]
TEXT = st.lists(
  st.one_of(
    st.characters(exclude_categories=("Cs", "Cn")),
    st.characters(min_codepoint=0x20, max_codepoint=0x17F),
    st.sampled_from(PIECES),
  ),
  max_size=30,
).map("".join)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(TEXT)
def test_random_text_matches_open_clip(tok, ref, text):
  ftfy = pytest.importorskip("ftfy")
  assume(ftfy.fix_text(text) == ftfy.fix_text(text, fix_encoding=False))  # no mojibake repair
  np.testing.assert_array_equal(tok(text), ref(text))


@FAST
@given(TEXT)
def test_fix_text_is_ftfy_without_fix_encoding(text):
  ftfy = pytest.importorskip("ftfy")
  assert T.fix_text(text) == ftfy.fix_text(text, fix_encoding=False)


@FAST
@given(TEXT)
def test_pretokenize_matches_reference_pattern(text):
  regex = pytest.importorskip("regex")
  pattern = regex.compile(
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
  )
  assert T.pretokenize(text) == pattern.findall(text)
  cleaned = T.clean_text(text)
  assert T.pretokenize(cleaned) == pattern.findall(cleaned)


@settings(max_examples=100, deadline=None)
@given(st.text(st.sampled_from("abcxyz019.,!?'-+ ſéü日"), max_size=40))
def test_decode_then_encode_is_stable(tok, text):
  ids = tok.encode(text)
  assert tok.encode(tok.decode(ids)) == ids
