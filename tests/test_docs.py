"""The docs run as written: every ```python block of README.md and docs/*.md is executed.

A block fenced ```python-no-run is not run (only for code that cannot run on a CPU-only machine,
such as CUDA-only code). Shell blocks (```bash) are not run. Relative links must point at files of
the repository.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _blocks():
    """(id, language, code) of every fenced block, ids as ``path:line``."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{path.relative_to(ROOT)}:{line}", m.group(1), m.group(2)))
    return out


BLOCKS = _blocks()
PYTHON = [(i, code) for i, lang, code in BLOCKS if lang == "python"]


def test_docs_have_python_blocks():
    assert PYTHON, "no ```python block found in README.md or docs/"
    langs = {lang for _, lang, _ in BLOCKS}
    assert langs <= {"", "bash", "python", "python-no-run"}, f"unexpected fences: {langs}"


def _needs(code: str):
    """Skip reasons for what the block imports and this environment lacks."""
    if re.search(r"^\s*(from|import) transformers\b", code, re.M):
        pytest.importorskip("transformers")
    if "pyformer.models" in code and importlib.util.find_spec("pyformer.models") is None:
        pytest.skip("pyformer.models is not in this tree")


@pytest.mark.parametrize("code", [c for _, c in PYTHON], ids=[i for i, _ in PYTHON])
def test_python_block_runs(code, tmp_path, monkeypatch):
    _needs(code)
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    torch.manual_seed(0)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})


def test_relative_links_resolve():
    missing = []
    for path in DOCS:
        for target in _LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor on the same page
            file = (path.parent / target.split("#", 1)[0]).resolve()
            if not file.exists() or ROOT not in file.parents and file != ROOT:
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert not missing, "links to nothing in the repository: " + ", ".join(missing)


def test_readme_stays_short():
    """README.md is the front page (what, why, two commands, an example, the map): under 10 KB;
    details go to docs/."""
    size = (ROOT / "README.md").stat().st_size
    assert size < 10_000, f"README.md is {size} bytes; move details to docs/"
