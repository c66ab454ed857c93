"""CLIP tokenizer files (vocab.json, merges.txt) built from the CLIP byte-pair vocabulary.

The vocabulary is OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz (assets/, MIT licensed). The files
written here are the ones Hugging Face's CLIP tokenizers use: 256 byte symbols, the same with the
end-of-word mark "</w>", one token per merge, then <|startoftext|> and <|endoftext|> (49408 ids).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from sdtrt.engine.clip_bpe import BOS, END_OF_WORD, EOS, bytes_to_unicode  # shared with the runtime
from sdtrt.engine.fsutil import write_bytes_atomic, write_json_atomic

BPE_ASSET = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49408 = 2 * 256 bytes + merges + 2 specials


def clip_merges() -> list[str]:
    lines = gzip.decompress(BPE_ASSET.read_bytes()).decode("utf-8").split("\n")
    return lines[1 : NUM_MERGES + 1]  # the first line is a version header


def write_clip_tokenizer(out_dir: str | Path, model_max_length: int = 77, pad_token: str = EOS) -> None:
    """Write vocab.json, merges.txt and the configs that transformers' CLIPTokenizer loads.

    ``pad_token`` is EOS for OpenAI CLIP (SD 1.x) and "!" for OpenCLIP tokenizers (SD 2.x, x4 upscaler).
    """
    out_dir = Path(out_dir)
    merges = clip_merges()
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "vocab.json", vocab)
    write_bytes_atomic(out_dir / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode())
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_json_atomic(out_dir / "special_tokens_map.json", specials)
    write_json_atomic(
        out_dir / "tokenizer_config.json",
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, **specials},
    )
