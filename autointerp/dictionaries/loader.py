"""load_dictionary / load_dictionary_set: find the checkpoint (local path or hub id), detect its format, load it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from autointerp.errors import ConfigError

from . import hub
from .base import Dictionary, NeuronDictionary, as_units
from .gemmascope import load_gemmascope
from .saelens import load_saelens
from .sparsify import load_sparsify

FORMATS = ("auto", "sparsify", "saelens", "gemmascope", "itda", "qwenscope", "snmf", "neurons", "topk-neurons")
# The file whose presence marks a folder as one dictionary of that format (Qwen-Scope: one `layer{N}.sae.pt` per
# layer, see _QWENSCOPE).
MARKERS = {"sparsify": "sae.safetensors", "saelens": "sae_weights.safetensors", "gemmascope": "params.npz",
           "itda": "atoms.pt", "snmf": "snmf.safetensors", "qwenscope": "layer{N}.sae.pt"}
_EXPECTED = ("cfg.json+sae.safetensors (sparsify), cfg.json+sae_weights.safetensors (saelens), params.npz (gemmascope),"
             " atoms.pt+atom_indices.pt+metadata.yaml (itda), layer{N}.sae.pt (qwenscope), snmf.safetensors (snmf)")
_QWENSCOPE = re.compile(r"^layer(\d+)\.sae\.pt$")
_SETS = ("sparsify", "saelens", "gemmascope")  # formats a parent folder may hold one subfolder each of
_NEURONS = re.compile(r"^(?:neurons|topk-neurons:(\d+))$")
_ROOT_FILES = ["cfg.json", "sparsity.safetensors", *MARKERS.values()]


def _natural(name: str) -> list:
    # layers.2 before layers.10
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _qwenscope_files(d: Path) -> list[Path]:
    return sorted((p for p in d.glob("layer*.sae.pt") if _QWENSCOPE.match(p.name)), key=lambda p: _natural(p.name))


def _formats_in(d: Path) -> list[str]:
    found = [fmt for fmt, marker in MARKERS.items() if fmt != "qwenscope" and (d / marker).is_file()]
    return found + (["qwenscope"] if _qwenscope_files(d) else [])


def _children(d: Path, format: str) -> list[Path]:
    kids = [c for c in d.iterdir() if c.is_dir()]
    kids = [c for c in kids if (format in _formats_in(c) if format != "auto" else _formats_in(c))]
    return sorted(kids, key=lambda c: _natural(c.name))


def _listing(d: Path, limit: int = 12) -> str:
    names = sorted((p.name + ("/" if p.is_dir() else "") for p in d.iterdir()), key=_natural)
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return (", ".join(names[:limit]) + more) or "nothing"


class _Where:
    """A resolved checkpoint location: a local path, plus the hub reference and snapshot root when downloaded."""

    def __init__(self, path: Path, ref: hub.HubRef | None = None, root: Path | None = None):
        self.path, self.ref, self.root = path, ref, root

    def id(self, fmt: str, folder: Path) -> str:
        if self.ref is None:
            return f"{fmt}:{folder.resolve()}"
        rel = folder.relative_to(self.root).as_posix()
        return f"{fmt}:{self.ref.with_subpath(None if rel == '.' else rel)}"

    def default_hookpoint(self, folder: Path) -> str | None:
        # A sparsify folder is named after its hookpoint, except a hub snapshot root (named by commit hash).
        return None if self.ref is not None and folder == self.root else folder.name


def _locate(spec: str, selector: str | None) -> tuple[_Where, bool]:
    """(_Where, selector_consumed). A hub id without subpath uses `selector` (hookpoint) as its subpath."""
    p = Path(spec).expanduser()
    if p.exists():
        return _Where(p), False
    ref = hub.parse_hub_id(spec)
    if ref is None:
        raise ConfigError(f"{spec}: no such file or folder (and not a hub id of the form owner/repo[@rev][:subpath])")
    consumed = False
    if ref.subpath is None and selector:
        ref, consumed = ref.with_subpath(selector), True
    if ref.subpath is None:
        root, local = hub.download(ref, _ROOT_FILES)  # a repo root: only a root-level dictionary, never every folder
        if not _formats_in(local):
            raise ConfigError(
                f"{ref}: no dictionary at the hub repo's root; name one as {ref.repo_id}:<subfolder> or pass"
                f" hookpoint=<subfolder>{_hub_folders(ref)}"
            )
    else:
        try:
            root, local = hub.download(ref)
        except ConfigError as first:
            # a Qwen-Scope repo keeps one layer<N>.sae.pt per layer at its root, no folders: the selector names one
            m = re.match(r"^(?:layer|[a-z_]+\.)(\d+)$", selector) if consumed else None
            if m is None:
                raise
            try:
                root, local = hub.download(ref.with_subpath(f"layer{m.group(1)}.sae.pt"))
            except ConfigError:
                raise ConfigError(f"{first} (nor a Qwen-Scope file layer{m.group(1)}.sae.pt)") from None
    return _Where(local, ref.with_subpath(None), root), consumed


def _hub_folders(ref: hub.HubRef) -> str:
    try:  # best effort: name a few folders so the user can pick one
        from huggingface_hub import list_repo_files

        tops = sorted({f.split("/")[0] for f in list_repo_files(ref.repo_id, revision=ref.revision) if "/" in f}, key=_natural)
    except Exception:
        return ""
    return f" (folders: {', '.join(tops[:12])}{', …' if len(tops) > 12 else ''})" if tops else ""


def _load_folder(
    folder: Path, fmt: str, where: _Where, source: str, hookpoint: str | None, device, dtype, norm_scaling_factor,
    npz: Path | None = None,
) -> Dictionary:
    if norm_scaling_factor is not None and fmt != "saelens":
        raise ConfigError(f"{folder}: norm_scaling_factor applies to saelens checkpoints only, this is {fmt}")
    if fmt == "sparsify":
        hp = hookpoint if hookpoint is not None else where.default_hookpoint(folder)
        return load_sparsify(folder, source=source, id=where.id(fmt, folder), hookpoint=hp, device=device, dtype=dtype)
    if fmt == "saelens":
        return load_saelens(
            folder, source=source, id=where.id(fmt, folder), hookpoint=hookpoint, device=device, dtype=dtype,
            norm_scaling_factor=norm_scaling_factor,
        )
    if fmt == "itda":
        from .itda import load_itda

        return load_itda(folder, source=source, id=where.id(fmt, folder), hookpoint=hookpoint, device=device,
                         dtype=dtype)
    if fmt == "snmf":
        from .snmf import load_snmf

        return load_snmf(folder, source=source, id=where.id(fmt, folder), hookpoint=hookpoint, device=device,
                         dtype=dtype)
    if fmt == "qwenscope":  # `npz` carries the picked layer file (a folder holds one per layer)
        from .qwenscope import load_qwenscope

        files = [npz] if npz is not None else _qwenscope_files(folder)
        if len(files) != 1:
            raise ConfigError(f"{folder}: holds {len(files)} Qwen-Scope layer files ({', '.join(f.name for f in files)});"
                              " pass hookpoint=layer<N> or a path to one file")
        ident = f"{fmt}:{files[0].resolve()}" if where.ref is None else \
            f"{fmt}:{where.ref.with_subpath(files[0].relative_to(where.root).as_posix())}"
        return load_qwenscope(files[0], source=source, id=ident, hookpoint=hookpoint, device=device, dtype=dtype)
    npz = npz or folder / MARKERS["gemmascope"]
    # a file named other than params.npz is named in the id itself (the folder may hold several)
    ident = where.id(fmt, folder) if npz.name == MARKERS["gemmascope"] or where.ref is not None \
        else f"{fmt}:{npz.resolve()}"
    return load_gemmascope(npz, source=source, id=ident, hookpoint=hookpoint, device=device, dtype=dtype)


def _resolve_folder(path: Path, format: str, selector: str | None) -> tuple[Path, str, bool, Path | None]:
    """(folder, format, selector_consumed, npz_file) for a local path; picks a subfolder when given a parent."""
    if path.is_file():
        if _QWENSCOPE.match(path.name):
            if format not in ("auto", "qwenscope"):
                raise ConfigError(f"{path}: a layer<N>.sae.pt file is a qwenscope checkpoint, not format={format!r}")
            return path.parent, "qwenscope", False, path
        if path.suffix == ".npz":
            if format not in ("auto", "gemmascope"):
                raise ConfigError(f"{path}: an .npz file is a gemmascope checkpoint, not format={format!r}")
            return path.parent, "gemmascope", False, path
        if path.name in ("atom_indices.pt", "metadata.yaml"):
            path = path.parent
        elif path.name not in ("cfg.json", "sparsity.safetensors", *MARKERS.values()):
            raise ConfigError(f"{path}: not a dictionary file; expected a folder with {_EXPECTED}")
        path = path.parent
    found = _formats_in(path)
    if format != "auto":
        found = [f for f in found if f == format]
    if len(found) > 1:
        files = ", ".join(f"{MARKERS[f]} ({f})" for f in found)
        raise ConfigError(f"{path}: ambiguous dictionary folder, found {files}; pass format=<one of them>")
    if found == ["qwenscope"] and selector is not None:  # a folder of layer files: hookpoint=layer<N> picks one
        m = re.match(r"^(?:layer|[a-z_]+\.)(\d+)$", selector)
        pick = path / f"layer{m.group(1)}.sae.pt" if m else None
        if pick is None or not pick.is_file():
            have = ", ".join(f.name for f in _qwenscope_files(path))
            raise ConfigError(f"{path}: no Qwen-Scope file for '{selector}' (files here: {have})")
        return path, "qwenscope", True, pick
    if found:
        return path, found[0], False, None
    kids = _children(path, format)
    if selector is not None:
        pick = path / selector
        if pick.is_dir() and (_formats_in(pick) if format == "auto" else format in _formats_in(pick)):
            folder, fmt, _, npz = _resolve_folder(pick, format, None)
            return folder, fmt, True, npz
        raise ConfigError(f"{path}: no dictionary in subfolder '{selector}' (dictionaries here: {', '.join(c.name for c in kids) or 'none'})")
    if len(kids) == 1:
        return (*_resolve_folder(kids[0], format, None)[:2], False, None)
    if kids:
        names = ", ".join(c.name for c in kids[:12]) + (", …" if len(kids) > 12 else "")
        raise ConfigError(
            f"{path}: holds {len(kids)} dictionaries ({names}); pass hookpoint=<subfolder> or a path to one"
            " (load_dictionary_set loads them all)"
        )
    if format != "auto":
        need = "cfg.json+" + MARKERS[format] if format in ("sparsify", "saelens") else MARKERS[format]
        raise ConfigError(f"{path}: format={format!r} needs {need} here, not found (found: {_listing(path)})")
    raise ConfigError(f"{path}: no dictionary files found (found: {_listing(path)}); expected {_EXPECTED}, or subfolders of those")


def _neurons(spec: str, format: str, d_in: int | None, k: int | None, hookpoint, device, dtype) -> Dictionary:
    m = _NEURONS.match(spec)
    if format == "topk-neurons" or (format == "auto" and m and m.group(1)):
        k = k if k is not None else (int(m.group(1)) if m and m.group(1) else None)
        if k is None:
            raise ConfigError(f"{spec}: topk-neurons needs k: pass 'topk-neurons:K' or k=K")
    else:
        k = None
    if d_in is None or isinstance(d_in, bool) or not isinstance(d_in, int) or d_in < 1:
        raise ConfigError(f"{spec}: neuron dictionaries need d_in=<positive int, width of the hookpoint>, got {d_in!r}")
    if k is not None and not 1 <= k <= d_in:
        raise ConfigError(f"{spec}: topk-neurons k={k} must be between 1 and d_in={d_in}")
    return NeuronDictionary(d_in, k, hookpoint).to(device, dtype)


def load_dictionary(
    path_or_id: str | Path,
    format: str = "auto",
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    d_in: int | None = None,
    k: int | None = None,
    hookpoint: str | None = None,
    norm_scaling_factor: float | None = None,
) -> Dictionary:
    """Load one dictionary.

    path_or_id: a local folder or file (cfg.json, sae.safetensors, sae_weights.safetensors, params.npz, atoms.pt,
      layer<N>.sae.pt, snmf.safetensors), a hub id `owner/repo[@rev][:subpath]`, or a neuron spec `neurons` /
      `topk-neurons:K` (with d_in=).
    format: auto | sparsify | saelens | gemmascope | itda | qwenscope | snmf | neurons | topk-neurons.
    dtype: weights are cast to it (float32 by default, also for bfloat16 checkpoints); codes are always float32.
    hookpoint: picks the subfolder when the path holds several dictionaries (a sparsify parent folder, a hub repo
      without subpath); otherwise it replaces the checkpoint's own hookpoint name (neurons: names the hookpoint).
    norm_scaling_factor: SAELens `expected_average_only_in` checkpoints only: the dataset factor x is scaled by.
    """
    if format not in FORMATS:
        raise ConfigError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    spec = str(path_or_id)
    if format in ("neurons", "topk-neurons") or (format == "auto" and _NEURONS.match(spec) and not Path(spec).exists()):
        return _neurons(spec, format, d_in, k, hookpoint, device, dtype)
    where, consumed = _locate(spec, hookpoint)
    folder, fmt, picked, npz = _resolve_folder(where.path, format, None if consumed else hookpoint)
    hp = None if (consumed or picked) else hookpoint  # a selector is not a hookpoint override
    return _load_folder(folder, fmt, where, spec, hp, device, dtype, norm_scaling_factor, npz)


def load_dictionary_set(
    path: str | Path,
    *,
    hookpoints: list[str] | None = None,
    format: str = "auto",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    norm_scaling_factor: float | None = None,
) -> dict[str, Dictionary]:
    """All dictionaries in a parent folder (e.g. sparsify: one subfolder per hookpoint), keyed by hookpoint;
    only the subfolders named in `hookpoints` when given. `norm_scaling_factor` applies to every member.

    A hub id downloads only the named `hookpoints` subfolders when given, else the whole repo.
    A folder that is itself one dictionary gives a one-entry dict.
    """
    if format not in ("auto", *_SETS):
        raise ConfigError(f"format={format!r} is not one of auto, {', '.join(_SETS)} for a dictionary set")
    spec = str(path)
    p = Path(spec).expanduser()
    if p.exists():
        where = _Where(p)
    else:
        ref = hub.parse_hub_id(spec)
        if ref is None:
            raise ConfigError(f"{spec}: no such folder (and not a hub id of the form owner/repo[@rev][:subpath])")
        prefix = f"{ref.subpath}/" if ref.subpath else ""
        pats = [f"{prefix}{h}/*" for h in hookpoints] if hookpoints else hub.allow_patterns(ref)
        root, local = hub.download(ref, pats)
        where = _Where(local, ref.with_subpath(None), root)
    if not where.path.is_dir():
        raise ConfigError(f"{where.path}: load_dictionary_set needs a folder")
    if _formats_in(where.path):
        folders = [where.path]
    elif hookpoints:
        folders = [where.path / h for h in hookpoints]
        for f in folders:
            if not (f.is_dir() and _formats_in(f)):
                raise ConfigError(f"{where.path}: no dictionary in subfolder '{f.name}' (found: {_listing(where.path)})")
    else:
        folders = _children(where.path, format)
        if not folders:
            raise ConfigError(f"{where.path}: no dictionary subfolders found (found: {_listing(where.path)}); expected subfolders with {_EXPECTED}")
    out: dict[str, Dictionary] = {}
    for f in folders:
        folder, fmt, _, _ = _resolve_folder(f, format, None)
        d = _load_folder(folder, fmt, where, spec, None, device, dtype, norm_scaling_factor)
        key = d.hookpoint or folder.name
        if key in out:
            raise ConfigError(f"{where.path}: two dictionaries share hookpoint '{key}' ({out[key].id} and {d.id})")
        out[key] = d
    return out


__all__ = ["FORMATS", "MARKERS", "load_dictionary", "load_dictionary_set"]


def load_cached_dictionary(entry: dict, device: str | torch.device = "cpu", *, dtype: torch.dtype = torch.float32
                           ) -> Dictionary:
    """Reload the dictionary a LatentCache was made with, from its manifest entry (`manifest["dictionary"]`), as the
    units the cache holds (a signed dictionary's poles: `as_units`).

    The entry's `id` names the exact checkpoint (`<format>:<folder or hub ref with subpath>`), so one member of a
    sparsify set reloads as itself; `source` (what the user typed, maybe the set's parent folder) would not."""
    fmt, where = str(entry["id"]).split(":", 1)
    if fmt in ("neurons", "topk-neurons"):
        d = load_dictionary(entry["source"], d_in=int(entry["d_in"]), device=device, dtype=dtype)
        if d.signed and not entry.get("signed"):  # a cache made before neurons were signed: its units are neurons
            return d
        return as_units(d)
    d = as_units(load_dictionary(where, format=fmt, device=device, dtype=dtype,
                                 norm_scaling_factor=entry.get("norm_scaling_factor")))
    if d.n_latents != int(entry["n_latents"]) or d.d_in != int(entry["d_in"]):
        raise ConfigError(f"{where}: the checkpoint changed since the cache was made (now {d.n_latents} latents × "
                          f"d_in {d.d_in}, the cache says {entry['n_latents']} × {entry['d_in']})")
    return d
