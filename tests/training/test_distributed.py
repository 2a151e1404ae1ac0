"""Data parallelism on CPU: 2 gloo processes under torchrun equal 1 process with the same effective batch, write
every file once, fail as a whole when one dies, and resume on a different number of processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from sdlora.config import ConfigError
from sdlora.formats import read_adapter
from sdlora.training import distributed
from sdlora.training.checkpoint import latest_checkpoint, load_checkpoint
from sdlora.training.run import TrainingRun


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.Popen:
    """`torchrun --nproc_per_node N -m sdlora ...` with gloo on loopback only."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "sdlora", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_config(tmp_path: Path, tiny_base: Path, data: Path, **train) -> Path:
    settings = {"steps": 4, "learning_rate": 2e-3, "seed": 7, **train}
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model:\n  base: {tiny_base}\ndata:\n  path: {data}\n  resolution: 64\n"
        + "train:\n" + "".join(f"  {k}: {v}\n" for k, v in settings.items())
    )
    return path


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _assert_same_adapter(a: Path, b: Path, atol: float = 1e-4) -> None:
    """Equal up to float reduction order (gloo sums in another order; Adam amplifies it slightly), and far closer
    than the training moved them: lora_B starts at zero, so its values are the update itself."""
    ta, tb = read_adapter(a).tensors["unet"], read_adapter(b).tensors["unet"]
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.allclose(ta[key], tb[key], atol=atol), (key, (ta[key] - tb[key]).abs().max())
    update = max(t.abs().max().item() for k, t in ta.items() if k.endswith("lora_B.weight"))
    assert update > 50 * atol, f"training moved lora_B by only {update}; the comparison proves nothing"


# Slow: test_multinode's two-machine run proves the same world (one writer, samples_seen, equal to one process) and
# the killed-launch test here resumes a 2-process checkpoint on one process; this adds torchrun's exact file list.
@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_effective_batch(tiny_base, style_dataset, tmp_path, make_config):
    # 2 processes x batch 1 x accumulation 2 == 1 process x batch 2 x accumulation 2 (effective batch 4).
    config = _run_config(tmp_path, tiny_base, style_dataset, batch_size=1, gradient_accumulation=2,
                         checkpoint_every=2)
    ddp_out = tmp_path / "ddp"
    launch = _torchrun("train", str(config), f"output.dir={ddp_out}")
    out, err = launch.communicate(timeout=300)
    assert launch.returncode == 0, err[-3000:]
    assert out.count("adapter: ") == 2, out  # both processes finished
    assert err.count("world size 2 x batch 1 x accumulation 2 = effective batch 4") == 2, err[-3000:]
    assert _files(ddp_out) == [
        "README.md", "checkpoints/step-000002/run.json", "checkpoints/step-000002/state.json",
        "checkpoints/step-000002/state.safetensors", "checkpoints/step-000002/trainable.safetensors",
        "checkpoints/step-000004/run.json", "checkpoints/step-000004/state.json",
        "checkpoints/step-000004/state.safetensors", "checkpoints/step-000004/trainable.safetensors",
        "config.yaml", "pytorch_lora_weights.safetensors", "train_log.jsonl",
    ]
    assert len((ddp_out / "train_log.jsonl").read_text().splitlines()) == 4  # one writer, not two
    state = load_checkpoint(ddp_out / "checkpoints" / "step-000002")
    assert state.extra == {"world_size": 2, "samples_seen": 8}

    common = ["train.batch_size=2", "train.gradient_accumulation=2", "train.seed=7", "train.learning_rate=2e-3"]
    single = TrainingRun(make_config(*common, f"output.dir={tmp_path / 'single'}"))
    single.build()
    straight = single.fit()
    _assert_same_adapter(ddp_out / "pytorch_lora_weights.safetensors", straight.adapter_path)

    # Resume the 2-process run on 1 process at step 2: same step counter, same data position, same result.
    resumed_out = tmp_path / "resumed"
    shutil.copytree(ddp_out / "checkpoints" / "step-000002", resumed_out / "checkpoints" / "step-000002")
    resumed = TrainingRun(make_config(*common, "train.checkpoint_every=2", f"output.dir={resumed_out}"))
    resumed.build()
    result = resumed.fit(resume="latest")
    assert result.final_step == 4 and len(result.losses) == 2
    assert result.losses == pytest.approx(straight.losses[2:], abs=1e-4)
    _assert_same_adapter(result.adapter_path, straight.adapter_path)
    assert load_checkpoint(resumed_out / "checkpoints" / "step-000004").extra == {"world_size": 1, "samples_seen": 16}


CACHE_LINE = re.compile(r"latents (\d+) reused, (\d+) encoded; text (\d+) reused, (\d+) encoded")
ON_PROC = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds worker processes through /proc")


