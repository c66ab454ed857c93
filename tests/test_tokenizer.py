"""runtime.tokenizer against transformers' CLIPTokenizer, called the way diffusers calls it."""

from __future__ import annotations

import json
import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdtrt.engine import clip_bpe
from sdtrt.engine.errors import InvalidInputError, ManifestError
from sdtrt.runtime import clip_text
from sdtrt.runtime import tokenizer as tokmod
from sdtrt.runtime.tokenizer import CLIPTokenizer

transformers = pytest.importorskip("transformers")

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LONG = (
    "a breathtaking matte painting of a sprawling cyberpunk metropolis at dusk, neon signs reflected in "
    "rain-soaked streets, flying cars weaving between towering skyscrapers, volumetric fog, god rays, "
    "intricate details, highly detailed, sharp focus, trending on artstation, by greg rutkowski and "
    "alphonse mucha, unreal engine 5, octane render, 8k, hdr, cinematic lighting, masterpiece"
)
CORPUS = [
    # everyday prompts
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of An ASTRONAUT Riding A Horse On MARS",
    "portrait of a cat wearing a tiny wizard hat, studio lighting, 85mm, f/1.8",
    "a red cube on top of a blue sphere",
    "ultra-realistic, (masterpiece:1.2), [[best quality]], {detailed}, <lora:foo:0.7>",
    "oil painting, van gogh style, starry night over new york",
    "photograph of a dog, bokeh, shallow depth-of-field!!!",
    "low-poly 3d render of a fox",
    # accents, composed vs decomposed, other scripts
    "café crème brûlée à la carte, naïve façade",
    "cafe\u0301 cre\u0300me bru\u0302le\u0301e",  # combining marks: NFC turns them into é è û
    "Ångström Æsir Øresund ß straße STRASSE",
    "İstanbul'da ISTANBUL ıi ΟΔΟΣ Σίσυφος ΣΑΣ",  # dotted capital I, Greek capital sigma
    "東京の夜景、ネオンサイン、雨 (tokyo at night)",
    "一只可爱的熊猫在竹林里吃竹子",
    "서울의 벚꽃 거리, 봄날 오후",
    "Красивый закат над морем, масляная живопись",
    "منظر طبيعي جميل عند غروب الشمس",
    "שקיעה מעל הים",
    "सूर्यास्त के समय ताज महल",
    "ภูเขาและทะเลสาบยามเช้า",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e"
    "\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G"
    "\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358"
    "\u0328\u0335\u0339\u033b\u031d\u0333",  # zalgo: long combining runs to reorder
    "\u1e69\u0323 vs s\u0323\u0307 vs s\u0307\u0323 and \u1100\u1161\u11a8 hangul jamo",
    "fullwidth ＡＢＣ １２３ ！？ and ligature ﬁ ﬂ",
    # punctuation, apostrophes, contractions
    "it's a dog's life, we're here, they'll go, I'd say, you've won, I'm done, don't",
    "IT'S THEY'LL WE'RE I'M Don'T",
    "''quoted'' 's 're rock'n'roll ' s",
    "what?!?! ...wait... --- *** ### @@@ $$$ %%% ^^^ &&& ((())) [[[]]]",
    "hello,world;foo:bar|baz/qux\\quux",
    "“smart quotes” ‘single’ «guillemets» — em-dash – en-dash … ellipsis",
    "ok!",
    "!!!",
    # digits and numbers
    "1girl, 2boys, 3d, 4k, 8k uhd, 1920x1080, 16:9",
    "the year 2024 and 31415926535897932384626433832795028841971",
    "version 1.2.3-rc4, 50% off, $19.99, -273.15°C, 1e10, 0x1F",
    "Ⅻ ² ³ ½ ¾ ٣ ۴ ५ 〇 ⑩",
    # emoji
    "a happy dog 🐶🐕 with a ball ⚽",
    "family 👨\u200d👩\u200d👧\u200d👦 and couple 👩\u200d❤\ufe0f\u200d👨",
    "thumbs 👍🏻👍🏼👍🏽👍🏾👍🏿 waves 👋🏽",
    "flags 🇯🇵🇺🇸🏳️\u200d🌈 keycap 1\ufe0f\u20e3",
    "🔥🔥🔥 fire 🔥",
    # whitespace of all kinds
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeed",
    "nbsp\u00a0between\u00a0words and\u3000ideographic\u3000space",
    "thin\u2009space, en\u2002space, line\u2028sep, para\u2029sep, nel\x85x",
    "zero\u200bwidth\u200cjoiners\u200d and \ufeffbom and \x1cfile sep",
    "   leading and trailing spaces   ",
    "many     inner      spaces",
    "",
    " ",
    "    \t\n  ",
    # the special tokens written into a prompt
    f"{BOS}",
    f"{EOS}",
    f"a cat {EOS} a dog",
    f"{BOS}a cat{EOS}",
    "<|ENDOFTEXT|> <|StartOfText|> <|endoftext <|end of text|>",
    f"x{EOS}{EOS}y{BOS}",
    "<| |> < | > </w> w</w>",
    # casing
    "UPPER lower MiXeD cAsE",
    "McDonald's iPhone eBay PostgreSQL",
    # misc
    "a" * 100,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "https://example.com/path?query=1&x=y#frag",
    "user@example.com C++ C# F# .NET node.js",
    # far over 77 tokens
    LONG,
    LONG + ", " + LONG,
    " ".join(["cat"] * 200),
    "🐶" * 80,
    "東京" * 60,
]
assert len(CORPUS) >= 60


