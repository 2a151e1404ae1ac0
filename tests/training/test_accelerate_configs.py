"""Every shipped accelerate config loads through accelerate's own parser and launch validation, with the fields
docs/distributed.md promises."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
EXPECTED = {
    # name: (distributed_type, machines, processes, launch flag set by accelerate)
    "single-gpu": (DistributedType.NO, 1, 1, None),
    "ddp": (DistributedType.MULTI_GPU, 1, 2, "multi_gpu"),
    "multi-node": (DistributedType.MULTI_GPU, 2, 16, "multi_gpu"),
    "deepspeed-zero2": (DistributedType.DEEPSPEED, 1, 2, "use_deepspeed"),
    "fsdp": (DistributedType.FSDP, 1, 2, "use_fsdp"),
}


def _launch_args(name: str):
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "sdlora", "train", "run.yaml"])
    args, _, _ = _validate_launch_command(args)
    return args


def test_every_shipped_config_is_covered():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_and_launches_as_documented(name):
    kind, machines, processes, flag = EXPECTED[name]
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # refuses unknown keys
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_machines, config.num_processes) == (kind, machines, processes)
    # sdlora's run config decides precision; a different value here would only trigger a warning.
    assert config.mixed_precision == "no" and config.use_cpu is False
    args = _launch_args(name)
    assert args.num_processes == processes and args.num_machines == machines
    for other in ("multi_gpu", "use_deepspeed", "use_fsdp"):
        assert bool(getattr(args, other)) == (other == flag), other
    # The launch command for every shipped config is documented where users look for it.
    page = (CONFIGS.parents[1] / "docs" / "distributed.md").read_text(encoding="utf-8")
    assert f"--config_file configs/accelerate/{name}.yaml" in page


def test_multi_node_names_the_main_node():
    args = _launch_args("multi-node")
    assert args.main_process_ip and args.main_process_port == 29500 and args.machine_rank == 0


def test_deepspeed_is_zero_stage_2_without_offload():
    ds = load_config_from_file(str(CONFIGS / "deepspeed-zero2.yaml")).deepspeed_config
    assert ds["zero_stage"] == 2
    assert ds["offload_optimizer_device"] == ds["offload_param_device"] == "none"
    assert _launch_args("deepspeed-zero2").zero_stage == 2


def test_fsdp_builds_a_plugin_that_wraps_real_unet_blocks():
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from sdlora.models.tiny import build_tiny_components

    env = prepare_multi_gpu_env(_launch_args("fsdp"))
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    # The wrap policy names classes; a typo would silently wrap nothing.
    unet = build_tiny_components(seed=0)["unet"]
    present = {type(m).__name__ for m in unet.modules()}
    assert plugin.transformer_cls_names_to_wrap and set(plugin.transformer_cls_names_to_wrap) <= present


def test_the_documented_two_machine_commands_parse_as_one_world():
    """docs/distributed.md's commands for machine 0 and machine 1 (run for real on loopback by test_multinode.py)."""
    import re
    import shlex

    from accelerate.utils.launch import prepare_multi_gpu_env

    page = (CONFIGS.parents[1] / "docs" / "distributed.md").read_text(encoding="utf-8").replace("\\\n", " ")
    commands = re.findall(r"^accelerate launch --config_file configs/accelerate/multi-node\.yaml --machine_rank .*$",
                          page, flags=re.MULTILINE)
    assert len(commands) == 2, commands
    worlds = []
    for rank, command in enumerate(commands):
        argv = shlex.split(command)[2:]
        argv[argv.index("configs/accelerate/multi-node.yaml")] = str(CONFIGS / "multi-node.yaml")
        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        with mock.patch("accelerate.utils.launch.is_port_in_use", return_value=False):
            prepare_multi_gpu_env(args)
        assert args.node_rank == rank and args.training_script_args[0] == "train"
        main = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
        worlds.append((args.nnodes, args.nproc_per_node, main))
    assert worlds[0] == worlds[1] == ("2", "8", "10.0.0.1:29500")
