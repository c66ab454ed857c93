"""CLIP byte-pair constants that the runtime's tokenizer and the exporter's vocabulary writer share.

The one definition of each: sdtrt.runtime.tokenizer encodes with them, sdtrt.export.clip_vocab
writes vocab.json with them; neither imports the other.
"""

END_OF_WORD = "</w>"  # BPE's mark on the last symbol of a word
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's start- and end-of-text tokens


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (BPE never sees raw bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + len(chars) - 188)  # 188 printable bytes; the rest go to 256, 257, ...
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}