def reference(tok, prompts):
    """What diffusers' StableDiffusionPipeline feeds the text encoder (as numpy, not torch)."""
    return tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="np"
    ).input_ids


@pytest.fixture(scope="module")
def ours(clip_tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_dir(clip_tokenizer_dir)


@pytest.fixture(scope="module")
def theirs(clip_tokenizer_dir: Path):
    return transformers.CLIPTokenizer.from_pretrained(clip_tokenizer_dir)


def test_attributes(ours, theirs):
    assert ours.max_length == theirs.model_max_length == 77
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )


@pytest.mark.parametrize("prompt", CORPUS, ids=range(len(CORPUS)))
def test_corpus_matches_transformers(ours, theirs, prompt):
    got = ours(prompt)
    assert got.dtype == np.int32 and got.shape == (1, 77)
    np.testing.assert_array_equal(got, reference(theirs, prompt))
    assert ours.encode(prompt) == theirs(prompt, add_special_tokens=False).input_ids


def test_batch_matches_transformers(ours, theirs):
    got = ours(CORPUS)
    assert got.shape == (len(CORPUS), 77)
    np.testing.assert_array_equal(got, reference(theirs, CORPUS))
    np.testing.assert_array_equal(ours(tuple(CORPUS[:3])), reference(theirs, CORPUS[:3]))
    assert ours([]).shape == (0, 77)


ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("      .,;:!?'\"-_()[]{}<>|/\\@#$%^&*+=~`")
    + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL"]
    + [BOS, EOS, "<|", "|>", "endoftext", "ENDOFTEXT", "</w>"]
    + list("\t\n\r\x0b\x0c\x85\xa0\u1680\u2002\u2009\u200a\u2028\u2029\u202f\u205f\u3000\x1c\x1f\u200b\ufeff")
    + list("éèêëàâäôöûüçñÉÈÀÇÑÅåßøØæÆœıİ")
    + ["\u0301", "\u0300", "\u0308", "\u0327", "\u0323", "\u0307", "\u0316", "\u0334", "\u0345", "\u05b0"]
    + ["\u1ac0", "\u0898", "\u1dfa", "\u0c3c", "\U00011935\U00011930", "\U00011938"]  # post-Unicode-9 marks
    + list("αβγδΣσςΟΔΩωάέ")
    + list("абвгдАБВГДЁёЖжЯя")
    + list("ابتثجحخ")
    + list("אבגד")
    + list("東京の夜景日本語中文字한국어가각ㄱㅏ")
    + list("กขคंा्")
    + list("٠١٢३४５")
    + list("ⅫⅯ½²ﬁＡａ")
    + ["\ua7cb", "\ua7dc", "\U00010d50", "\U00010d70", "\U00016ea0", "\u1c89"]
    + ["\U000105c0", "\U00010d40", "\U0001e5d0", "\U00031350", "\u0558"]  # Unicode 15-17 letters/digits
    + list("🐶🔥👍🏻🏿👨👩👧❤⚽🇯🇵")
    + ["\u200d", "\ufe0f", "\u20e3"]
    + ["\U0010ffff", "\ue000", "\x00", "\x7f"]
)