def _assert_cache_counts(err: str, cache_dir: Path, processes: int, first: bool) -> None:
    """Each missing cache entry is encoded by exactly one process: the encoded counts the processes log add up to the
    number of files, so no file was written twice; a later run encodes nothing."""
    counts = [tuple(map(int, m)) for m in CACHE_LINE.findall(err)]
    assert len(counts) == processes, err[-3000:]  # one line per process
    latent_files = [p for p in cache_dir.rglob("*.safetensors") if "latent" in str(p.relative_to(cache_dir))]
    text_files = [p for p in cache_dir.rglob("*.safetensors") if "text" in str(p.relative_to(cache_dir))]
    assert len(latent_files) == 8 and len(text_files) >= 1
    encoded_latents, encoded_text = sum(c[1] for c in counts), sum(c[3] for c in counts)
    assert sum(c[0] for c in counts) + encoded_latents == len(latent_files)  # every entry has one owner
    if first:
        assert encoded_latents == len(latent_files) and encoded_text == len(text_files)
        assert all(c[1] > 0 for c in counts), "the work was not split across both processes"
    else:
        assert encoded_latents == 0 and encoded_text == 0


@pytest.fixture(scope="module")
def killed_launch(tiny_base, style_dataset, tmp_path_factory) -> SimpleNamespace:
    """One 2-process launch shared by the cache test and the killed-process test (a launch costs ~30 s of CPU, most
    of it three processes importing torch): both processes fill the latent and text cache (each logs its counts),
    train until the first checkpoint, then worker 1 is killed with SIGKILL."""
    tmp = tmp_path_factory.mktemp("killed-launch")
    config, out_dir, cache_dir = tmp / "run.yaml", tmp / "out", tmp / "cache"
    config.write_text(
        f"model:\n  base: {tiny_base}\n"
        f"data:\n  path: {style_dataset}\n  resolution: 64\n  cache_latents: true\n  cache_text_embeddings: true\n"
        f"  cache_dir: {cache_dir}\n"
        "train:\n  steps: 100000\n  learning_rate: 0.002\n  seed: 7\n  batch_size: 1\n  checkpoint_every: 2\n"
        "  keep_checkpoints: 2\n"
    )
    launch = _torchrun("train", str(config), f"output.dir={out_dir}")
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(out_dir / "checkpoints") is None:
            assert launch.poll() is None, launch.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        workers = _worker_pids(launch.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        _, err = launch.communicate(timeout=120)  # the survivor must not hang in an all-reduce
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.communicate()
    return SimpleNamespace(config=config, out_dir=out_dir, cache_dir=cache_dir, returncode=launch.returncode, err=err,
                           tmp=tmp)


@ON_PROC
def test_two_processes_fill_the_cache_once(killed_launch, caplog):
    """The shared launch's two processes filled the cache with no entry twice; a second run encodes nothing. The
    second run here is one process in this process (its reuse is per entry, as each process's is); the slow test
    relaunches both processes, and lets the first launch finish."""
    from sdlora.cli import main

    _assert_cache_counts(killed_launch.err, killed_launch.cache_dir, processes=2, first=True)
    caplog.clear()
    with caplog.at_level("INFO", logger="sdlora"):
        assert main(["train", str(killed_launch.config), f"output.dir={killed_launch.tmp / 'second'}",
                     "train.steps=2"]) == 0
    _assert_cache_counts(caplog.text, killed_launch.cache_dir, processes=1, first=False)


@pytest.mark.slow
def test_two_processes_fill_the_cache_once_and_a_relaunch_reuses_all(tiny_base, style_dataset, tmp_path):
    config = _run_config(tmp_path, tiny_base, style_dataset, steps=2, batch_size=1)
    cache_dir = tmp_path / "cache"
    args = ["data.cache_latents=true", "data.cache_text_embeddings=true", f"data.cache_dir={cache_dir}"]
    for attempt, out in enumerate(("first", "second")):
        launch = _torchrun("train", str(config), f"output.dir={tmp_path / out}", *args)
        _, err = launch.communicate(timeout=300)
        assert launch.returncode == 0, err[-3000:]
        _assert_cache_counts(err, cache_dir, processes=2, first=attempt == 0)


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of torchrun's worker processes."""
    workers = {}
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"LOCAL_RANK="):
                workers[int(entry.split(b"=")[1])] = pid
    return workers


