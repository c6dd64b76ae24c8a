"""What ``pip install ringattn`` puts into site-packages: the library's packages with their type
information, nothing else (the wheel is built here, offline, with this environment's setuptools)."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    # from a copy: setuptools writes build/ and *.egg-info/ next to the sources
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for package in ("ringattn", "experiments"):  # experiments/: must be left out by the config
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(out), str(source)], check=True, capture_output=True)
    (path,) = out.glob("ringattn-*.whl")
    return zipfile.ZipFile(path)


def test_only_the_library_is_installed(wheel):
    """``experiments/`` is scripts run from a checkout; installed, it was a top-level package named
    ``experiments``, a name a user's own project often has (one shadows the other, and two
    distributions that both ship it overwrite each other's files)."""
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ringattn"}
    packages = {
        "/".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "ringattn").rglob("__init__.py")
    }
    shipped = {name.rsplit("/", 1)[0] for name in wheel.namelist() if name.endswith("__init__.py")}
    assert shipped == packages


def test_type_information_is_shipped(wheel):
    """PEP 561: without ``py.typed`` mypy and pyright ignore the library's annotations."""
    assert "ringattn/py.typed" in wheel.namelist()


def test_metadata_has_the_librarys_version_and_license_text(wheel):
    """One source for the version (``ringattn.__version__``, which pyproject reads), and the MIT
    text shipped with the code, as that license asks (pyproject named MIT, no text shipped)."""
    import ringattn

    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    fields = wheel.read(metadata).decode().split("\n\n")[0].splitlines()
    assert f"Version: {ringattn.__version__}" in fields
    assert "License-File: LICENSE" in fields
    (license_text,) = [n for n in wheel.namelist() if n.endswith("LICENSE")]
    assert "Permission is hereby granted" in wheel.read(license_text).decode()


def test_the_sdist_ships_no_tests_it_cannot_run(tmp_path):
    """setuptools put ``tests/test_*.py`` into the sdist without ``conftest.py``, the helper
    modules or the checkout they read (experiments/, docs/): tests that could not run."""
    import tarfile

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(REPO / name, source / name)
    for package in ("ringattn", "tests"):
        ignore = shutil.ignore_patterns("__pycache__", ".hypothesis")
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    build = f"from setuptools import build_meta as b; print(b.build_sdist({str(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / done.stdout.split()[-1]) as sdist:
        names = sdist.getnames()
    assert not [n for n in names if "/tests/" in n]
    assert any(n.endswith("/ringattn/py.typed") for n in names)
    assert any(n.endswith("/LICENSE") for n in names)


def test_console_scripts_run_installed_code(wheel):
    """A console script must point into what is installed (``ringattn``), or it fails with
    ModuleNotFoundError outside a checkout (``ringattn-ablate`` pointed into ``experiments``)."""
    entry_points = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    for name in entry_points:
        parser.read_string(wheel.read(name).decode())
    scripts = dict(parser["console_scripts"]) if parser.has_section("console_scripts") else {}
    outside = {name: aim for name, aim in scripts.items() if not aim.startswith("ringattn")}
    assert not outside, f"console scripts outside the installed library: {outside}"


# a user's own module, type-checked against the installed wheel as mypy sees a dependency: the
# public API as the README shows it, each result's type pinned by an annotation
USER_SCRIPT = """
from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

import ringattn
from ringattn import distributed
from ringattn.models import LongNet, LongNetConfig
from ringattn.nn import KVCache, MultiheadDilatedAttention


def use(q: Tensor, k: Tensor, v: Tensor, x: Tensor, tokens: Tensor, mesh: DeviceMesh) -> Tensor:
    strategy = ringattn.Strategy(dilation="segment_local", computer="sdpa", memory="pooled")
    attn = ringattn.DilatedAttention((64, 128), (1, 2), causal=True, strategy=strategy)
    out: Tensor = attn(q, k, v)
    out = ringattn.dilated_attention(q, k, v, segment_lengths=(64,), dilation_rates=(1,))
    out = ringattn.reference.dilated_attention(q, k, v, segment_lengths=(64,), dilation_rates=(1,))
    strategies: tuple[ringattn.Strategy, ...] = ringattn.Strategy.all()
    mha = MultiheadDilatedAttention(64, 4, (64, 128), (1, 2), causal=True)
    cache: KVCache = mha.new_cache(2, 512)
    y: Tensor = mha(x, cache)
    model = LongNet(LongNetConfig(vocab_size=32, dim=32, depth=1, num_heads=2))
    loss: Tensor = model.loss(tokens, tokens)
    generated: Tensor = model.generate(tokens, 4)
    # README: ``group=`` may be a 1-D DeviceMesh, ``mesh["sp"]``
    shard: Tensor = distributed.shard(q, group=mesh["sp"])
    full: Tensor = distributed.gather(shard, group=mesh["sp"], grad="sum")
    print(len(strategies), y.shape, loss.item(), generated.shape)
    return out + full
"""


