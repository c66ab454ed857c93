"""The layering contract, checked at run time and in the source.

engine/ is the ground floor and imports nothing else of sdtrt's; export/ and runtime/ stand on the
engine and never on each other; the face (sdtrt/: public API and CLI) stands on all three. The
runtime never imports torch, diffusers or transformers, and ONNX Runtime only once a session opens.

Each run-time check imports in a fresh interpreter: this one has loaded whatever earlier tests did.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("engine", "export", "runtime")  # top-level folders = sdtrt.<name>
FACE = "the face"  # sdtrt itself and its own modules (sdtrt.cli, ...), standing on everything
FRAMEWORKS = ("torch", "diffusers", "transformers")
ACCELERATORS = ("onnxruntime", "openvino", "tensorrt", "cuda")  # cuda: cuda-bindings
PRINT_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def _run_fresh(code: str) -> Any:
    """Run code in a fresh interpreter; the JSON value it printed on its last stdout line."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _matches(module: str, name: str) -> bool:
    """Whether a module is `name` or inside it; FACE means sdtrt outside its three subpackages."""
    if name == FACE:
        parts = module.split(".")
        return parts[0] == "sdtrt" and (len(parts) == 1 or parts[1] not in SUBPACKAGES)
    return module == name or module.startswith(name + ".")


def _loaded(modules: list[str], names: tuple[str, ...]) -> list[str]:
    return [m for m in modules if any(_matches(m, name) for name in names)]


# -- run time: what an import loads ---------------------------------------------------------------


@pytest.mark.parametrize("module", ["sdtrt.engine.errors", "sdtrt.engine.manifest"])
def test_engine_import_loads_only_the_engine(module):
    modules = _run_fresh(f"import {module}\n{PRINT_MODULES}")
    assert module in modules
    assert not _loaded(modules, ("sdtrt.runtime", "sdtrt.export", "sdtrt.cli", "PIL", *FRAMEWORKS, *ACCELERATORS))


@pytest.mark.parametrize("module", ["sdtrt.runtime", "sdtrt.runtime.pipeline"])
def test_runtime_import_loads_no_ml_framework_nor_onnxruntime(module):
    modules = _run_fresh(f"import {module}\n{PRINT_MODULES}")
    assert module in modules
    assert not _loaded(modules, ("sdtrt.export", "sdtrt.cli", *FRAMEWORKS, *ACCELERATORS))


def test_cli_help_is_light_and_quick():
    code = """
import json, sys, time
start = time.process_time()
from sdtrt.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
print(json.dumps({"cpu_s": time.process_time() - start, "modules": sorted(sys.modules)}))
"""
    result = _run_fresh(code)
    assert "sdtrt.cli" in result["modules"]
    assert not _loaded(result["modules"], (*FRAMEWORKS, *ACCELERATORS))
    # ~0.2 s on an idle 2-core box; CPU time, which a busy machine distorts less than wall time
    assert result["cpu_s"] < 1.0, result["cpu_s"]


# -- the source: every import statement of engine/, export/, runtime/ ------------------------------


@dataclass(frozen=True)
class Rule:
    """What a subpackage may not import: `never` at all, `lazy_only` outside a function."""

    never: tuple[str, ...]
    lazy_only: tuple[str, ...] = ()


RULES = {
    # the engine opens sessions itself, so it may import the accelerators, but only when one opens
    "engine": Rule(never=("sdtrt.runtime", "sdtrt.export", FACE, *FRAMEWORKS), lazy_only=ACCELERATORS),
    "runtime": Rule(never=("sdtrt.export", FACE, *FRAMEWORKS), lazy_only=ACCELERATORS),
    "export": Rule(never=("sdtrt.runtime", FACE)),  # torch and the rest are what exporting is
}


def _imports(path: Path, root: Path) -> Iterator[tuple[str, int, bool]]:
    """(module, line, inside a function) for each module a file imports; relative ones resolved."""
    package = ["sdtrt", *path.relative_to(root).parts[:-1]]

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, child.lineno, nested
            elif isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                module = ".".join([*base, *([child.module] if child.module else [])])
                for alias in child.names:  # `from sdtrt import engine` imports sdtrt.engine
                    yield (f"{module}.{alias.name}" if module == "sdtrt" else module), child.lineno, nested
            yield from walk(child, nested)

    yield from walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), False)


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    where = path.relative_to(root)
    rule = RULES[where.parts[0]]
    found = []
    for module, line, in_function in _imports(path, root):
        for name in rule.never:
            if _matches(module, name):
                found.append(f"{where}:{line} imports {module}")
        for name in rule.lazy_only:
            if _matches(module, name) and not in_function:
                found.append(f"{where}:{line} imports {module} at module level")
    return found


SOURCES = sorted(path for folder in SUBPACKAGES for path in (ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_source_imports_follow_the_layers(path):
    violations = _violations(path)
    assert not violations, violations


def test_the_source_check_sees_violations(tmp_path):
    """The static check itself: each kind of forbidden import is reported, the allowed ones are not."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "runtime" / "schedulers").mkdir(parents=True)
    engine = tmp_path / "engine" / "bad.py"
    engine.write_text(
        "import sdtrt.cli\nfrom sdtrt import runtime\nimport tensorrt\n"
        "from sdtrt.engine import errors\ndef f():\n    import onnxruntime\n    import torch\n"
    )
    scheduler = tmp_path / "runtime" / "schedulers" / "bad.py"
    scheduler.write_text("from . import base\nfrom .. import tokenizer\nfrom ... import export\nimport sdtrt\n")
    assert [v.split(" ", 1)[1] for v in _violations(engine, tmp_path)] == [
        "imports sdtrt.cli",
        "imports sdtrt.runtime",
        "imports tensorrt at module level",
        "imports torch",
    ]
    assert [v.split(" ", 1)[1] for v in _violations(scheduler, tmp_path)] == ["imports sdtrt.export", "imports sdtrt"]
