"""Shared fixtures: a tiny SD1.5-shaped base and small datasets, built once per session. Nothing is downloaded."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# huggingface_hub's telemetry fetches a registry from the endpoint the first time a process builds request headers
# online (and caches it in the user's HF_HOME): against the test Hub that was an unhandled request, in whichever test
# of a worker happened to go online first.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Parallel workers (pytest-xdist; docs/architecture.md, "Tests"). Most tests train or run tiny models, which keep
# one core busy at best, or wait on subprocesses (CLI runs, the web UI, torchrun): two workers with one thread each
# should finish the suite sooner on 2 cores than one process with two threads (docs/architecture.md, "Tests").
MAX_WORKERS = 8  # each worker holds torch, the tiny bases and its subprocesses (about 1 GB); see docs


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use (taskset, containers), not the host's
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(cores: int, args: list[str]) -> int:
    """Workers when the command line does not say (-n): none for one file or one test (starting workers, each
    importing torch, costs more than it saves) or on one core; otherwise a worker per core, at most MAX_WORKERS."""
    narrow = len(args) == 1 and not os.path.isdir(args[0].split("::")[0])
    return 0 if narrow or cores < 2 else min(cores, MAX_WORKERS)


def threads_per_process(cores: int, workers: int) -> int:
    """Every worker gets an equal share of the cores, so that they never fight over them."""
    return max(1, cores // max(workers, 1))


def _pytest_args(config) -> list[str]:
    explicit = config.args_source == pytest.Config.ArgsSource.ARGS
    return [arg for arg in config.args if not arg.startswith("-")] if explicit else []


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Without -n on the command line, choose the workers here (called before pytest-xdist reads -n). Without
    pytest-xdist installed, or with -p no:xdist, everything runs in one process as before."""
    if hasattr(config, "workerinput"):
        return  # a worker (xdist sets its -n to None): it must not start workers of its own
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if config.option.numprocesses is None:
        debugging = config.getoption("usepdb", False) or config.getoption("trace", False)  # needs one process
        config.option.numprocesses = 0 if debugging else default_workers(usable_cores(), _pytest_args(config))
    # --dist stays xdist's default, load. loadgroup (to keep the UI's tests on one worker, which starts `sdlora ui`
    # once) has no effect under pytest 9.2: xdist 3.8 names the groups through item._nodeid, which pytest 9 no
    # longer reads. So each worker that gets a UI test starts its own UI (free port, own folders).


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown to pytest without it (-p no:xdist)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per usable core, at most MAX_WORKERS (xdist's own counts every core of a big host)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    return min(usable_cores(), MAX_WORKERS)


# Test files that take the longest, started first: xdist hands tests out in collection order, so one of these
# starting last would leave the other worker idle while it runs (measured with --durations, 2026-11-26).
START_FIRST = (
    "tests/test_demo.py",
    "tests/ui/test_browser.py",
    "tests/ui/test_app_api.py",
    "tests/test_first_hour.py",
    "tests/test_cli.py",
    "tests/training/test_crash.py",
    "tests/training/test_multinode.py",
    "tests/training/test_distributed.py",
    "tests/training/test_pinned_adapter.py",
    "tests/hub/test_hub.py",
)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # one process: the usual order

    def rank(item) -> int:
        path = item.nodeid.split("::")[0]  # relative to the rootdir, / separated
        return START_FIRST.index(path) if path in START_FIRST else len(START_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of all other files, is kept


def pytest_configure(config):
    """Give each process its share of the cores through the environment, before any worker starts or torch is
    imported, so the workers and every subprocess a test starts (CLI runs, the UI, torchrun) inherit it. A value the
    user set is kept."""
    if hasattr(config, "workerinput"):
        return  # a worker: the controller already set its environment
    tx = getattr(config.option, "tx", None) or []
    if getattr(config.option, "dist", "no") == "no" or not tx:
        return  # one process: torch's own default, as without xdist
    if "OMP_NUM_THREADS" not in os.environ:
        threads = str(threads_per_process(usable_cores(), len(tx)))
        os.environ["OMP_NUM_THREADS"] = threads
        os.environ.setdefault("MKL_NUM_THREADS", threads)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in bases are built into a per-session folder, never into the user's ~/.cache."""
    os.environ["SDLORA_CACHE"] = str(tmp_path_factory.mktemp("sdlora-cache"))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from sdlora.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-base") / "pipe", seed=0)


def write_shapes_dataset(folder: Path, count: int, style: str = "striped", seed: int = 0, size: int = 64) -> Path:
    from sdlora.bench.shapes import random_scene, render

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for index in range(count):
        scene = random_scene(rng, style=style)
        render(scene, size).save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(scene.caption, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def style_dataset(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "style", 8)


@pytest.fixture
def make_config(tiny_base, style_dataset, tmp_path):
    """A validated RunConfig on the tiny base and style set; keyword overrides as 'section.field' strings."""
    from sdlora.config import load_config

    def make(*overrides: str, **sections):
        defaults = [
            f"model.base={tiny_base}",
            f"data.path={style_dataset}",
            "data.resolution=64",
            "train.steps=4",
            "train.batch_size=2",
            "train.learning_rate=1e-3",
            f"output.dir={tmp_path / 'run'}",
        ]
        return load_config(None, [*defaults, *overrides])

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_base(tmp_path_factory) -> Path:
    """A saved tiny SDXL-shaped pipeline: two text encoders, time-id conditioned UNet."""
    from sdlora.models.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2v_base(tmp_path_factory) -> Path:
    """A saved tiny SD2.1-768-v-shaped pipeline: v-prediction, OpenCLIP-like text encoder."""
    from sdlora.models.tiny import save_tiny_sd2v_pipeline

    return save_tiny_sd2v_pipeline(tmp_path_factory.mktemp("tiny-sd2v") / "pipe", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_base() -> Path:
    """The built-in `sdlora:tiny-sd3` (SD3 transformer, 16-channel VAE, two CLIPs with projection, T5), built
    once per session into the session's cache, so in-process runs and CLI subprocesses share it."""
    from sdlora.models import resolve_builtin

    return resolve_builtin("sdlora:tiny-sd3")
