"""The documentation's runnable examples run as written (CPU): a stale name in one fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import rel_err

import ringattn

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / doc).read_text(), re.DOTALL | re.MULTILINE)


def test_readme_use_example_runs_and_matches_its_oracle():
    """README's first example: the module, the function and the oracle it points to."""
    scope: dict = {}
    exec(python_blocks("README.md")[0], scope)
    assert scope["out"].shape == scope["q"].shape
    assert rel_err(scope["out"], scope["ref"]) <= 1e-5


def test_readme_models_example_runs_and_decodes_as_the_full_forward():
    """README's LongNet example: train step, KV-cache decoding equal to the full forward."""
    (code,) = [b for b in python_blocks("README.md") if "new_caches" in b]
    scope: dict = {}
    exec(code, scope)
    assert rel_err(scope["incremental"], scope["full"]) <= 1e-5
    assert scope["text"].shape == (2, 24)


@pytest.mark.parametrize("doc, index", [("docs/architecture.md", 0)])
def test_doc_example_runs(doc, index):
    scope: dict = {}
    exec(python_blocks(doc)[index], scope)
    assert isinstance(scope["out"], torch.Tensor) and scope["out"].shape == scope["q"].shape


def test_the_new_strategy_example_passes_ci_and_the_oracle(tmp_path):
    """docs/adding_a_strategy.md's module, followed literally: CI's ruff and mypy pass it (they
    failed it: its imports unsorted, and ``backward(*(generator), causal, scale)`` wrong to
    mypy), and it computes the oracle's output and gradients."""
    import subprocess
    import sys

    from ringattn import reference, registry

    (code,) = [b for b in python_blocks("docs/adding_a_strategy.md") if "chunked.py" in b]
    path = tmp_path / "chunked.py"
    path.write_text(code)
    config = str(ROOT / "pyproject.toml")
    for check in (
        ["ruff", "check", "--config", config],
        ["ruff", "format", "--check", "--config", config],
        ["mypy", "--config-file", config, "--no-incremental"],
    ):
        done = subprocess.run([sys.executable, "-m", *check, str(path)], capture_output=True)
        assert done.returncode == 0, (check, done.stdout.decode(), done.stderr.decode())
    scope: dict = {}
    try:
        exec(code, scope)
        strategy = ringattn.Strategy(computer="chunked")
        options = {"segment_lengths": (4, 8), "dilation_rates": (1, 2), "causal": True}
        q, k, v = (
            torch.randn(6, 12, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)
        )
        out = ringattn.DilatedAttention(**options, strategy=strategy)(q, k, v)
        ref = reference.dilated_attention(q, k, v, **options)
        assert rel_err(out, ref) <= 1e-10
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        assert max(rel_err(g, r) for g, r in zip(grads, ref_grads)) <= 1e-10
    finally:
        registry.unregister("computer", "chunked", missing_ok=True)


def test_the_ablation_notebooks_help_is_the_current_one():
    """notebooks/02_ablation.ipynb shows ablate's --help as stored output: it had gone stale
    (no --import line). Compared word for word (the stored width may differ)."""
    import json

    from experiments.ablate import build_parser

    notebook = json.loads((ROOT / "notebooks" / "02_ablation.ipynb").read_text())
    (cell,) = [
        c
        for c in notebook["cells"]
        if c["cell_type"] == "code" and 'main(["--help"])' in "".join(c["source"])
    ]
    stored = "".join("".join(o.get("text", "")) for o in cell["outputs"])
    assert stored.split() == build_parser().format_help().split()


def _slugs(markdown: str) -> set[str]:
    """GitHub's anchors for ``markdown``'s headings (outside code fences): lower case, every
    character but letters, digits, ``_``, ``-`` and spaces dropped, spaces as ``-``, a repeated
    heading's anchor suffixed ``-1``, ``-2``..."""
    slugs: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-")
            repeat = 0
            while (candidate := slug if repeat == 0 else f"{slug}-{repeat}") in slugs:
                repeat += 1
            slugs.add(candidate)
    return slugs


def _relative_links(doc: Path) -> list[str]:
    """``doc``'s Markdown links and images that point into the repository (not code blocks')."""
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.DOTALL | re.MULTILINE)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z]+:", t)]


def broken_links(doc: Path) -> list[str]:
    """``doc``'s relative links whose file, or heading in a Markdown file, does not exist."""
    broken = []
    for target in _relative_links(doc):
        path, _, anchor = target.partition("#")
        file = doc.parent / path if path else doc
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _slugs(file.read_text()):
            broken.append(f"{target} (no such heading)")
    return broken


# the hand-written docs (the recorded runs' own .md files under docs/benchmarks/*/ link nothing)
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("docs/**/*.md"))]
DOCS = [doc for doc in DOCS if doc.count("/") <= 2]


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_reaches_a_file_and_its_heading(doc):
    """The docs link hundreds of recorded files and sections by hand; a renamed file or heading
    left a link that led nowhere."""
    assert not broken_links(ROOT / doc)


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    heading = "# Two GPUs: 2×H200 (`x/y_z/`)\n\n## Where it stands (read this first)\n"
    (tmp_path / "a.md").write_text(heading)
    assert _slugs(heading) == {"two-gpus-2h200-xy_z", "where-it-stands-read-this-first"}
    (tmp_path / "b.md").write_text(
        "[ok](a.md#two-gpus-2h200-xy_z) [ok](#here) ![gone](img/none.png) [gone](a.md#nowhere)"
        "\n\n## Here\n\n```\n[in a code block](not/checked.md)\n```\n"
    )
    assert broken_links(tmp_path / "b.md") == [
        "img/none.png (no such file)",
        "a.md#nowhere (no such heading)",
    ]
