"""Every error a user can cause is one clear line, never a traceback.

1. Every exception class defined in the `sdlora` package is a `UserError` (the CLI's one-line report) or is on
   `INTERNAL_ERRORS` below, with the reason; `sdlora/errors.py` imports nothing, so any layer can use the base.
2. No `raise ValueError/RuntimeError/KeyError/...(...)` of a built-in class is left in the package except the
   internal ones on `INTERNAL_RAISES` (programming errors, which must keep their traceback).
3. Each user-facing class is triggered for real through `sdlora.cli.main`: a hostile file, a bad config value or a
   bad argument. The run exits 2, stderr ends with exactly one `sdlora: error:` line that names the file or the
   field, and there is no traceback. Classes that cannot be reached that way name the test that covers them.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import shutil
import struct
from pathlib import Path

import pytest
import torch

import sdlora
from sdlora.cli import main
from sdlora.errors import USER_ERRORS, UserError

PACKAGE = Path(sdlora.__file__).parent

# Exception classes that are NOT user errors: a bug in sdlora, which must keep its traceback. Empty today: every
# class sdlora defines is something a user can fix. Add "module.Class": "why a user cannot cause it" here.
INTERNAL_ERRORS: dict[str, str] = {}

# Built-in exceptions raised on purpose, by (file, function): each is a programming error, not reachable from a
# config value, a file or a command-line argument. Anything a user can cause raises a UserError subclass instead.
# (pydantic validators in config/schema.py must raise ValueError: pydantic collects them and load_config reports
# them as one ConfigError naming each field, so the walk skips them.)
INTERNAL_RAISES: dict[tuple[str, str], str] = {
    ("bench/archs.py", "build_random_base"): "benchmark harness argument, not the sdlora command",
    ("bench/archs.py", "sd3_shapes"): "benchmark harness argument (scripts/bench.py offers only the known sizes)",
    ("formats/kohya.py", "module_name"): "components come from formats.COMPONENTS, never from a file",
    ("formats/kohya.py", "parse_module_name"): "callers match kohya's key pattern first, so a prefix is always there",
    ("inference/pipeline.py", "AdapterStack.add"): "stack_adapters numbers its names, so they never repeat",
    ("inference/pipeline.py", "AdapterStack.set_weights"): "API misuse: weights for an adapter never added",
    ("inference/pipeline.py", "AdapterStack.unfuse"): "API misuse: unfuse after a one-shot fuse",
    ("inference/pipeline.py", "AdapterStack._refuse_if_fused"): "API misuse: changing a fused stack",
    ("models/lora.py", "_inject"): "API misuse: callers number or name adapters uniquely",
    ("training/checkpoint.py", "_jsonable"): "the run stores only JSON-able state",
    ("training/distributed.py", "shard_for_process"): "process indices come from accelerate",
    ("training/loop.py", "fit"): "TrainingParts built inconsistently by the caller",
    ("training/loop.py", "use_adapter_weight"): "the samplers never put two adapter weights in one batch",
    ("training/offload.py", "Released.forward"): "a released encoder called after caching: a bug in the run",
    ("training/offload.py", "borrowed"): "a released module borrowed again: a bug in the run",
    ("training/run.py", "TrainingRun.__init__"): "API misuse: hub.push_checkpoints on a run started without a publisher",
}
_BUILTIN_ERRORS = {"ValueError", "RuntimeError", "KeyError", "TypeError", "OSError", "IndexError", "Exception",
                   "AttributeError", "LookupError", "FileNotFoundError", "PermissionError"}


def _sdlora_modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="sdlora."):
        if info.name.rsplit(".", 1)[-1] != "__main__":  # importing it runs the command line
            yield importlib.import_module(info.name)


def _defined_exception_classes() -> dict[str, type[BaseException]]:
    found = {}
    for module in _sdlora_modules():
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_exception_class_is_a_user_error_or_a_listed_internal_one():
    classes = _defined_exception_classes()
    assert "sdlora.models.quantize.QuantizationError" in classes  # the walk reaches the subpackages
    unlisted = sorted(name for name, cls in classes.items()
                      if not issubclass(cls, UserError) and name not in INTERNAL_ERRORS)
    assert not unlisted, f"make these subclass sdlora.errors.UserError, or list them as internal: {unlisted}"
    assert set(INTERNAL_ERRORS) <= set(classes), "INTERNAL_ERRORS names a class that no longer exists"
    for cls in classes.values():
        if issubclass(cls, UserError):
            assert issubclass(cls, USER_ERRORS)  # what cli.main catches


def test_errors_module_imports_nothing():
    """The base must be importable from the lowest layer (files, config) without a cycle."""
    tree = ast.parse((PACKAGE / "errors.py").read_text())
    assert not [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


_VALIDATORS = {"field_validator", "model_validator"}


def _is_pydantic_validator(node) -> bool:
    decorators = [d.func if isinstance(d, ast.Call) else d for d in getattr(node, "decorator_list", [])]
    return any(getattr(d, "id", getattr(d, "attr", None)) in _VALIDATORS for d in decorators)


def _builtin_raises() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))

        def visit(node, scope):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    if not _is_pydantic_validator(child):
                        visit(child, [*scope, child.name])
                    continue
                if isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call):
                    func = child.exc.func
                    if isinstance(func, ast.Name) and func.id in _BUILTIN_ERRORS:
                        found.add((path.relative_to(PACKAGE).as_posix(), ".".join(scope)))
                visit(child, scope)

        visit(tree, [])
    return found


def test_built_in_exceptions_are_raised_only_for_programming_errors():
    raised = _builtin_raises()
    unlisted = sorted(raised - set(INTERNAL_RAISES))
    assert not unlisted, f"raise a UserError subclass that names the field or file (or list as internal): {unlisted}"
    assert not set(INTERNAL_RAISES) - raised, "INTERNAL_RAISES lists a raise that is gone"


# ---------------------------------------------------------------------------------------------------------------
# Each user error, for real, through the command line


def run_cli(capsys, *argv: str) -> str:
    """Run `sdlora argv` in this process; assert the one-line report and return it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("sdlora: error:")]
    assert len(error_lines) == 1, err
    assert err.rstrip().splitlines()[-1] == error_lines[0], f"the report is not the last line: {err}"
    return error_lines[0]


