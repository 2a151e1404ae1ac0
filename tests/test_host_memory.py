"""Host memory: freed CPU memory kept in the process so steps stop page-faulting it back, and the `auto` rule."""

from __future__ import annotations

import pytest
import torch

from sdlora.config import ConfigError
from sdlora.training.run import TrainingRun


def _page_faults_of_a_step() -> int:
    """Allocate, touch and free a step's worth of mixed-size blocks (266 MB), as a UNet step's activations do."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.empty(megabytes << 18).fill_(1.0) for megabytes in (8, 40, 3, 100, 16, 64, 2, 33)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


FRESH_PROCESS = """
import sys
sys.path.insert(0, sys.argv[1])
import test_host_memory as t
from sdlora import hostmem
if not hostmem.retain_freed_host_memory():
    print("not-glibc")
else:
    for _ in range(3):  # the first steps grow the heap to the working set
        t._page_faults_of_a_step()
    print(t._page_faults_of_a_step())
"""


def test_freed_host_memory_is_reused_without_page_faults():
    """Once retained, a step's freed blocks come back from the process's heap: a repeated step faults (almost) no
    pages, where glibc's default mmaps the large ones afresh and faults most of the 68,096 pages every time.
    Measured in a fresh process: page faults count every thread of a process, and a test worker's earlier tests
    (servers, allocator settings of other runs) must not count."""
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, here], capture_output=True, text=True, check=True)
    faults = out.stdout.strip().splitlines()[-1]
    if faults == "not-glibc":
        pytest.skip("not glibc: the C library's allocator is left as it is")
    assert int(faults) < 68096 // 10


@pytest.mark.parametrize(
    ("overrides", "retained"),
    [
        ((), True),
        (("train.gradient_checkpointing=true",), False),
        (("train.weight_storage=bf16",), False),
        (("train.gradient_checkpointing=true", "train.retain_host_memory=always"), True),
        (("train.retain_host_memory=never",), False),
    ],
)
def test_host_memory_is_retained_unless_memory_is_what_the_run_saves(make_config, monkeypatch, overrides, retained):
    import sdlora.training.run

    calls = []
    monkeypatch.setattr(sdlora.training.run, "settle_host_memory", calls.append)
    TrainingRun(make_config(*overrides)).build()
    assert calls == [retained]


def test_a_misspelt_host_memory_choice_names_the_field(make_config):
    with pytest.raises(ConfigError, match="retain_host_memory"):
        make_config("train.retain_host_memory=sometimes")


def _resident_mb() -> float:
    import os

    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_releasing_returns_what_the_setup_freed():
    """What a retained heap holds after a big one-off block is freed goes back to the OS on release: a run calls
    this after loading and caching, so the steps do not carry the setup's garbage."""
    from sdlora import hostmem

    if not hostmem.retain_freed_host_memory():
        pytest.skip("not glibc: the C library's allocator is left as it is")
    blocks = [torch.empty(50 << 18).fill_(1.0) for _ in range(6)]  # 300 MB from the (retained) heap
    del blocks
    kept = _resident_mb()
    assert hostmem.release_freed_host_memory()
    assert kept - _resident_mb() > 200
