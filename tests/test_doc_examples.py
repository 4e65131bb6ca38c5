"""Every ```python example in README.md and docs/*.md runs.

Each block runs in its own fresh namespace, in a temporary working directory, with the data
directory of the tests (``../shared/data``, from conftest.py). Documentation examples are
fragments about "your model", so the namespace starts with ``rmtprune`` and ``torch``
imported and the placeholders they use (see :func:`_prelude`): ``MyNet`` (a small MNIST MLP
with ``fc1``, ``fc2``), ``model`` and ``fresh_model`` (two instances), ``opt``, ``epoch``,
``loader`` / ``train_batches`` (a few MNIST batches), and the files ``model.safetensors`` and
``model.pt`` in the working directory.

An example that cannot run fast may be marked with ``<!-- example: skip (reason) -->`` on the
line before its fence; it is reported as skipped with that reason. Examples must not use the
deprecated module paths, and a ``DeprecationWarning`` from rmtprune inside one is an error.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)```+\s*(\S*)")
_SKIP = re.compile(r"<!--\s*example:\s*skip\s*(?:\((?P<reason>.*)\))?\s*-->")
# Module paths kept only as deprecated aliases: documentation shows the new ones.
_DEPRECATED = re.compile(r"\brmtprune\.(data|models)\b(?!\w)")


@dataclass(frozen=True)
class Example:
    """One fenced python block: where it is, its code, and the skip reason if it is marked."""

    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def extract(path: Path, text: str | None = None) -> Iterator[Example]:
    """The ```python blocks of a Markdown file, with a skip marker on the line before the fence."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        start = i
        i += 1
        body = []
        while i < len(lines) and not _FENCE.match(lines[i]):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1  # the closing fence
        if lang not in ("python", "py"):
            continue
        prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        marker = _SKIP.search(prev)
        skip = (marker.group("reason") or "marked skip") if marker else None
        yield Example(path, start + 1, "\n".join(body) + "\n", skip)


EXAMPLES = [ex for path in DOCS for ex in extract(path)]


class MyNet(nn.Module):
    """The docs' "your model": a small MLP for MNIST-shaped inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(784, 64)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.flatten(x))))


def _prelude(cwd: Path) -> dict[str, Any]:
    """The names and files the documentation's fragments take as given."""
    import safetensors.torch

    import rmtprune
    from rmtprune.zoo.data import batches, load_dataset

    torch.manual_seed(0)
    model = MyNet()
    safetensors.torch.save_file(model.state_dict(), str(cwd / "model.safetensors"))
    torch.save(model, cwd / "model.pt")
    train = batches(load_dataset("mnist").subset(512), 128, shuffle=True)
    return {
        "__name__": "__doc_example__",
        "rmtprune": rmtprune,
        "torch": torch,
        "MyNet": MyNet,
        "model": model,
        "fresh_model": MyNet(),
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
        "epoch": 2,
        "loader": train,
        "train_batches": train,
    }


def test_examples_are_found() -> None:
    assert len(EXAMPLES) >= 8, [ex.id for ex in EXAMPLES]
    assert any(ex.path.name == "README.md" for ex in EXAMPLES)


def test_extract_reads_fences_and_skip_markers(tmp_path: Path) -> None:
    text = (
        "intro\n```python\na = 1\n```\n\n<!-- example: skip (downloads 2 GB) -->\n\n"
        "```python\nb = 2\n```\n```bash\nrmtprune --help\n```\n  ```py\n  c = 3\n  ```\n"
    )
    found = list(extract(tmp_path / "x.md", text))
    assert [(ex.line, ex.code, ex.skip) for ex in found] == [
        (2, "a = 1\n", None),
        (8, "b = 2\n", "downloads 2 GB"),
        (14, "c = 3\n", None),
    ]


@pytest.fixture
def registries() -> Iterator[None]:
    """Layer types, rank rules and budgets an example registers are dropped after it (not leaked)."""
    from rmtprune import layers
    from rmtprune.sparsity import budgets
    from rmtprune.spectral import rules

    found = [layers._REGISTRY, rules.RULES, budgets._REGISTRY]
    saved = [dict(r) for r in found]
    yield
    for registry, before in zip(found, saved, strict=True):
        registry.clear()
        registry.update(before)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda ex: ex.id)
def test_example_runs(
    example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registries: None
) -> None:
    if example.skip is not None:
        pytest.skip(f"{example.id}: {example.skip}")
    old = _DEPRECATED.search(example.code)
    assert old is None, f"{example.id} uses the deprecated module {old.group(0)} (rmtprune.zoo.*)"
    monkeypatch.chdir(tmp_path)
    namespace = _prelude(tmp_path)
    code = compile(example.code, example.id, "exec")
    with warnings.catch_warnings():
        # only what the example itself triggers (the library's own imports are not the docs' concern)
        warnings.filterwarnings("error", category=DeprecationWarning, module="__doc_example__")
        exec(code, namespace)  # noqa: S102 - the repository's own documentation