def random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(ALPHABET, k=rng.randint(0, 40))) for _ in range(n)]


def test_random_strings_match_transformers(ours, theirs):
    prompts = random_prompts(3000, seed=1234)
    expected = theirs(prompts, add_special_tokens=False).input_ids
    for prompt, ids in zip(prompts, expected, strict=True):
        assert ours.encode(prompt) == ids, repr(prompt)
    np.testing.assert_array_equal(ours(prompts), reference(theirs, prompts))


def test_truncation_warning(ours, theirs, caplog):
    caplog.set_level(logging.WARNING, logger="sdtrt.runtime.tokenizer")
    fits = " ".join(["cat"] * 75)  # 75 words of one token each: exactly bos + 75 + eos
    ours(fits)
    ours(["a photo", fits, ""])
    assert caplog.records == []

    over = fits + " dragon wings"
    got = ours(over)
    np.testing.assert_array_equal(got, reference(theirs, over))
    assert got[0, -1] == ours.eos_id
    (record,) = caplog.records
    assert record.name == "sdtrt.runtime.tokenizer" and record.levelno == logging.WARNING
    assert record.getMessage() == 'prompt truncated to 77 tokens; dropped: "dragon wings"'

    # diffusers names the same words: it decodes the ids between position 76 and the final eos
    untruncated = theirs(LONG + " " + LONG, padding="longest", return_tensors="np").input_ids
    (removed,) = theirs.batch_decode(untruncated[:, theirs.model_max_length - 1 : -1])
    caplog.clear()
    ours([LONG + " " + LONG, "short", over])
    assert len(caplog.records) == 2  # one per truncated prompt
    assert caplog.records[0].getMessage() == f'prompt truncated to 77 tokens; dropped: "{removed}"'


def test_a_huge_prompt_logs_how_much_was_dropped_and_its_start_only(ours, caplog):
    caplog.set_level(logging.WARNING, logger="sdtrt.runtime.tokenizer")
    ours("dragon " * 200_000)  # 1.4 MB of text, 200000 tokens
    (record,) = caplog.records
    message = record.getMessage()
    assert message.startswith('prompt truncated to 77 tokens; dropped 199925 tokens: "dragon dragon ')
    assert message.endswith(' ..."') and len(message) < 400


def test_decode_matches_transformers(ours, theirs):
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(49408) if rng.random() < 0.7 else rng.randrange(512) for _ in range(rng.randint(0, 12))]
        ids += [49406, 49407] if rng.random() < 0.2 else []
        assert ours.decode(ids) == theirs.decode(ids), ids
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), ids
    for prompt in CORPUS[:20]:
        assert ours.decode(ours.encode(prompt)) == theirs.decode(ours.encode(prompt))


def test_rejects_non_string_prompts(ours):
    with pytest.raises(InvalidInputError):
        ours(["ok", None])


def test_bpe_cache_is_used(ours):
    ours.encode("zebra zebra zebra")
    assert ours._piece_ids.cache_info().hits >= 2


# -- other tokenizer folders ----------------------------------------------------------------------


def _at(content: str, normalized: bool = True) -> dict:
    """An AddedToken as SD checkpoints on the Hub store it in their configs."""
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": normalized,
            "rstrip": False, "single_word": False}  # fmt: skip


def _entry(content: str, normalized: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}  # fmt: skip


