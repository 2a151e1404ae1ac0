"""Untrusted files are refused with a message before any loader trusts them: broken or lying safetensors headers,
pickle checkpoints without the opt-in, and pickles that would run code even with it."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from sdlora.files.untrusted import (
    UnsafeFileError,
    check_single_file,
    validate_safetensors,
)
from sdlora.formats import AdapterFormatError, read_adapter, read_safetensors
from sdlora.models import ModelLoadError, load_base_model


def _good_file(path):
    save_file({"unet.a.lora_A.weight": torch.ones(2, 8), "unet.a.lora_B.weight": torch.zeros(8, 2)}, str(path))
    return path


def _with_header(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_a_valid_file_passes_and_reads(tmp_path):
    path = _good_file(tmp_path / "ok.safetensors")
    header = validate_safetensors(path)
    assert header["unet.a.lora_A.weight"]["shape"] == [2, 8]
    assert read_adapter(path).shapes["unet"].rank == 2


def test_truncated_file_is_refused(tmp_path):
    path = _good_file(tmp_path / "cut.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AdapterFormatError, match="cut.safetensors.*truncated"):
        read_safetensors(path)
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(AdapterFormatError, match="shorter than the 8-byte header length"):
        read_safetensors(tmp_path / "tiny.safetensors")


def test_header_longer_than_the_file_is_refused(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 5000) + b'{"__metadata__": {}}')
    with pytest.raises(AdapterFormatError, match="header claims 5000 bytes but the file has only 20"):
        read_safetensors(path)


def test_huge_header_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(AdapterFormatError, match="over the 104857600-byte limit"):
        read_safetensors(path)
    # the limit is a parameter: a 1 KB cap refuses an ordinary small header
    big = tmp_path / "big.safetensors"
    save_file({"x": torch.zeros(1)}, str(big), metadata={"note": "n" * 4000})
    with pytest.raises(UnsafeFileError, match="over the 1024-byte limit"):
        validate_safetensors(big, max_header_bytes=1024)


@pytest.mark.parametrize(
    ("entry", "data", "message"),
    [
        ({"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 16]}, b"\0" * 16, "span 16 bytes but F32"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, b"\0" * 8, "only 8 data bytes"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, b"\0" * 16, "leaves a hole at byte 0"),
        ({"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}, b"\0" * 8, "unknown dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, b"\0" * 8, "non-negative integers"),
    ],
)
def test_offsets_that_lie_about_tensor_sizes_are_refused(tmp_path, entry, data, message):
    path = tmp_path / "lies.safetensors"
    _with_header(path, {"unet.a.lora_A.weight": entry}, data)
    with pytest.raises(AdapterFormatError, match=message):
        read_adapter(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "overlap.safetensors"
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    _with_header(path, {"a": entry, "b": entry}, b"\0" * 8)
    with pytest.raises(UnsafeFileError, match="overlaps the previous tensor"):
        validate_safetensors(path)


class _Payload:
    """Unpickling this runs `open(marker, 'w')`: the classic pickle code-execution trick, made harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_base_is_refused_without_the_flag(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    with pytest.raises(ModelLoadError, match=r"pickle checkpoint \(\.ckpt\).*model.allow_pickle=true"):
        load_base_model(str(ckpt))


def test_pickle_that_runs_code_is_refused_even_with_the_flag(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError, match=r"weights_only=True\) cannot load it safely"):
        check_single_file(evil, allow_pickle=True)
    with pytest.raises(ModelLoadError, match="refused"):
        load_base_model(str(evil), allow_pickle=True)
    assert not marker.exists(), "the pickle's code ran"

    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    check_single_file(plain, allow_pickle=True)  # tensors only: accepted with the flag


def test_allow_pickle_is_a_config_field():
    from sdlora.config import load_config

    assert load_config(None, []).model.allow_pickle is False
    assert load_config(None, ["model.allow_pickle=true"]).model.allow_pickle is True
