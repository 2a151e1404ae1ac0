"""Issue 17, acceptance 3: every command that reads adapters gets the same set of bad files, and each answers with
exit code 2, one `sdlora: error:` line naming the file, no traceback, no warning, and no output file.

Files that are bad in themselves (non-finite, A and B of different ranks, truncated, lying header, pickle, folder,
empty, a header over the size limit) are refused by every command. Files that are only bad for a base (right rank
but other layer sizes; an SDXL-layout LoRA on the SD1 base and an SD1 LoRA, by its kohya header, on the SDXL base)
are refused by the commands that have a base: `generate`, `<lora:…>` tags, `grid` and `merge --into-base`.
`info`, `convert` and `merge` hold no base to compare with; they must read those files correctly (tested below).
"""

from __future__ import annotations

import json
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from adapter_factory import make_adapter
from safetensors.torch import save_file

from sdlora import formats, inference
from sdlora.cli import main
from sdlora.formats.adapter import to_diffusers_state_dict
from sdlora.models import load_base_model

SELF_BAD = ("nonfinite", "rank_mismatch", "truncated", "lying_header", "pickle", "folder", "empty", "huge_metadata")
BASE_BAD = ("wrong_dims", "sdxl_on_sd1", "sd1_on_sdxl")
BASE_FREE = ("info", "convert", "merge", "merge_rank")
WITH_BASE = ("generate", "lora_tag", "grid", "merge_into_base")
HUGE = 101 * 1024 * 1024  # over files.untrusted.MAX_HEADER_BYTES (safetensors' own 100 MB bound)
MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.fixture(scope="module")
def files(tiny_base, tiny_sdxl_base, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (bad file, the base the commands with a base run it on)."""
    folder = tmp_path_factory.mktemp("hostile")
    sd1, sdxl = load_base_model(str(tiny_base)), load_base_model(str(tiny_sdxl_base))
    good = make_adapter(sd1.unet, sd1.text_encoder, rank=4)
    good_path = formats.save_diffusers(folder / "good.safetensors", good)
    state = to_diffusers_state_dict(good)
    out: dict[str, Path] = {}

    broken = {k: v.clone() for k, v in state.items()}
    broken[f"unet.{MODULE}.lora_A.weight"][0, 0] = float("nan")
    broken["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight"][1, 1] = float("inf")
    out["nonfinite"] = folder / "nonfinite.safetensors"
    save_file(broken, str(out["nonfinite"]))

    ranks = dict(state)
    ranks[f"unet.{MODULE}.lora_B.weight"] = torch.ones(32, 3)
    out["rank_mismatch"] = folder / "rank_mismatch.safetensors"
    save_file(ranks, str(out["rank_mismatch"]))

    wide = dict(state)
    wide[f"unet.{MODULE}.lora_A.weight"], wide[f"unet.{MODULE}.lora_B.weight"] = torch.ones(4, 48), torch.ones(48, 4)
    out["wrong_dims"] = folder / "wrong_dims.safetensors"
    save_file(wide, str(out["wrong_dims"]))

    xl = make_adapter(sdxl.unet, sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2, rank=2)
    xl.metadata = {}  # no family in the header: the key layout must give it away
    out["sdxl_on_sd1"] = formats.save_diffusers(folder / "sdxl_on_sd1.safetensors", xl)
    out["sd1_on_sdxl"] = formats.save_kohya(folder / "sd1_on_sdxl.safetensors",
                                            make_adapter(sd1.unet, sd1.text_encoder, rank=2, family="sd1"))

    whole = good_path.read_bytes()
    out["truncated"] = folder / "truncated.safetensors"
    out["truncated"].write_bytes(whole[: len(whole) // 2])
    out["lying_header"] = _write_raw(folder / "lying_header.safetensors", {
        f"unet.{MODULE}.lora_A.weight": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}},
        bytes(16))
    out["pickle"] = folder / "pickle.safetensors"
    torch.save(state, out["pickle"])
    out["folder"] = folder / "folder.safetensors"
    out["folder"].mkdir()
    shutil.copy(good_path, out["folder"] / "pytorch_lora_weights.safetensors")
    out["empty"] = folder / "empty.safetensors"
    out["empty"].write_bytes(b"")
    tensor = torch.zeros(2, 2)
    out["huge_metadata"] = _write_raw(folder / "huge_metadata.safetensors", {
        "__metadata__": {"ss_tag_frequency": "x" * HUGE},
        f"unet.{MODULE}.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}},
        tensor.numpy().tobytes())
    return {name: (path, tiny_sdxl_base if name == "sd1_on_sdxl" else tiny_base) for name, path in out.items()}


def _argv(command: str, bad: Path, base: Path, out: Path, loras: Path) -> list[str]:
    tiny = ["--steps", "1", "--height", "64", "--width", "64", "--base", str(base)]
    return {
        "info": ["info", str(bad)],
        "convert": ["convert", str(bad), str(out / "converted.safetensors"), "--to", "kohya"],
        "merge": ["merge", f"{bad}:1", "-o", str(out / "merged.safetensors")],
        "merge_rank": ["merge", f"{bad}:0.5", f"{bad}:0.5", "--rank", "1", "-o", str(out / "merged.safetensors")],
        "generate": ["generate", *tiny, "--prompt", "a red circle", "--lora", str(bad), "-o", str(out / "image.png")],
        "lora_tag": ["generate", *tiny, "--prompt", "a red circle <lora:bad:0.8>", "--lora-dir", str(loras),
                     "-o", str(out / "image.png")],
        "grid": ["grid", *tiny, "--prompt", "a red circle", "--lora", str(bad), "--x-values", "0,1",
                 "-o", str(out / "grid.png")],
        "merge_into_base": ["merge", f"{bad}:1", "--into-base", str(base), "-o", str(out / "baked")],
    }[command]


def _lora_dir(tmp_path: Path, bad: Path) -> Path:
    """A --lora-dir holding only the bad file (or folder), as `bad.safetensors`."""
    loras = tmp_path / "loras"
    loras.mkdir()
    if bad.is_dir():
        shutil.copytree(bad, loras / "bad.safetensors")
    else:
        (loras / "bad.safetensors").symlink_to(bad)  # inside the folder, so the link is followed
    return loras


def _run(capsys, argv: list[str]) -> tuple[int, str, str, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err, [w for w in caught if issubclass(w.category, RuntimeWarning)]


CASES = [(f, c) for f in SELF_BAD for c in (*BASE_FREE, *WITH_BASE)] + [(f, c) for f in BASE_BAD for c in WITH_BASE]


@pytest.mark.parametrize(("name", "command"), CASES)
def test_every_command_refuses_every_bad_file_in_one_line(files, name, command, tmp_path, capsys):
    bad, base = files[name]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before")  # nothing already there may be touched
    code, stdout, stderr, runtime_warnings = _run(capsys, _argv(command, bad, base, out, _lora_dir(tmp_path, bad)))
    assert code == 2, stderr
    assert "Traceback" not in stderr and not runtime_warnings
    # `generate` and `grid` say which base they load (`base: …`) and transformers shows its weight-loading bar;
    # beside those, the one error line.
    lines = [line for line in stderr.splitlines()
             if line.strip() and not line.startswith("base: ") and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("sdlora: error: "), stderr
    named = bad.name if command != "lora_tag" else "bad.safetensors"
    assert named in lines[0], lines[0]
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "written before"


WHY = {
    "nonfinite": "2 tensor(s) hold NaN or infinite values (unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1",
    "rank_mismatch": "lora_A [4, 32] and lora_B [32, 3] do not agree on the rank",
    "truncated": "truncated",
    "lying_header": "needs 40000000000",
    "pickle": "looks like a PyTorch pickle file (a zip archive, as torch.save writes)",
    "folder": "is a folder, not an adapter file; pass the adapter file inside it",
    "empty": "empty file (0 bytes)",
    "huge_metadata": "over the 104857600-byte limit",
    "wrong_dims": f"layer unet.{MODULE} does not fit the base: the adapter has lora_A [4, 48], lora_B [48, 4], the "
                  "base's Linear needs lora_A [4, 32], lora_B [32, 4]",
    "sdxl_on_sd1": "made for SDXL (its text_encoder_2 layers) but the base is SD1.x",
    "sd1_on_sdxl": "made for SD1.x (sdlora.family=sd1) but the base is SDXL",
}


@pytest.mark.parametrize("name", [*SELF_BAD, *BASE_BAD])
def test_the_line_says_what_is_wrong(files, name, tmp_path, capsys):
    bad, base = files[name]
    command = "info" if name in SELF_BAD else "generate"
    code, _, stderr, _ = _run(capsys, _argv(command, bad, base, tmp_path, tmp_path))
    assert code == 2 and WHY[name] in stderr, stderr


def test_pickle_message_says_how_to_convert(files, tmp_path, capsys):
    pt = tmp_path / "style.pt"
    shutil.copy(files["pickle"][0], pt)
    _, _, stderr, _ = _run(capsys, ["info", str(pt)])
    assert "torch.load('style.pt', weights_only=True), 'style.safetensors'" in stderr and "isolated" in stderr


@pytest.mark.parametrize("name", BASE_BAD)
def test_commands_without_a_base_read_files_that_only_a_base_refuses(files, name, tmp_path, capsys):
    """Converting an SDXL LoRA or one for another SD1 model is legitimate: without a base there is nothing to refuse."""
    bad, _ = files[name]
    code, stdout, stderr, _ = _run(capsys, ["info", str(bad)])
    assert code == 0, stderr
    assert json.loads(stdout)["family"]["name"] == {"sdxl_on_sd1": "sdxl", "sd1_on_sdxl": "sd1",
                                                    "wrong_dims": "sd1/sd2"}[name]
    code, _, stderr, _ = _run(capsys, ["convert", str(bad), str(tmp_path / "c.safetensors"), "--to", "diffusers"])
    assert code == 0, stderr
    original, converted = formats.read_adapter(bad), formats.read_adapter(tmp_path / "c.safetensors")
    for component in original.components:
        for key, value in original.tensors[component].items():
            assert torch.equal(converted.tensors[component][key], value)


def test_sample_adapters_of_a_run_go_through_the_same_checks(files, tiny_base):
    """Training's `sample.adapters` stack through `preview_adapters`: the same read and fit checks."""
    pipe = inference.build_pipeline(load_base_model(str(tiny_base)))
    for name, error in (("nonfinite", formats.AdapterFormatError), ("sdxl_on_sd1", ValueError)):
        with pytest.raises(error, match=f"sample.adapters .*{name}|{name}.*NaN"):
            with inference.preview_adapters(pipe, [inference.AdapterSpec(str(files[name][0]))]):
                pass
    assert not any("preview" in n for n in inference.pipeline.lora.adapter_names(pipe.unet))


@pytest.mark.parametrize("name", ["nonfinite", "sdxl_on_sd1"])
def test_a_bad_sample_adapter_stops_the_run_before_its_first_step(files, make_config, name):
    """Read and fitted at setup: the run fails in `build`, before any step is trained or logged."""
    from sdlora.training.run import TrainingRun

    config = make_config(f"sample.adapters=[{files[name][0]}:0.5]", "sample.prompts=[a cat]", "train.steps=2")
    run = TrainingRun(config)
    with pytest.raises((formats.AdapterFormatError, ValueError), match=f"sample.adapters .*{name}|{name}.*NaN"):
        run.build()
    assert not run.folder.step_log.exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 17, cases 4 to 6 one by one: what each command used to do, and the line it gives now


def _refused(capsys, argv: list[str]) -> str:
    code, _, stderr, caught = _run(capsys, [str(a) for a in argv])
    assert code == 2 and "Traceback" not in stderr and not caught, stderr
    (line,) = [x for x in stderr.splitlines() if x.strip() and not x.startswith("base: ") and "Loading" not in x]
    return line


def test_info_cuts_long_metadata_values(files, tmp_path, capsys):
    """It printed 13.6 MB of kohya tag counts to the terminal."""
    good = files["folder"][0] / "pytorch_lora_weights.safetensors"
    adapter = formats.read_adapter(good)
    adapter.metadata["ss_tag_frequency"] = json.dumps({"set": {f"tag{i}": i for i in range(200_000)}})
    big = formats.save_diffusers(tmp_path / "big.safetensors", adapter)
    code, stdout, _, _ = _run(capsys, ["info", str(big)])
    cut = len(adapter.metadata["ss_tag_frequency"]) - formats.adapter.INFO_VALUE_CHARS
    assert code == 0 and len(stdout) < 5000
    assert f"[{cut} more characters cut; sdlora info --full shows all]" in json.loads(stdout)["metadata"][
        "ss_tag_frequency"]
    code, stdout, _, _ = _run(capsys, ["info", str(big), "--full"])
    assert json.loads(stdout)["metadata"]["ss_tag_frequency"] == adapter.metadata["ss_tag_frequency"]


def test_convert_and_merge_targets(files, tmp_path, capsys):
    """convert to a folder was an IsADirectoryError traceback; to x.pt it wrote a file sdlora then refused to read."""
    good = files["folder"][0] / "pytorch_lora_weights.safetensors"
    folder = tmp_path / "existing"
    folder.mkdir()
    assert "is a folder; give a file name" in _refused(capsys, ["convert", good, folder, "--to", "kohya"])
    for name in ("x.pt", "x.ckpt", "x"):
        line = _refused(capsys, ["convert", good, tmp_path / name, "--to", "diffusers"])
        assert f"{tmp_path / name}: adapters are written only as .safetensors" in line
        line = _refused(capsys, ["merge", f"{good}:1", "-o", tmp_path / name])
        assert "only as .safetensors" in line and "x.safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def test_folder_with_several_adapters_lists_them(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    line = _refused(capsys, ["info", tmp_path])
    assert "is a folder, not an adapter file; it holds 2 .safetensors files (a.safetensors, b.safetensors)" in line


def test_merging_adapters_for_different_bases_is_one_line(files, tmp_path, capsys):
    """A torch.cat RuntimeError before; now the layer, both files and both shapes (or both families)."""
    good = files["folder"][0] / "pytorch_lora_weights.safetensors"
    line = _refused(capsys, ["merge", f"{good}:1", f"{files['wrong_dims'][0]}:1", "-o", tmp_path / "m.safetensors"])
    assert f"layer unet.{MODULE} differs: {good} has lora_A [4, 32]" in line
    assert f"{files['wrong_dims'][0]} has lora_A [4, 48], lora_B [48, 4]" in line
    line = _refused(capsys, ["merge", f"{good}:1", f"{files['sdxl_on_sd1'][0]}:1", "-o", tmp_path / "m.safetensors"])
    assert "was made for sd1 (sdlora.family=sd1) but" in line and "for sdxl (its text_encoder_2 layers)" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_rank_never_dies_in_linalg(files, tmp_path, capsys, monkeypatch):
    """`merge --rank 2` died in _LinAlgError on a NaN file (now refused on reading); the SVD itself is guarded."""
    good = files["folder"][0] / "pytorch_lora_weights.safetensors"

    def diverges(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", diverges)
    line = _refused(capsys, ["merge", f"{good}:0.5", f"{good}:0.5", "--rank", "2", "-o", tmp_path / "m.safetensors"])
    assert "merge --rank 2: layer unet." in line and "the SVD did not converge" in line
    assert not (tmp_path / "m.safetensors").exists()


def test_nothing_non_finite_is_ever_written(files, tmp_path, capsys):
    """Finite input can still overflow: a cast to fp16 (max 65504), or a weight of 1e39 in a merge."""
    adapter = formats.read_adapter(files["folder"][0] / "pytorch_lora_weights.safetensors")
    adapter.tensors["unet"][f"{MODULE}.lora_A.weight"][0, 0] = 1e6
    large = formats.save_diffusers(tmp_path / "large.safetensors", adapter)
    line = _refused(capsys, ["convert", large, tmp_path / "half.safetensors", "--to", "diffusers", "--dtype", "fp16"])
    assert "not written: 1 tensor(s) would hold inf or NaN after the cast to float16" in line
    line = _refused(capsys, ["merge", f"{large}:1e39", "-o", tmp_path / "m.safetensors"])
    assert "is not finite after merging at these weights (1e+39)" in line
    assert "--lora 'x.safetensors:inf': weights must be finite" in _refused(
        capsys, ["generate", "--prompt", "x", "--lora", "x.safetensors:inf"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.safetensors"]