def test_a_users_strict_mypy_sees_the_installed_packages_types(wheel, tmp_path):
    """PEP 561 from the user's side: ``mypy --strict`` on a script of the user's own, with the
    wheel installed (its files on the path mypy searches for installed packages), reads
    ``py.typed`` and passes the README's calls. ``distributed.shard`` / ``gather`` took a
    ``DeviceMesh`` at run time, as the README says ``group=`` may be, but were annotated
    ``ProcessGroup | None``: a user's mypy refused ``shard(x, group=mesh["sp"])``."""
    import os

    pytest.importorskip("mypy")
    site = tmp_path / "site"
    wheel.extractall(site)
    script = tmp_path / "user_script.py"
    script.write_text(USER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(site)}
    check = [sys.executable, "-m", "mypy", "--strict", "--no-incremental", script.name]
    # (from tmp_path: no pyproject.toml of the repository's there, so mypy's defaults and
    # --strict alone, as in the user's project)
    done = subprocess.run(check, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# an install without Triton (pyproject asks for it on Linux x86_64 only: macOS and ARM laptops
# have none), run in a process of its own where `import triton` raises ImportError
NO_TRITON_SCRIPT = """
import importlib, pkgutil, sys
sys.modules["triton"] = None  # (None in sys.modules: every `import triton...` raises ImportError)

import torch
import ringattn
from ringattn import reference
from ringattn.kernels import merge

# every module imports but the SM90 kernels' own, which need NVIDIA's CuTe DSL (cutlass)
for info in pkgutil.walk_packages(ringattn.__path__, "ringattn."):
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        assert exc.name.startswith("cutlass"), (info.name, exc.name)
assert merge.triton is None and not merge.available(torch.empty(0))

names = ringattn.registry.names
strategies = [
    ringattn.Strategy(dilation=dilation, computer=computer, memory=memory)
    for dilation in names("dilation")
    for computer in names("computer")
    if computer != "flex"  # (compiled only: minutes on the CPU, and Inductor's C++ needs no Triton)
    for memory in names("memory")
]
for mixing in ("lse", "head_groups"):
    for strategy in strategies:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 13, 3, 8, generator=gen, requires_grad=True) for _ in "qkv")
        config = dict(segment_lengths=(4, 8), dilation_rates=(1, 2), causal=True, mixing=mixing)
        layer = ringattn.DilatedAttention(**config, strategy=strategy, compile=False)
        q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = reference.dilated_attention(q64, k64, v64, **config)
        out = layer(q, k, v)
        dout = torch.randn(out.shape, generator=gen)
        out.backward(dout)
        ref.backward(dout.double())
        for got, want in ((out, ref), (q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            err = float((got.double() - want).norm() / want.norm())
            assert err < 1e-5, (strategy, mixing, err)
print("ok")
"""


def test_an_install_without_triton_imports_and_computes_the_oracles_function():
    """Triton is optional (the CUDA merge, add and fill kernels): without it every module
    imports (the SM90 kernels' own need CuTe instead), the kernels report unavailable, and each
    local strategy but flex (compiled only) computes the oracle's function and gradients. A module
    importing Triton unguarded would break ``import ringattn`` wherever it is missing (the
    test's mutations: one such import in ``kernels/add.py``; the torch merge's weight 0.1% off)."""
    script = [sys.executable, "-c", NO_TRITON_SCRIPT]
    done = subprocess.run(script, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
