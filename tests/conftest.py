"""Shared fixtures: tiny models and their exports are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def clip_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real CLIP BPE tokenizer folder (vocab.json + merges.txt, 49408 ids)."""
    from sdtrt.export.clip_vocab import write_clip_tokenizer

    out = tmp_path_factory.mktemp("clip_tokenizer")
    write_clip_tokenizer(out)
    return out
