"""A pool of gloo processes that lives for one test module, so CI pays process start-up once.

``DistPool(p).run("case_name", *args)`` runs ``dist_cases.case_name(*args)`` on every rank and
returns the per-rank results, raising with every failing rank's traceback. Every wait has a
timeout, so a hang in the library fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from datetime import timedelta

import torch.multiprocessing as mp

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plugins() -> list[str]:
    """The modules outside ``ringattn`` that registered components here (a strategy kept out of
    the tree, loaded with ``pytest -p``): a spawned rank imports only what it is told, and there
    every such strategy was an "unknown ... strategy"."""
    from ringattn import registry

    modules = {
        registry.get(kind, name).__module__
        for kind in registry.KINDS
        for name in registry.names(kind)
    }
    return sorted(m for m in modules if m.split(".")[0] not in ("ringattn", "__main__"))


def _sources(modules: list[str]) -> list[tuple[str, str | None]]:
    """Each module with its file: one loaded from a path, not through ``sys.path`` (``ablate
    --import FILE.py``, ``importlib.util.spec_from_file_location``), is loaded from it there."""
    return [(m, getattr(sys.modules.get(m), "__file__", None)) for m in modules]


def _import_plugin(module: str, origin: str | None) -> None:
    import importlib
    import importlib.util

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if origin is None or not (exc.name == module or module.startswith(f"{exc.name}.")):
            raise
        spec = importlib.util.spec_from_file_location(module, origin)
        if spec is None or spec.loader is None:
            raise
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[module] = loaded
        spec.loader.exec_module(loaded)


def _worker(rank: int, world_size: int, port: int, tasks, results, path, modules) -> None:
    sys.path[:0] = [TESTS_DIR, *(entry for entry in path if entry not in sys.path)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    import dist_cases

    # (each registers its components, as in the parent). A rank that cannot import one answers
    # every task with why: it died here, and each run waited out its timeout for an "Empty"
    setup_failed = None
    for module, origin in modules:
        try:
            _import_plugin(module, origin)
        except BaseException:
            setup_failed = (
                f"importing {module!r} (it registered a component in the parent process):\n"
                + traceback.format_exc()
            )
            break
    while True:
        item = tasks.get()
        if item is None:
            break
        name, args = item
        if setup_failed is not None:
            results.put((rank, False, setup_failed))
            continue
        try:
            results.put((rank, True, getattr(dist_cases, name)(*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world_size: int) -> None:
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.tasks = [ctx.Queue() for _ in range(world_size)]
        self.results = ctx.Queue()
        port = _free_port()
        extra = (list(sys.path), _sources(plugins()))
        self.procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, self.tasks[r], self.results, *extra),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for proc in self.procs:
            proc.start()

    def run(self, name: str, *args, timeout: float = 180.0) -> list:
        for queue in self.tasks:
            queue.put((name, args))
        outcomes = {}
        for _ in range(self.world_size):
            rank, ok, value = self.results.get(timeout=timeout)
            outcomes[rank] = (ok, value)
        failures = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
        if failures:
            raise AssertionError("\n".join(failures))
        return [outcomes[r][1] for r in range(self.world_size)]

    def close(self) -> None:
        for queue in self.tasks:
            queue.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
