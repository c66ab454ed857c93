"""MkDocs hooks: the site's home page is the README, the repository's front door, with its links into docs/ made
relative to the site (so the two never drift apart); the benchmark plots are served from benchmarks/results/,
where `make bench` writes them, as results/*.png beside the Benchmarks page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

PLOTS = ("cpu.png", "gpu.png")


def _root(config: Any) -> Path:
    return Path(config.config_file_path).parent


def on_files(files: Files, config: Any) -> Files:
    for name in PLOTS:
        files.append(File(f"results/{name}", str(_root(config) / "benchmarks"), config.site_dir, False))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return (_root(config) / "README.md").read_text(encoding="utf-8").replace("](docs/", "](")