VARIANTS = {
    # SD 2.x: OpenCLIP's tokenizer pads with "!", which transformers then also cuts out of prompts
    "pad_bang": ({"pad_token": "!"}, {"pad_token": "!"}),
    # runwayml/stable-diffusion-v1-5 style: AddedToken objects with normalized=true
    "sd15_hub": (
        {
            "bos_token": _at(BOS),
            "eos_token": _at(EOS),
            "unk_token": _at(EOS),
            "pad_token": EOS,
            "do_lower_case": True,
            "errors": "replace",
        },
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "unk_token": _at(EOS), "pad_token": EOS},
    ),
    # stabilityai/stable-diffusion-2-1 style
    "sd21_hub": (
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "unk_token": _at(EOS), "pad_token": "!"},
        {"bos_token": _at(BOS), "eos_token": _at(EOS), "unk_token": _at(EOS), "pad_token": "!"},
    ),
    # saved by a newer transformers: added_tokens_decoder decides the flags
    "added_tokens_decoder": (
        {
            "pad_token": "!",
            "added_tokens_decoder": {"49406": _entry(BOS, True), "49407": _entry(EOS, False), "0": _entry("!", True)},
        },
        {"pad_token": EOS},  # ignored once tokenizer_config.json has added_tokens_decoder
    ),
    "unk_only_normalized": ({"unk_token": _at(EOS)}, None),
    "new_pad_token": ({"pad_token": "<pad>", "model_max_length": 32}, None),
    "no_configs": (None, None),
    "additional_special_tokens": ({"additional_special_tokens": ["<extra>", "cat"]}, None),
}
VARIANT_PROMPTS = [
    "hello! world!!",
    "!",
    "wow!?!",
    "<|ENDOFTEXT|>x <|StartOfText|>",
    f"a{EOS}b{BOS}c",
    "<pad> <PAD>",
    "a cat, a Cat, a catalog <extra><EXTRA>",
    LONG,
]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_config_variants_match_transformers(clip_tokenizer_dir, tmp_path, name):
    config_update, special_map = VARIANTS[name]
    folder = tmp_path / name
    shutil.copytree(clip_tokenizer_dir, folder)
    config_path, map_path = folder / "tokenizer_config.json", folder / "special_tokens_map.json"
    if config_update is None:
        config_path.unlink()
    else:
        config = json.loads(config_path.read_text())
        config.update(config_update)
        config_path.write_text(json.dumps(config))
    if special_map is None:
        map_path.unlink()
    else:
        map_path.write_text(json.dumps(special_map))

    theirs = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_dir(folder)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        theirs.bos_token_id,
        theirs.eos_token_id,
        theirs.pad_token_id,
    )
    if theirs.model_max_length < 10**9:
        assert ours.max_length == theirs.model_max_length
    else:  # no model_max_length: transformers means "unbounded", the runtime uses CLIP's 77
        assert ours.max_length == 77
        theirs.model_max_length = 77
    prompts = VARIANT_PROMPTS + CORPUS[::4]
    np.testing.assert_array_equal(ours(prompts), reference(theirs, prompts))
    ids = ours(VARIANT_PROMPTS[:2])[0].tolist()
    assert ours.decode(ids) == theirs.decode(ids)


def test_pad_bang_cuts_out_exclamation_marks(clip_tokenizer_dir, tmp_path):
    folder = tmp_path / "sd2"
    shutil.copytree(clip_tokenizer_dir, folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = json.loads((folder / name).read_text())
        data["pad_token"] = "!"
        (folder / name).write_text(json.dumps(data))
    ours = CLIPTokenizer.from_dir(folder)
    bang = ours._vocab["!"]
    assert ours.pad_id == bang == 0
    row = ours("hi!")[0]
    assert row[:4].tolist() == [ours.bos_id, ours._vocab["hi</w>"], bang, ours.eos_id]
    assert (row[4:] == bang).all()


# -- broken folders -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "match"),
    [
        ("no_vocab", "vocab.json is missing"),
        ("vocab_not_json", "vocab.json is not valid JSON"),
        ("vocab_list", "not a JSON object of token"),
        ("no_merges", "merges.txt is missing"),
        ("bad_merge_line", "line 3 is not a merge"),
        ("merge_not_in_vocab", "is not in vocab.json"),
        ("config_not_json", "tokenizer_config.json is not valid JSON"),
        ("bad_max_length", "model_max_length"),
        ("no_folder", "does not exist"),
    ],
)
def test_broken_folder_is_manifest_error(clip_tokenizer_dir, tmp_path, breakage, match):
    folder = tmp_path / "tok"
    shutil.copytree(clip_tokenizer_dir, folder)
    merges = folder / "merges.txt"
    if breakage == "no_vocab":
        (folder / "vocab.json").unlink()
    elif breakage == "vocab_not_json":
        (folder / "vocab.json").write_text('{"a": 1,')
    elif breakage == "vocab_list":
        (folder / "vocab.json").write_text("[1, 2]")
    elif breakage == "no_merges":
        merges.unlink()
    elif breakage == "bad_merge_line":
        lines = merges.read_text().split("\n")
        lines[2] = "abc"
        merges.write_text("\n".join(lines))
    elif breakage == "merge_not_in_vocab":
        merges.write_text(merges.read_text() + "zzzq zzzr\n")
    elif breakage == "config_not_json":
        (folder / "tokenizer_config.json").write_text("{")
    elif breakage == "bad_max_length":
        (folder / "tokenizer_config.json").write_text('{"model_max_length": "77"}')
    elif breakage == "no_folder":
        folder = tmp_path / "missing"
    with pytest.raises(ManifestError, match=match) as info:
        CLIPTokenizer.from_dir(folder)
    assert "\n" not in str(info.value)