@ON_PROC
def test_killing_one_process_fails_the_launch_and_leaves_a_resumable_checkpoint(killed_launch, caplog):
    config, out_dir, err = killed_launch.config, killed_launch.out_dir, killed_launch.err
    assert killed_launch.returncode != 0
    assert "ChildFailedError" in err and "SIGKILL" in err, err[-3000:]

    latest = latest_checkpoint(out_dir / "checkpoints")
    state = load_checkpoint(latest)  # intact: complete files only, never a half-written folder
    assert state.step >= 2 and state.extra["world_size"] == 2
    assert state.extra["samples_seen"] == state.step * 2
    # Resume on 1 process with batch 2 (same effective batch): the step counter and data position carry over. The
    # same command in this process: what the killed launch left is files, and a fresh process reads only those.
    from sdlora.cli import main

    with caplog.at_level("INFO", logger="sdlora"):
        assert main(["train", str(config), f"output.dir={out_dir}", "train.batch_size=2",
                     f"train.steps={state.step + 2}", "--resume", str(latest)]) == 0
    assert f"resuming a 2-process run on 1 processes: step counter and LR schedule continue at step {state.step}" \
        in caplog.text
    final = load_checkpoint(out_dir / "checkpoints" / f"step-{state.step + 2:06d}")
    assert final.extra == {"world_size": 1, "samples_seen": (state.step + 2) * 2}


def test_resume_position_maps_samples_to_the_new_layout(caplog):
    assert distributed.resume_micro_step(8, distributed.Layout(2, 1, 2)) == 4
    assert distributed.resume_micro_step(8, distributed.Layout(1, 4, 1)) == 2
    with caplog.at_level("WARNING"):
        assert distributed.resume_micro_step(10, distributed.Layout(4, 1, 1)) == 2
    assert "2 sample(s) are seen again" in caplog.text
    assert distributed.Layout(4, 2, 3).effective_batch == 24


def test_cache_work_is_split_with_no_item_twice():
    items = [f"latent-{i}.safetensors" for i in range(11)]
    shards = [distributed.shard_for_process(items, 3, rank) for rank in range(3)]
    assert sorted(sum(shards, [])) == sorted(items)
    assert [len(s) for s in shards] == [4, 4, 3]
    with pytest.raises(ValueError, match="process_index 3 is outside 0..2"):
        distributed.shard_for_process(items, 3, 3)


def test_cpu_launch_is_detected_only_for_several_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.cpu_only_launch() is (torch.accelerator.current_accelerator() is None)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.cpu_only_launch() is False


@pytest.mark.parametrize(("kind", "override", "message"), [
    (DistributedType.DEEPSPEED, "lora.train_text_encoder=true", "lora.train_text_encoder: DeepSpeed"),
    (DistributedType.FSDP, "train.checkpoint_every=5", "train.checkpoint_every: resumable checkpoints are not"),
    (DistributedType.FSDP, "sample.prompts=[a cat]", "sample.prompts: samples are rendered by the main process"),
])
def test_sharded_strategies_refuse_what_they_cannot_save(make_config, kind, override, message):
    with pytest.raises(ConfigError, match=message):
        distributed.check_strategy(SimpleNamespace(distributed_type=kind), make_config(override))
    distributed.check_strategy(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), make_config(override))


def test_a_lost_peer_is_one_line_that_says_how_to_go_on(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[127.0.0.1]:25506. This is typically caused by a remote worker crashing.")
    with pytest.raises(distributed.PeerLostError) as lost:
        distributed.raise_if_peer_lost(gloo, 2, checkpoints)
    message = str(lost.value)
    assert "\n" not in message and message.startswith("lost another process of this 2-process run")
    assert "network failed: Connection closed by peer [127.0.0.1]:25506); " in message and "pair.cc" not in message
    assert f"no checkpoint was written in {checkpoints}" in message
    assert lost.value.__cause__ is gloo

    (checkpoints / "step-000004").mkdir(parents=True)
    for name in ("state.json", "state.safetensors", "trainable.safetensors"):
        (checkpoints / "step-000004" / name).write_bytes(b"")
    timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation")
    with pytest.raises(distributed.PeerLostError, match="Timed out waiting 30000ms .* the newest checkpoint is .*"
                       "step-000004; relaunch every machine with the same command plus --resume latest"):
        distributed.raise_if_peer_lost(timeout, 2, checkpoints)
    with pytest.raises(distributed.PeerLostError, match="failed to recv, got 0 bytes"):
        network = torch.distributed.DistNetworkError("failed to recv, got 0 bytes")
        distributed.raise_if_peer_lost(network, 2, checkpoints)
    # Anything else, or a single-process run, keeps its own traceback: it is a bug, not a lost machine.
    distributed.raise_if_peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), 2, checkpoints)
    distributed.raise_if_peer_lost(gloo, 1, checkpoints)


def test_the_process_group_waits_as_long_as_the_config_says(make_config, monkeypatch):
    from accelerate.utils import InitProcessGroupKwargs

    seen = {}
    monkeypatch.setattr("accelerate.Accelerator", lambda **kwargs: seen.update(kwargs))
    distributed.build_accelerator(make_config("train.distributed_timeout=20"))
    (group,) = [h for h in seen["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
    assert group.timeout.total_seconds() == 20
    with pytest.raises(ConfigError, match="distributed_timeout"):
        make_config("train.distributed_timeout=0")
