"""The documentation's Python blocks are tests: every ```python block of ``docs/**/*.md`` runs.

Each page runs its blocks in order in one namespace (a later block may use what an earlier one
defined), so a page reads like a script. Markers are HTML comments (invisible on the site):

* ``<!-- gpu -->`` on the line(s) right before a block (blank lines allowed): the block needs a
  CUDA GPU. As the very first line of a page: every block of the page needs one.
* ``<!-- skip -->`` right before a block: not run. Only for snippets that cannot run as they stand
  (pseudo-code, a fragment of a user's own model); recipe pages may not use it.
* ``<!-- requires: module -->`` right before a block, or as the page's first line: skipped when
  ``module`` is not importable (an optional dependency such as ``transformers``).

Per page there is a CPU test (the blocks not marked ``gpu``; the Triton kernels run in the
interpreter, so the pages use tiny shapes) and, where the page has ``gpu`` blocks, a test marked
``gpu`` that runs all of the page's blocks in order on the GPU machine.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>```+|~~~+)\s*(?P<info>[^\n`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>[^>]*?)\s*-->\s*$")


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    markers: set[str] = field(default_factory=set)
    requires: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> bool:
        return "gpu" in self.markers

    @property
    def skip(self) -> bool:
        return "skip" in self.markers


def _parse_marker(body: str, markers: set[str], requires: list[str]) -> None:
    body = body.strip()
    if body.startswith("requires:"):
        requires.extend(m.strip() for m in body[len("requires:"):].split(",") if m.strip())
    elif body in ("gpu", "skip"):
        markers.add(body)


def parse_page(path: Path, root: Path = DOCS) -> tuple[set[str], list[str], list[Block]]:
    """``(page_markers, page_requires, python_blocks)`` of one Markdown page."""
    rel = str(path.relative_to(root))
    lines = path.read_text(encoding="utf-8").splitlines()
    page_markers: set[str] = set()
    page_requires: list[str] = []
    if lines:
        m = _MARKER.match(lines[0])
        if m:
            _parse_marker(m.group("body"), page_markers, page_requires)
    blocks: list[Block] = []
    pending: tuple[set[str], list[str]] = (set(), [])
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _MARKER.match(line)
        if m and i > 0:
            _parse_marker(m.group("body"), *pending)
            i += 1
            continue
        f = _FENCE.match(line)
        if f:
            indent, ticks = f.group("indent"), f.group("ticks")
            lang = f.group("info").strip().split()[0].lower() if f.group("info").strip() else ""
            body, j = [], i + 1
            while j < len(lines):
                end = lines[j]
                if end.strip().startswith(ticks) and end.strip().strip(ticks[0]) == "":
                    break
                body.append(end[len(indent):] if end.startswith(indent) else end.lstrip())
                j += 1
            else:
                raise ValueError(f"{rel}:{i + 1}: unclosed code fence")
            if lang in ("python", "py"):
                blocks.append(Block(rel, i + 1, "\n".join(body) + "\n", *pending))
            pending = (set(), [])
            i = j + 1
            continue
        if line.strip():  # any other content cancels markers that were waiting for a block
            pending = (set(), [])
        i += 1
    return page_markers, page_requires, blocks


def _pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


PAGES = {str(p.relative_to(DOCS)): parse_page(p) for p in _pages()}


def _run_blocks(page: str, blocks: list[Block]) -> None:
    # A real (registered) module as the namespace: torch.compile and eager FlexAttention trace the
    # pages' mask_mods with Dynamo, which imports the module their globals belong to.
    name = "flexsparse_docs_" + re.sub(r"\W", "_", page)
    module = types.ModuleType(name)
    sys.modules[name] = module
    try:
        for b in blocks:
            for mod in b.requires:
                if importlib.util.find_spec(mod) is None:
                    pytest.skip(f"{page}:{b.line} needs {mod}")
            code = compile(b.code, f"docs/{page}:{b.line}", "exec")
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                exec(code, module.__dict__)  # noqa: S102 - the documentation's own examples
    finally:
        sys.modules.pop(name, None)


def _check_requires(page: str) -> None:
    for mod in PAGES[page][1]:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{page} needs {mod}")


_CPU_PAGES = [p for p, (mk, _, bl) in PAGES.items() if "gpu" not in mk and any(not b.gpu and not b.skip for b in bl)]
_GPU_PAGES = [p for p, (mk, _, bl) in PAGES.items() if any(not b.skip for b in bl) and ("gpu" in mk or any(b.gpu for b in bl))]


@pytest.mark.parametrize("page", _CPU_PAGES)
def test_page_runs_on_cpu(page):
    """The page's blocks that need no GPU, in order, in one namespace (the recipes pin these
    blocks to the CPU; on a CUDA machine they run the PyTorch paths of the mask builders)."""
    _check_requires(page)
    _, _, blocks = PAGES[page]
    _run_blocks(page, [b for b in blocks if not b.gpu and not b.skip])


@pytest.mark.gpu
@pytest.mark.parametrize("page", _GPU_PAGES)
def test_page_runs_on_gpu(page):
    """All of the page's runnable blocks, GPU ones included, in order."""
    assert torch.cuda.is_available()
    _check_requires(page)
    _, _, blocks = PAGES[page]
    _run_blocks(page, [b for b in blocks if not b.skip])


def test_every_recipe_page_has_code_that_runs():
    """Each recipe page has Python blocks and none of them is skipped: the recipes cannot rot."""
    recipes = [p for p in PAGES if p.startswith("recipes/")]
    assert recipes, "no recipe pages found under docs/recipes/"
    for page in recipes:
        _, _, blocks = PAGES[page]
        assert blocks, f"{page} has no python block"
        skipped = [b.line for b in blocks if b.skip]
        assert not skipped, f"{page}: python blocks marked skip at lines {skipped}; recipes must run"


def test_parser_reads_markers_and_indented_fences(tmp_path):
    """The parser itself: page and block markers, indented fences (admonitions), non-python
    fences ignored, markers cancelled by text in between."""
    page = tmp_path / "p.md"
    page.write_text(
        "<!-- requires: json -->\n# t\n\n```python\na = 1\n```\n\n<!-- gpu -->\n\n```python\nb = 2\n```\n"
        "<!-- skip -->\nsome text\n```python\nc = 3\n```\n!!! note\n    ```python\n    d = 4\n    ```\n"
        "```bash\nls\n```\n",
        encoding="utf-8",
    )
    markers, requires, blocks = parse_page(page, root=tmp_path)
    assert markers == set() and requires == ["json"]
    assert [b.code for b in blocks] == ["a = 1\n", "b = 2\n", "c = 3\n", "d = 4\n"]
    assert [b.gpu for b in blocks] == [False, True, False, False]
    assert [b.skip for b in blocks] == [False, False, False, False]
    assert [b.line for b in blocks] == [4, 10, 15, 19]
