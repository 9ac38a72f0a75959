"""File readers and field/shape checks that turn every failure into a one-line ConfigError naming the file."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from autointerp.errors import ConfigError


def one_line(e: BaseException, limit: int = 200) -> str:
    """Exception text squeezed onto one line (the CLI prints errors on one line)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({one_line(e)})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path: Path, dtype: torch.dtype | None = None, keep: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, mapped (pages come into memory as they are read). With `dtype`, the
    float tensors stored in another dtype, except those named in `keep`, are read a slice at a time into `dtype`
    instead: converting a mapped tensor would leave all its source pages resident beside the copy (2.4 GB for a
    1M-latent fp32 encoder converted to bf16)."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
        convert = [k for k, v in tensors.items() if dtype is not None and v.dtype != dtype and k not in keep
                   and v.dtype in _SAFETENSORS_FLOATS.values()]  # others: converted from the mapping by the loader
        if convert:
            tensors.update(_read_as(path, convert, dtype))  # the mapped originals are dropped untouched
    except Exception as e:  # safetensors raises its own error type (and OSError) for garbage/truncated files
        raise ConfigError(f"{path}: cannot read safetensors file, corrupt or truncated? ({one_line(e)})") from e
    return tensors


def _read_as(path: Path, names: list[str], dtype: torch.dtype, chunk_bytes: int = 64 << 20) -> dict[str, Tensor]:
    """Tensors `names` of a safetensors file read with plain reads (8-byte header size, JSON header, then the data,
    little-endian) and converted `chunk_bytes` at a time."""
    out = {}
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name in names:
            h = header[name]
            src = _SAFETENSORS_FLOATS[h["dtype"]]
            t = torch.empty(h["shape"], dtype=dtype)
            flat, step = t.view(-1), max(1, chunk_bytes // src.itemsize)
            f.seek(8 + size + h["data_offsets"][0])
            for i in range(0, flat.numel(), step):
                m = min(step, flat.numel() - i)
                flat[i:i + m] = torch.frombuffer(bytearray(f.read(m * src.itemsize)), dtype=src)
            out[name] = t
    return out


def read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        # Arrays inside an npz load lazily: read them all here so a truncated member fails now, with the name.
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ConfigError(f"{path}: cannot read npz file, corrupt or truncated? ({one_line(e)})") from e


def need_tensor(tensors: dict[str, Any], name: str, path: Path) -> Any:
    if name not in tensors:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise ConfigError(f"{path}: missing tensor '{name}' (found: {found})")
    return tensors[name]


def check_shape(path: Path, name: str, t: Any, expected: tuple[int, ...], desc: str) -> None:
    """`desc` says where the expected sizes come from, e.g. '(n_latents=16, d_in=8) from cfg.json'."""
    shape = tuple(int(s) for s in t.shape)
    if shape != tuple(expected):
        raise ConfigError(f"{path}: {name} has shape {shape}, expected {desc}")


def cfg_int(cfg: dict[str, Any], key: str, path: Path, default: int | None = None, *, minimum: int = 1) -> int:
    """A required (default None) or defaulted integer field of a config file."""
    if key not in cfg or cfg[key] is None:
        if default is None:
            raise ConfigError(f"{path}: missing required field '{key}'")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < minimum:
        raise ConfigError(f"{path}: field '{key}' must be an integer >= {minimum}, got {v!r}")
    return int(v)


def cfg_bool(cfg: dict[str, Any], key: str, path: Path, default: bool) -> bool:
    v = cfg.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{path}: field '{key}' must be true or false, got {v!r}")
    return v


def to_float(t: Tensor | np.ndarray, dtype: torch.dtype, device: str | torch.device) -> Tensor:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(t)
    return t.to(device=device, dtype=dtype)