# -- the Unicode tables, code point by code point -------------------------------------------------

ALL_CHARS = "".join(chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF)


def test_normalizer_matches_on_every_code_point(theirs):
    # "\x00" between characters: NFC, whitespace and lowercase then act on each one alone
    joined = "\x00".join(ALL_CHARS)
    assert clip_text.normalize(joined) == theirs.backend_tokenizer.normalizer.normalize_str(joined)


def test_pre_tokenizer_matches_on_every_code_point(theirs):
    # every code point in order: a letter, digit or whitespace table error moves a piece boundary
    pieces = [
        word.encode("utf-8").decode("latin-1").translate(tokmod._BYTE_TO_CHAR)
        for piece in clip_text.CLIP_SPLIT.findall(ALL_CHARS)
        for word in clip_text.BYTE_LEVEL_SPLIT.findall(piece)
    ]
    assert pieces == [p for p, _ in theirs.backend_tokenizer.pre_tokenizer.pre_tokenize_str(ALL_CHARS)]
    # the ASCII shortcut splits ASCII text as the full regex does
    rng = random.Random(5)
    for _ in range(200):
        text = "".join(rng.choices([chr(c) for c in range(128)] + ["'s", "'ll", BOS, EOS], k=30))
        assert clip_text.CLIP_SPLIT_ASCII.findall(text) == clip_text.CLIP_SPLIT.findall(text)


def test_canonical_ordering_matches(theirs):
    import unicodedata

    normalizer = theirs.backend_tokenizer.normalizer
    marks = [c for c in ALL_CHARS if unicodedata.combining(c)]
    rng = random.Random(3)
    samples = ["a" + "".join(rng.choices(marks, k=4)) for _ in range(3000)]
    samples += ["x" + m + ref for m in marks for ref in ("\u0334", "\u0316", "\u0301", "\u0345")]
    samples += ["\U00011935\U00011930", "e\u0301\U00011930\u0301", "\u1100\u1161\u11a8", "\u0915\u093c"]
    for text in samples:
        assert clip_text.normalize(text) == normalizer.normalize_str(text), [hex(ord(c)) for c in text]


def test_runtime_imports_no_ml_framework():
    code = (
        "import sys, sdtrt.runtime.tokenizer; "
        "bad = [m for m in ('torch', 'transformers', 'tokenizers', 'diffusers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_byte_map_shared_with_the_exporter():
    from sdtrt.export import clip_vocab

    assert clip_vocab.bytes_to_unicode is tokmod.bytes_to_unicode is clip_bpe.bytes_to_unicode
    assert (clip_vocab.BOS, clip_vocab.EOS, clip_vocab.END_OF_WORD) == (BOS, EOS, "</w>")
    assert (tokmod.BOS, tokmod.EOS, tokmod.END_OF_WORD) == (BOS, EOS, "</w>")
    table = clip_bpe.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table == tokmod._BYTE_TO_CHAR
    code = "import sys, sdtrt.runtime.tokenizer; assert 'sdtrt.export' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
