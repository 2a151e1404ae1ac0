"""Checks on tensor files from strangers, made before any loader touches them.

A safetensors file is `u64 little-endian N` + `N bytes of JSON header` + a data region; the header maps each tensor
name to `dtype`, `shape` and `data_offsets` [begin, end) inside the data region. safetensors' own reader refuses
most broken files, but its errors are terse and a header can still ask it to allocate a lot. Here every claim of the
header is checked against the file itself with nothing but `os.stat` and one bounded read: the header length fits
in the file and under a limit, the JSON is an object of well-formed entries, each tensor's byte range matches its
dtype and shape, lies inside the file, and the ranges neither overlap nor leave holes.

A pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`) can run code when loaded: `check_single_file` refuses it
unless the user opts in (`model.allow_pickle`), and even then only if `torch.load(weights_only=True)` accepts it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from sdlora.errors import UserError

# Real LoRA headers are a few hundred KB at most (kohya's ss_tag_frequency is the big one); 100 MB is safetensors'
# own upper bound and far beyond any honest file.
MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}


class UnsafeFileError(UserError, ValueError):
    """A tensor file whose structure is broken or lies about its contents; the message says what and where."""


def validate_safetensors(path: str | Path, max_header_bytes: int = MAX_HEADER_BYTES) -> dict:
    """Return the parsed header of `path` after checking it against the file; raise `UnsafeFileError` if it lies."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise UnsafeFileError(f"{path}: empty file (0 bytes), e.g. an interrupted download or copy; get it again")
    sniff_pickle(path)
    if size < 8:
        raise UnsafeFileError(f"{path}: truncated: {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > max_header_bytes:
            raise UnsafeFileError(
                f"{path}: header of {header_len} bytes is over the {max_header_bytes}-byte limit; refusing to read it"
            )
        if 8 + header_len > size:
            raise UnsafeFileError(
                f"{path}: truncated or corrupt: the header claims {header_len} bytes but the file has only "
                f"{size - 8} after the length field"
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsafeFileError(f"{path}: header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise UnsafeFileError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    _check_metadata(path, header.get("__metadata__"))
    _check_tensors(path, {k: v for k, v in header.items() if k != "__metadata__"}, size - 8 - header_len)
    return header


def _check_metadata(path: Path, metadata: object) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeFileError(f"{path}: __metadata__ must map names to strings")


def _check_tensors(path: Path, entries: dict, data_bytes: int) -> None:
    ranges = []
    for name, entry in entries.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise UnsafeFileError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise UnsafeFileError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise UnsafeFileError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise UnsafeFileError(f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if not 0 <= begin <= end:
            raise UnsafeFileError(f"{where}: data_offsets {offsets} are not an increasing range")
        if end - begin != expected:
            raise UnsafeFileError(
                f"{where}: data_offsets span {end - begin} bytes but {dtype} {shape} needs {expected}"
            )
        if end > data_bytes:
            raise UnsafeFileError(
                f"{where}: data ends at byte {end} but the file holds only {data_bytes} data bytes (truncated?)"
            )
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a hole at byte {position}"
            raise UnsafeFileError(f"{path}: tensor {name!r} {problem}; the header's data_offsets are inconsistent")
        position = end
    if position != data_bytes:
        raise UnsafeFileError(
            f"{path}: the tensors cover {position} bytes but the data region has {data_bytes}; extra bytes follow"
        )


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# torch.save writes a zip archive (since torch 1.6) or, before that and in many .ckpt files, a bare pickle stream,
# which opens with the PROTO opcode and a protocol number. Read as safetensors, either is a "header" of ~10^17 bytes.
_ZIP_MAGIC = b"PK\x03\x04"


def sniff_pickle(path: str | Path) -> None:
    """Refuse a PyTorch pickle (whatever its name) with a message that says what it is and how to convert it."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(_ZIP_MAGIC):
        kind = "a zip archive, as torch.save writes"
    elif len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        kind = "a pickle stream"
    else:
        return
    raise UnsafeFileError(
        f"{path} looks like a PyTorch pickle file ({kind}), not safetensors; pickles can run code when loaded, so sdlora "
        "does not open it. Convert it once in an isolated environment: python -c \"import torch, safetensors.torch "
        f"as st; st.save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')\"")


def check_single_file(path: str | Path, allow_pickle: bool) -> None:
    """Gate for a single-file base checkpoint: safetensors is validated; pickle only with the opt-in, and only if
    `torch.load(weights_only=True)` accepts it (plain tensors and containers, no code). Raises UnsafeFileError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        validate_safetensors(path)
        return
    if path.suffix not in PICKLE_SUFFIXES:
        raise UnsafeFileError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors")
    if not allow_pickle:
        raise UnsafeFileError(
            f"{path} is a pickle checkpoint ({path.suffix}), which can run code when loaded; sdlora refuses it "
            "unless model.allow_pickle=true (then it is loaded with torch.load(weights_only=True)). Better: convert "
            "it to .safetensors"
        )
    import pickle

    import torch

    try:
        # mmap: a multi-GB checkpoint is checked without reading it into memory (diffusers loads it again, also
        # with weights_only=True).
        torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsafeFileError(
            f"{path}: refused: torch.load(weights_only=True) cannot load it safely ({first}). It holds more than "
            "tensors (possibly code); convert it to .safetensors in an isolated environment"
        ) from None


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"
