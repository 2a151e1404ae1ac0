"""How the suite is spread over workers (tests/conftest.py; docs/architecture.md, "Tests")."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import MAX_WORKERS, START_FIRST, default_workers, threads_per_process

ROOT = Path(__file__).resolve().parents[1]


def test_a_worker_per_core_up_to_the_cap_and_none_for_one_file_or_one_core():
    assert default_workers(2, []) == 2  # the README's command on the project's 2-core machines
    assert default_workers(2, ["tests"]) == 2 and default_workers(2, ["tests/a.py", "tests/b.py"]) == 2
    assert default_workers(64, []) == MAX_WORKERS  # a big host does not get 64 copies of torch
    assert default_workers(1, []) == 0  # a worker on one core is only start-up time
    assert default_workers(8, ["tests/test_cli.py"]) == 0
    assert default_workers(8, ["tests/test_cli.py::test_a_printed_command_names_the_program_that_runs"]) == 0


def test_each_process_gets_its_share_of_the_cores():
    assert threads_per_process(2, 2) == 1 and threads_per_process(16, 8) == 2 and threads_per_process(3, 2) == 1
    assert threads_per_process(4, 0) == 4  # no workers: all cores to the one process


def test_this_worker_runs_torch_on_the_threads_it_was_given():
    import torch

    if "PYTEST_XDIST_WORKER" in os.environ and "OMP_NUM_THREADS" in os.environ:
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


def test_the_files_started_first_exist():
    missing = [path for path in START_FIRST if not (ROOT / path).is_file()]
    assert not missing, f"tests/conftest.py START_FIRST names files that are gone: {missing}"