@pytest.fixture
def adapter_file(tiny_base, tmp_path) -> Path:
    """A diffusers-layout adapter that fits the tiny base."""
    from adapter_factory import make_adapter

    from sdlora.formats import save_diffusers
    from sdlora.models import load_base_model

    base = load_base_model(str(tiny_base))
    return save_diffusers(tmp_path / "fits.safetensors", make_adapter(base.unet, rank=2))


def _safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    return path


def _lora(module: str, rank: int = 2, width: int = 8) -> dict[str, torch.Tensor]:
    return {f"{module}.lora_A.weight": torch.ones(rank, width), f"{module}.lora_B.weight": torch.ones(width, rank)}


def _train_config(tmp_path, tiny_base, style_dataset, **sections) -> Path:
    config = {"model": {"base": str(tiny_base)}, "data": {"path": str(style_dataset), "resolution": 64},
              "train": {"steps": 2, "batch_size": 2}, "output": {"dir": str(tmp_path / "out")}}
    for key, value in sections.items():
        section, field = key.split("__")
        config.setdefault(section, {})[field] = value
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_config_error_a_bad_yaml_file_is_one_line(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1\n")
    line = run_cli(capsys, "train", bad)
    assert str(bad) in line and "cannot parse" in line and "line 3, column 1" in line


def test_config_error_fp16_without_a_gpu(capsys, tmp_path, tiny_base, style_dataset):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed with a CUDA GPU")
    line = run_cli(capsys, "train", _train_config(tmp_path, tiny_base, style_dataset), "train.mixed_precision=fp16")
    assert "train.mixed_precision: fp16 needs a CUDA GPU" in line


def test_config_error_zero_terminal_snr_on_an_epsilon_base(capsys, tmp_path, tiny_base, style_dataset):
    """The family code's check, reached through a full run setup on the tiny (epsilon) base."""
    line = run_cli(capsys, "train", _train_config(tmp_path, tiny_base, style_dataset), "train.zero_terminal_snr=true")
    assert "train.zero_terminal_snr: needs a v-prediction model" in line and "train.zero_terminal_snr=false" in line


def test_config_error_no_bucket_fits(capsys, style_dataset):
    line = run_cli(capsys, "dataset", "check", style_dataset, "data.bucketing.enabled=true", "data.bucketing.min_side=1024")
    assert "data.bucketing: no bucket fits" in line and "widen" in line


def test_config_error_adamw8bit_without_bitsandbytes(capsys, tmp_path, tiny_base, style_dataset):
    from sdlora.models import backends

    if backends.bitsandbytes_available():
        pytest.skip("bitsandbytes is installed here")
    line = run_cli(capsys, "train", _train_config(tmp_path, tiny_base, style_dataset), "train.optimizer=adamw8bit")
    assert "train.optimizer: adamw8bit needs bitsandbytes" in line


def test_quantization_error_nf4_without_cuda(capsys, tmp_path, tiny_base, style_dataset):
    from sdlora.models import backends

    if torch.cuda.is_available() and backends.bitsandbytes_available():
        pytest.skip("nf4 runs here")
    line = run_cli(capsys, "train", _train_config(tmp_path, tiny_base, style_dataset), "model.quantize=nf4")
    assert "model.quantize=nf4 needs a CUDA GPU and bitsandbytes" in line


def test_dataset_error_missing_folder(capsys, tmp_path, tiny_base, style_dataset):
    config = _train_config(tmp_path, tiny_base, style_dataset)
    line = run_cli(capsys, "train", config, f"data.path={tmp_path / 'missing'}")
    assert "data.path" in line and str(tmp_path / "missing") in line


def test_output_locked_error(capsys, tmp_path, tiny_base, style_dataset):
    from sdlora.training.lock import OutputLock

    config = _train_config(tmp_path, tiny_base, style_dataset)
    with OutputLock(tmp_path / "out"):
        line = run_cli(capsys, "train", config)
    assert f"output.dir {tmp_path / 'out'} is in use" in line


def test_checkpoint_error_resume_latest_without_checkpoints(capsys, tmp_path, tiny_base, style_dataset):
    line = run_cli(capsys, "train", _train_config(tmp_path, tiny_base, style_dataset), "--resume", "latest")
    assert "--resume latest: no complete checkpoint" in line and str(tmp_path / "out") in line


def test_model_load_error_missing_base_file(capsys, tmp_path):
    line = run_cli(capsys, "generate", "--base", tmp_path / "nope.safetensors", "--prompt", "x")
    assert "model.base" in line and str(tmp_path / "nope.safetensors") in line


def test_adapter_format_error_hostile_header(capsys, tmp_path):
    """A safetensors header that lies about the file size (tests/test_hostile_files.py has the full set): the
    UnsafeFileError underneath reaches the CLI as an AdapterFormatError that names the file."""
    liar = tmp_path / "liar.safetensors"
    liar.write_bytes(struct.pack("<Q", 5000) + b'{"__metadata__": {}}')
    line = run_cli(capsys, "info", liar)
    assert str(liar) in line and "header claims 5000 bytes" in line


def test_lora_name_error_prompt_tag_without_lora_dir(capsys):
    line = run_cli(capsys, "generate", "--prompt", "a cat <lora:style:0.8>")
    assert "pass --lora-dir FOLDER" in line


def test_generation_setting_errors(capsys, tmp_path):
    assert "--lora ':0.5': expected PATH" in run_cli(capsys, "generate", "--prompt", "x", "--lora", ":0.5")
    grid = ["grid", "--prompt", "x", "--lora", tmp_path / "a.safetensors"]
    assert "--x 'bogus': use weight:N, prompt or seed" in run_cli(capsys, *grid, "--x", "bogus", "--x-values", "1")
    line = run_cli(capsys, *grid, "--x-values", "0,low,1")
    assert "--x-values '0,low,1': expected numbers" in line
    assert "step must be positive" in run_cli(capsys, *grid, "--x-values", "0:1:0")
    assert "--y 'weight:1'" in run_cli(capsys, *grid, "--x-values", "1", "--y", "weight:1", "--y-values", "0,1")


def test_generation_setting_error_unknown_scheduler(capsys, tiny_base):
    line = run_cli(capsys, "generate", "--base", tiny_base, "--prompt", "x", "--scheduler", "bogus")
    assert "--scheduler: unknown 'bogus'" in line


def test_adapter_mismatch_error_adapter_for_another_base(capsys, tmp_path, tiny_base):
    other = _safetensors(tmp_path / "other.safetensors", _lora("unet.down_blocks.7.attentions.0.proj_in"))
    line = run_cli(capsys, "generate", "--base", tiny_base, "--prompt", "x", "--lora", other)
    assert f"--lora {other}" in line and "does not fit" in line and "sdlora info" in line


def test_adapter_mismatch_error_same_names_other_sizes(capsys, tmp_path, tiny_base):
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    wide = _safetensors(tmp_path / "wide.safetensors", _lora(module, width=999))
    line = run_cli(capsys, "generate", "--base", tiny_base, "--prompt", "x", "--lora", wide)
    # checked before peft loads anything: the layer and both shapes, not peft's "size mismatch" traceback
    assert f"--lora {wide}: layer {module} does not fit the base" in line
    assert "lora_A [2, 999], lora_B [999, 2]" in line and "needs lora_A [2, 32], lora_B [32, 2]" in line


def test_layout_error_sdxl_adapter_with_an_unknown_unet_module(capsys, tmp_path):
    """A diffusers-layout SDXL file naming a UNet module SGM has no name for: `convert --to kohya` cannot write it."""
    hostile = _safetensors(tmp_path / "odd.safetensors", {**_lora("unet.mystery_block.proj"),
                                                          **_lora("text_encoder_2.text_model.q_proj")})
    out = tmp_path / "out.safetensors"
    line = run_cli(capsys, "convert", hostile, out, "--to", "kohya")
    assert str(out) in line and "mystery_block" in line and "--to diffusers" in line
    assert not out.exists()


def test_single_file_error_base_the_ldm_layout_cannot_hold(capsys, tmp_path, tiny_base, adapter_file):
    """Per-block layer counts have no original-layout (A1111) numbering: baking into one file is refused."""
    odd = tmp_path / "odd-base"
    shutil.copytree(tiny_base, odd)
    unet_config = json.loads((odd / "unet" / "config.json").read_text())
    unet_config["layers_per_block"] = [unet_config["layers_per_block"]] * len(unet_config["down_block_types"])
    (odd / "unet" / "config.json").write_text(json.dumps(unet_config))
    out = tmp_path / "baked.safetensors"
    line = run_cli(capsys, "merge", f"{adapter_file}:1", "--into-base", odd, "-o", out)
    assert str(out) in line and "per-block layer counts" in line and "diffusers folder" in line
    assert not out.exists()


def test_base_choice_error_adapters_that_disagree_about_their_base(capsys, tmp_path):
    """No --base: the adapters' recorded bases decide, and two different ones are refused before any model loads."""
    one = _safetensors(tmp_path / "one.safetensors", _lora("unet.a"), {"sdlora.base_model": "sdlora:shapes"})
    two = _safetensors(tmp_path / "two.safetensors", _lora("unet.a"), {"sdlora.base_model": "alice/base"})
    line = run_cli(capsys, "generate", "--prompt", "x", "--lora", one, "--lora", two)
    assert "different bases" in line and "one.safetensors on sdlora:shapes" in line and "--base" in line


def test_card_error_not_a_run_folder(capsys, tmp_path):
    line = run_cli(capsys, "card", tmp_path)
    assert f"{tmp_path}: no config.yaml" in line


def test_hub_error_bad_repo_id(capsys, tmp_path):
    line = run_cli(capsys, "push", tmp_path, "not-a-repo-id", "--dry-run")
    assert "repo id 'not-a-repo-id': expected USER/NAME" in line


def test_disk_full_error_before_writing(capsys, tmp_path, adapter_file, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "k.safetensors"
    line = run_cli(capsys, "convert", adapter_file, out, "--to", "kohya")
    assert "not enough free space" in line and str(out) in line
    assert not out.exists()


# Covered above: the classes each test triggers. The rest cannot be caused from the command line in a test
# without minutes of training or a crafted mid-run failure; the named tests raise them through the library.
TRIGGERED_AT_CLI = {
    "sdlora.config.files.ConfigError", "sdlora.models.quantize.QuantizationError", "sdlora.data.sources.DatasetError",
    "sdlora.training.lock.OutputLockedError", "sdlora.training.checkpoint.CheckpointError",
    "sdlora.models.base.ModelLoadError", "sdlora.formats.adapter.AdapterFormatError",
    "sdlora.inference.prompt_tags.LoraNameError", "sdlora.inference.pipeline.GenerationSettingError",
    "sdlora.models.lora.AdapterMismatchError", "sdlora.formats.ldm.LayoutError",
    "sdlora.formats.singlefile.SingleFileError", "sdlora.hub.card.CardError", "sdlora.hub.transfer.HubError",
    "sdlora.files.atomic.DiskFullError", "sdlora.inference.base_choice.BaseChoiceError",
}
COVERED_ELSEWHERE = {
    "sdlora.config.names.RepoIdError": "config/test_repo_ids.py; at the CLI it arrives as ConfigError / HubError / "
                                       "CardError, each with the same wording",
    "sdlora.training.divergence.NumericError": "test_safety.py: endless infs stop with a diagnosis (one line)",
    "sdlora.data.images.ImageLoadError": "test_dataset_check.py: the preflight reports unreadable images by name; "
                                         "only an image deleted mid-run reaches the CLI as this error",
    "sdlora.files.untrusted.UnsafeFileError": "test_hostile_files.py; at the CLI it arrives wrapped as "
                                              "AdapterFormatError / ModelLoadError / CheckpointError (above)",
    "sdlora.training.ownership.RunFolderError": "training/test_run_folder.py: a new run into a folder holding "
                                                "another run's checkpoints, through the CLI (one line, exit 2)",
    "sdlora.training.distributed.PeerLostError": "training/test_multinode.py: a machine killed mid-run stops the "
                                                 "other with this one line (slow: two accelerate launches)",
    "sdlora.ui.server.UIStartError": "ui/test_server.py: `sdlora ui` on a taken port or a public --host without "
                                     "--auth, one line and exit 2",
    "sdlora.ui.paths.OutsideRootError": "ui/test_paths.py: `..`, absolute paths and symlinks out of --root",
    "sdlora.ui.runs.RunStateError": "ui/test_app_api.py: stopping a run that is not training",
}


def test_every_user_error_is_triggered_at_the_cli_or_covered_by_a_named_test():
    user_errors = {name for name, cls in _defined_exception_classes().items()
                   if issubclass(cls, UserError) and cls is not UserError}
    assert user_errors == TRIGGERED_AT_CLI | set(COVERED_ELSEWHERE)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    from sdlora import formats

    def broken(path, full=False):
        raise RuntimeError("a bug in sdlora")

    monkeypatch.setattr(formats, "describe", broken)
    with pytest.raises(RuntimeError, match="a bug in sdlora"):
        main(["info", str(tmp_path / "x.safetensors")])


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path):
    from sdlora.hub.card import CardError

    with pytest.raises(CardError):
        main(["-v", "card", str(tmp_path)])
