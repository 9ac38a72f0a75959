"""Extraction: corpus → subject model → dictionary.encode → Collector → LatentCache, in one streaming pass.

`extract(...)` is what the CLI and the GPU worker call. Several (hookpoint, dictionary) targets share one forward
pass. The run checkpoints its state every `checkpoint_every_s` seconds into `<out>/.partial/`; re-running the same
command resumes from there, and a run whose inputs differ from what the folder holds is refused instead of mixed in.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import __version__
from .cache import ARRAYS, ARRAYS_V1, FORMAT_VERSION, LatentCache, hist_edges, write_kept
from .collector import Collector, CollectorConfig, SparseCodes, planned_bytes
from .corpus import CorpusSpec, count_windows, is_local, iter_windows
from .dictionaries.base import Poles
from .errors import ConfigError
from .heads import n_heads_of
from .names import dictionary_name
from .subject import SubjectModel, load_subject, mlp_read_and_write, translate_hookpoint

log = logging.getLogger(__name__)


@dataclass
class Target:
    """One (hookpoint, dictionary) pair and where its cache goes."""

    dictionary: object  # autointerp.dictionaries.Dictionary
    hookpoint: str
    out_dir: Path
    collector: Collector | None = None
    identity: dict = field(default_factory=dict)


def _load_dictionary(spec, subject: SubjectModel, hookpoint: str | None, device, norm_scaling_factor=None,
                     dtype=torch.float32):
    from .dictionaries import load_dictionary

    if not isinstance(spec, str):
        return spec  # an already-loaded Dictionary
    if spec == "neurons" or spec.startswith("topk-neurons"):
        if not hookpoint:
            raise ConfigError(f"--dictionary {spec}: raw neurons need --hookpoint (e.g. mlp_neurons.12)")
        return load_dictionary(spec, d_in=subject.width(hookpoint), hookpoint=hookpoint, device=device)
    # loaded straight in the encode dtype: a bf16 checkpoint of 1M latents is never widened to fp32 on the way
    return load_dictionary(spec, device=device, norm_scaling_factor=norm_scaling_factor, dtype=dtype)


def _encode_dtype(name: str | None) -> torch.dtype:
    from .hf_loading import pick_dtype

    if name is None:
        return torch.float32
    try:
        return pick_dtype(name, torch.device("cpu"))
    except ConfigError:
        raise ConfigError(f"--encode-dtype: unknown dtype {name!r} (expected float32, bfloat16 or float16)") from None


def _members(spec, hookpoint: str | None, subject: SubjectModel, device,
             norm_scaling_factor: float | None = None, dtype=torch.float32) -> list[tuple]:
    """A local parent folder holding several dictionaries (a sparsify set: one subfolder per hookpoint) expands to
    its members, each at its own hookpoint; with a hookpoint given, to the member at that hookpoint (matched by
    subfolder name or by what the name means, e.g. layers.12 = resid_post.12). Anything else is one target.
    Only the chosen member's weights are loaded onto the device (a 24-layer set of big SAEs would not fit a GPU)."""
    from .dictionaries.loader import _children, _formats_in, load_dictionary_set

    if isinstance(spec, str) and hookpoint is not None and not Path(spec).expanduser().exists():
        hub_set = _hub_member(spec, hookpoint, device, dict(norm_scaling_factor=norm_scaling_factor, dtype=dtype))
        if hub_set is not None:
            return [hub_set]
    p = Path(spec).expanduser() if isinstance(spec, str) else None
    if p is not None and p.is_dir() and hookpoint is not None and _formats_in(p) == ["qwenscope"]:
        # a folder of Qwen-Scope layer files: --hookpoint (layer<N> or resid_post.<N>) picks the file, which
        # then names its own hookpoint
        from .dictionaries import load_dictionary

        d = load_dictionary(spec, hookpoint=hookpoint, device=device, norm_scaling_factor=norm_scaling_factor,
                            dtype=dtype)
        return [(d, translate_hookpoint(d.hookpoint))]
    kids = _children(p, "auto") if p is not None and p.is_dir() and not _formats_in(p) else []
    if len(kids) < 2:
        return [(spec, hookpoint)]
    kw = dict(norm_scaling_factor=norm_scaling_factor, dtype=dtype)
    if hookpoint is None:
        return [(d, None) for d in load_dictionary_set(spec, device=device, **kw).values()]
    want = translate_hookpoint(hookpoint)
    named = [c.name for c in kids if hookpoint == c.name or want == translate_hookpoint(c.name)]
    # folder names say the hookpoint (sparsify): load that member only; else (members that name their hookpoint in
    # their config, e.g. SAELens) read every member on the CPU to find it, and move only that one
    members = load_dictionary_set(spec, hookpoints=named, device=device, **kw) if len(named) == 1 else \
        load_dictionary_set(spec, device="cpu", **kw)
    pick = [d for key, d in members.items() if hookpoint == key or want == translate_hookpoint(key)]
    if len(pick) != 1:
        raise ConfigError(f"--dictionary {spec}: no member at hookpoint {hookpoint} (members: "
                          f"{', '.join(c.name for c in kids)})")
    return [(pick[0], want)]


def _hub_member(spec: str, hookpoint: str, device, kw: dict) -> tuple | None:
    """A hub repo id without subpath, with --hookpoint: the repo's subfolder of that name (a sparsify set on the hub,
    e.g. EleutherAI/sae-pythia-70m-32k + layers.3), extracted at what the name means; or, when the repo root itself
    holds the dictionary, that one, applied at --hookpoint. None for anything but such a hub id."""
    from .dictionaries import load_dictionary
    from .dictionaries.hub import parse_hub_id

    ref = parse_hub_id(spec)
    if ref is None or ref.subpath is not None:
        return None
    try:
        d = load_dictionary(spec, hookpoint=hookpoint, device=device, **kw)
    except ConfigError as member_error:
        try:
            root = load_dictionary(spec, device=device, **kw)
        except ConfigError:
            raise member_error from None  # neither a member nor a root dictionary: the member's error says more
        return root, hookpoint
    return d, translate_hookpoint(hookpoint)


def _resolve_targets(subject: SubjectModel, dictionaries: list, hookpoints: list[str | None], out: Path,
                     device, norm_scaling_factor: float | None = None, dtype=torch.float32) -> list[Target]:
    if len(hookpoints) == 1 and len(dictionaries) > 1:
        hookpoints = hookpoints * len(dictionaries)
    if len(hookpoints) != len(dictionaries):
        raise ConfigError(f"--hookpoint: give one, or one per dictionary ({len(dictionaries)} dictionaries, "
                          f"{len(hookpoints)} hookpoints)")
    targets = []
    members = [m for spec, hp in zip(dictionaries, hookpoints)
               for m in _members(spec, hp, subject, device, norm_scaling_factor, dtype)]
    for spec, hp in members:
        d = _load_dictionary(spec, subject, hp, device, norm_scaling_factor, dtype)
        if hp is None:
            if not getattr(d, "hookpoint", None):
                raise ConfigError(f"dictionary {getattr(d, 'source', spec)} names no hookpoint: pass --hookpoint")
            hp = translate_hookpoint(d.hookpoint)
            if getattr(d, "transcoder", False) and getattr(d, "input_hookpoint", None):
                hp = translate_hookpoint(d.input_hookpoint)  # SAELens transcoders name what they read (hook_name)
        hook = subject.hookpoint(hp)  # raises with close matches when unknown
        if getattr(d, "transcoder", False) and hook.mode == "output" and not hp.endswith(":output"):
            hp = mlp_read_and_write(subject.model, hook)[0]  # a transcoder reads what goes INTO the MLP it replaces
            hook = subject.hookpoint(hp)
        width = subject.width(hp)
        if d.d_in != width:
            raise ConfigError(f"dictionary {getattr(d, 'source', spec)}: d_in={d.d_in} but hookpoint {hp} "
                              f"({hook.module_path}, {hook.mode}) has width {width}")
        if hasattr(d, "to"):
            d.to(device)  # a Dictionary passed in through the API may still be on the CPU
        if getattr(d, "signed", False):
            d = Poles(d)  # both poles of every latent, as units (unsigned dictionaries go in as they are)
        targets.append(Target(d, hp, out))
    if len(targets) > 1:
        # each target's subfolder has the name the store registers it under
        names = [dictionary_name(getattr(t.dictionary, "id", "dict"), t.hookpoint) for t in targets]
        if len(set(names)) != len(names):
            names = [f"{i}_{n}" for i, n in enumerate(names)]
        for t, n in zip(targets, names):
            t.out_dir = out / n
    return targets


def _identity(subject: SubjectModel, t: Target, corpus: CorpusSpec, cfg: CollectorConfig,
              max_norm_ratio: float) -> dict:
    d = t.dictionary
    return {
        "model": subject.spec,
        "model_dtype": str(subject.dtype).replace("torch.", ""),
        "ignored_positions": {"special_tokens": True, "max_norm_ratio": max_norm_ratio},
        "hookpoint": t.hookpoint,
        "dictionary": {"id": str(d.id), "format": d.format, "source": str(d.source), "n_latents": int(d.n_latents),
                       "d_in": int(d.d_in), "transcoder": bool(getattr(d, "transcoder", False)),
                       "encode_dtype": str(d.dtype).replace("torch.", ""),
                       "norm_scaling_factor": getattr(d, "input_scale", None),
                       # a signed dictionary's units are its poles; unsigned identities stay as they were
                       **({"signed": True, "n_base": int(d.n_base)} if isinstance(d, Poles) else {})},
        "corpus": corpus.as_dict(),
        "collector": cfg.as_dict(),
    }


# identity fields added after caches were already made, with the value those caches were made with
_IDENTITY_DEFAULTS = {"dictionary": {"encode_dtype": "float32", "norm_scaling_factor": None}}


def _same_run(a: dict, b: dict) -> bool:
    keys = ("model", "model_dtype", "ignored_positions", "hookpoint", "dictionary", "corpus", "collector")

    def norm(m: dict, k: str):
        v = m.get(k)
        return {**_IDENTITY_DEFAULTS[k], **v} if k in _IDENTITY_DEFAULTS and isinstance(v, dict) else v
    return all(norm(a, k) == norm(b, k) for k in keys)


def _describe(m: dict) -> str:
    return (f"model {m.get('model')}, hookpoint {m.get('hookpoint')}, dictionary {m.get('dictionary', {}).get('id')}, "
            f"corpus {m.get('corpus', {}).get('source')} n_tokens={m.get('corpus', {}).get('n_tokens')}")


CACHE_FILES = {f"{a}.npy" for a in ARRAYS + ARRAYS_V1} | {"stats.npz", "manifest.json"}


def _check_out_dir(t: Target, overwrite: bool) -> str:
    """'done' when an identical complete cache is there, 'fresh' otherwise; refuses a folder holding something else."""
    mpath = t.out_dir / "manifest.json"
    if mpath.is_file():
        try:
            m = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            m = {}
        if m.get("complete") and _same_run(m, t.identity) and not overwrite:
            return "done"
        if not _same_run(m, t.identity) and not overwrite:
            raise ConfigError(f"{t.out_dir}: holds a cache of another run ({_describe(m)}); "
                              "use another --out folder or --overwrite")
    elif t.out_dir.exists() and not overwrite and any(
            p.is_file() and p.name not in (*CACHE_FILES, _LOCK) for p in t.out_dir.iterdir()):
        # only files a cache is made of are tolerated: they are what a run killed mid-publish leaves behind
        raise ConfigError(f"{t.out_dir}: folder exists and is not a latent cache; use another --out or --overwrite")
    return "fresh"


_LOCK = ".extract.lock"  # beside .partial/, not in it: --overwrite deletes .partial/ only once it holds the lock


class _Checkpoint:
    """`<out>/.partial/`: windows.bin (append-only token ids) + state.pt (collector states), written atomically."""

    def __init__(self, root: Path, ctx_len: int):
        self.dir = root / ".partial"
        self.ctx_len = ctx_len
        self.windows_path = self.dir / "windows.bin"
        self.state_path = self.dir / "state.pt"
        self._fh = None
        self._lock = None

    def load(self, identities: list[dict]) -> dict | None:
        if not self.state_path.is_file():
            return None
        try:
            st = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception:  # a torn state file: start over rather than trust it
            log.warning("checkpoint %s unreadable; restarting", self.state_path)
            return None
        if len(st["identities"]) != len(identities) or not all(
                _same_run(a, b) for a, b in zip(st["identities"], identities)):
            raise ConfigError(f"{self.dir}: holds an unfinished run of other inputs ({_describe(st['identities'][0])}); "
                              "re-run that command to finish it, or pass --overwrite")
        done = {int(c["n_windows"]) for c in st["states"]}
        have = self.windows_path.stat().st_size // (4 * self.ctx_len) if self.windows_path.exists() else 0
        if len(done) != 1 or have < done.pop():
            log.warning("checkpoint %s inconsistent with %s; restarting", self.state_path, self.windows_path)
            return None
        return st

    def lock(self) -> None:
        """One writer per folder: a second process (e.g. a duplicate task delivery) fails at once."""
        import fcntl

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir.parent / _LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise ConfigError(f"{self.dir.parent}: another extraction is writing this folder") from None

    def unlock(self, remove: bool = False) -> None:
        """Release the folder; `remove` (a finished run) deletes the lock file first, while still holding it."""
        if self._lock is not None:
            if remove:
                (self.dir.parent / _LOCK).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def open(self, n_windows_done: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        keep = n_windows_done * self.ctx_len * 4
        mode = "r+b" if self.windows_path.exists() else "w+b"
        self._fh = open(self.windows_path, mode)
        self._fh.truncate(keep)  # drop windows written after the last checkpoint
        self._fh.seek(keep)

    def append(self, windows: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(windows, dtype=np.int32).tobytes())

    def save(self, identities: list[dict], collectors: list[Collector]) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        tmp = self.state_path.with_suffix(".tmp")
        torch.save({"identities": identities, "states": [c.state() for c in collectors]}, tmp)
        os.replace(tmp, self.state_path)

    def windows(self) -> np.ndarray:
        self._fh.flush()
        return np.memmap(self.windows_path, dtype=np.int32, mode="r").reshape(-1, self.ctx_len)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None


GiB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    """What this process may still take: MemAvailable, or less under a cgroup (container) limit."""
    info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    avail = int(info["MemAvailable"].split()[0]) * 1024
    cg = Path("/sys/fs/cgroup")
    try:
        limit, current = (cg / "memory.max").read_text().strip(), (cg / "memory.current").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(current))
    except (OSError, ValueError):
        pass
    return avail


@dataclass
class Plan:
    """Planned peak memory (bytes on the collector's device) and disk of one extraction, by part."""

    loaded: int  # what is resident already: model, dictionaries, on the host or the device
    collector: int
    batch: int  # what comes and goes: one batch (forward activations, encode chunk, the collector's merge)
    #             or, between batches, the copies a checkpoint or the publish step makes; the larger
    budget: int
    device: str
    disk_cache: int
    disk_running: int  # windows.bin and the checkpoint (the collector's state) while the run lasts

    @property
    def peak(self) -> int:
        return self.loaded + self.collector + self.batch

    def describe(self) -> str:
        return (f"plan: peak memory <= {self.peak / GiB:.2f} GiB on {self.device} (model + dictionaries "
                f"{self.loaded / GiB:.2f}, collector {self.collector / GiB:.2f}, per batch {self.batch / GiB:.2f}) of "
                f"{self.budget / GiB:.1f} GiB available; disk <= {self.disk_cache / 1e6:.0f} MB for the cache "
                f"(+ {self.disk_running / 1e6:.0f} MB of window tokens and checkpoint while running)")

    def check(self, top_k: int, n_sample: int, batch_size: int, max_memory: float | None) -> None:
        if self.peak <= self.budget:
            return
        fix = (f"lower --top-k/--n-sample ({top_k}/{n_sample})" if self.collector >= self.batch
               else f"lower --batch-size ({batch_size})")
        given = "--max-memory" if max_memory is not None else "this machine has"
        raise ConfigError(f"planned peak memory {self.peak / GiB:.1f} GiB exceeds the {self.budget / GiB:.1f} GiB "
                          f"{given} available (collector {self.collector / GiB:.1f}, per batch "
                          f"{self.batch / GiB:.1f}): {fix}")


def plan_extraction(subject: SubjectModel, targets: list[Target], cfg: CollectorConfig, n_windows: int,
                    ctx_len: int, batch_size: int, max_memory: float | None = None) -> Plan:
    """Bounds, not guesses where a bound exists: the collector's arrays are sized exactly; kept windows and
    activations are bounded by the slots, by the windows the run sees and by the codes that fire (top-k and
    groupmax dictionaries fire at most k per token; the other rules are assumed to fire at most
    DENSE_NNZ_PER_TOKEN: see `Dictionary.nnz_bound`); the encode holds one chunk of codes at a time, in the encode
    dtype. What is loaded already (model, dictionary weights) is measured."""
    n_tokens, batch_tok = n_windows * ctx_len, batch_size * ctx_len
    collector = batch = between = disk = state = kept_windows = 0
    for t in targets:
        d, n = t.dictionary, t.dictionary.n_latents
        nnz = d.nnz_bound()
        encode, chunk = d.encode_bytes(batch_tok)
        parts = planned_bytes(n, ctx_len, cfg, nnz, n_tokens, batch_size, chunk)
        collector += parts["slots"] + parts["stats"] + parts["arena"] + parts["pool"]
        batch = max(batch, encode + parts["merge"])
        between = max(between, parts["state"])
        live = parts["live"] * parts["entry"]  # bytes of the live entries, as stored
        state += parts["kept"] * 14 + parts["stats"] + live + parts["pool"]  # a checkpoint holds filled slots only
        disk += parts["kept"] * 10 + live + n * (4 * cfg.hist_bins + 36) + parts["pool_pairs"] * 6
        kept_windows += parts["kept"]
    cfg_m = subject.model.config
    hidden = getattr(cfg_m, "hidden_size", 1024)
    heads = getattr(cfg_m, "num_attention_heads", 16)
    batch += batch_tok * hidden * 4 * 16 + batch_size * heads * ctx_len * ctx_len * 4 * 2  # forward activations
    batch = max(batch, between)  # a checkpoint or the publish step comes between batches
    dev = subject.device
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        loaded = torch.cuda.memory_allocated(dev)
        budget = loaded + free
    else:  # a mapped checkpoint's encoder weights come into memory with the first batch: count them now
        loaded = _rss_bytes() + sum(t.dictionary.unloaded_bytes() for t in targets)
        budget = _rss_bytes() + _available_bytes()
    if max_memory is not None:
        budget = int(max_memory * GiB)
    disk += min(n_windows, kept_windows + cfg.pool_size) * ctx_len * 4
    return Plan(loaded, collector, batch, budget, str(dev), disk, n_tokens * 4 + state)


def _head_shares(t: Target, extra: dict) -> np.ndarray | None:
    """attn_z dictionaries (not transcoders): each unit's decoder-norm share per attention head (autointerp.heads);
    the merge of a job's shards has no dictionary loaded and reloads it from the identity."""
    from .heads import head_shares

    n_heads = extra.get("n_heads")
    if not n_heads or not t.hookpoint.startswith("attn_z.") or t.identity["dictionary"].get("transcoder"):
        return None
    if t.dictionary is not None:
        d = t.dictionary
    else:
        from .dictionaries import load_cached_dictionary

        d = load_cached_dictionary(t.identity["dictionary"])
    return head_shares(d.decoder_directions(), n_heads)


def _publish(t: Target, collector: Collector, windows: np.ndarray, extra: dict) -> None:
    """Write the final cache into <out>/.partial/publish-<slug>/ and move it into place, manifest last."""
    c = collector
    pool_ids = np.sort(c.pool_ids.cpu().numpy())
    kept_ids = [b.ids[b.ids >= 0].cpu().numpy() for b in (c.top, c.sample)]
    used = np.unique(np.concatenate([*kept_ids, pool_ids]))

    def rows(ids):
        return np.searchsorted(used, ids).astype(np.int32)

    stage = t.out_dir / ".partial" / "publish"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    np.save(stage / "windows.npy", np.asarray(windows[used], dtype=np.int32))
    corpus = t.identity.get("corpus") or {}
    if corpus.get("chat"):  # each stored token's role (autointerp.chat), recomputed from the corpus
        from .chat import window_roles
        from .tokens import tokenizer_for

        np.save(stage / "roles.npy", window_roles(CorpusSpec(**corpus), tokenizer_for(t.identity["model"]), used))
    for name, buf, ids in (("top", c.top, kept_ids[0]), ("sample", c.sample, kept_ids[1])):
        write_kept(stage, name, buf.export(), c.n, len(ids), buf.live, rows, windows.shape[1])
    np.save(stage / "hist.npy", c.hist.cpu().numpy())
    shares = _head_shares(t, extra)
    if shares is not None:
        np.save(stage / "head_share.npy", shares.astype(np.float16))
    np.savez(stage / "stats.npz", n_active=c.n_active.cpu().numpy(), act_sum=c.act_sum.cpu().numpy(),
             act_max=c.act_max.cpu().numpy(), hist_edges=hist_edges(c.cfg.hist_bins))
    indptr, lats, maxs = [0], [], []
    for wid in pool_ids.tolist():
        lat, mx = c.pool_codes[wid]
        lats.append(lat.cpu().numpy())
        maxs.append(mx.cpu().numpy())
        indptr.append(indptr[-1] + len(lats[-1]))
    np.save(stage / "pool_rows.npy", rows(pool_ids))
    np.save(stage / "pool_indptr.npy", np.asarray(indptr, dtype=np.int64))
    np.save(stage / "pool_latents.npy", np.concatenate(lats).astype(np.int32) if lats else np.zeros(0, np.int32))
    np.save(stage / "pool_max.npy", np.concatenate(maxs).astype(np.float16) if maxs else np.zeros(0, np.float16))
    manifest = {**t.identity, **extra, "format_version": FORMAT_VERSION, "n_tokens": c.n_tokens,
                "n_windows": c.n_windows, "n_windows_stored": int(len(used)), "complete": True}
    (stage / "manifest.json").write_text(json.dumps(manifest, indent=2))
    old = t.out_dir / "manifest.json"
    if old.exists():
        old.unlink()  # readers must never see an old manifest beside new arrays
    for f in sorted(stage.iterdir(), key=lambda p: p.name == "manifest.json"):
        os.replace(f, t.out_dir / f.name)
    shutil.rmtree(stage)


def extract(
    model: str | SubjectModel = "builtin:smollm2",
    dictionary: str | object | list = "builtin:demo",
    hookpoint: str | list[str | None] | None = None,
    corpus: str | CorpusSpec = "builtin",
    out: str | Path = "runs/extract",
    *,
    n_tokens: int = 100_000,
    ctx_len: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    top_k: int = CollectorConfig.top_k,
    n_sample: int = CollectorConfig.n_sample,
    pool_size: int = 1000,
    text_column: str = "text",
    split: str = "train",
    device: str | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every_s: float = 120.0,
    max_batches: int | None = None,
    max_norm_ratio: float = 5.0,
    encode_dtype: str | None = None,
    norm_scaling_factor: float | None = None,
    check_corpus: bool = True,
    max_memory: float | None = None,
    quality: bool = True,
    quality_tokens: int | None = None,
) -> list[LatentCache]:
    """Run the streaming extraction; returns the caches (one per target). `max_batches` stops early without
    publishing (a clean interruption, used by tests and for chunked scheduling). Positions holding special tokens,
    or whose activation norm is over `max_norm_ratio` × the batch median, are ignored (codes set to 0).
    `encode_dtype`: the dictionary's weights and the encode matmul (default float32: codes exactly as the source
    library's fp32 encoder; bfloat16 is several times faster on CPUs and GPUs with bf16 units, codes within bf16
    rounding). Recorded in the manifest. `norm_scaling_factor`: SAELens `expected_average_only_in` checkpoints only
    (the dataset factor they were trained with, which the checkpoint does not store). `check_corpus`: local corpus
    files are tokenized once up front (720k tokens/s here, ~1 % of a CPU run) so that a bad line anywhere in the part
    the run reads fails before anything is created; a bad line found mid-run (check off) leaves a resumable
    `.partial/`, never a published cache. Before anything is written, the planned peak memory and disk are printed
    (stderr with `progress`, else logged) and a plan over the memory available (or `max_memory` GiB) is refused.
    `quality`: before publishing, a quality pass (`autointerp.quality`: L0, FVU, spliced-in loss, dead/dense) over
    the first `quality_tokens` tokens (default `quality.default_quality_tokens`) goes into the manifest's "quality";
    it is no part of the run's identity."""
    out = Path(out)
    spec = corpus if isinstance(corpus, CorpusSpec) else CorpusSpec(
        source=corpus, ctx_len=ctx_len, n_tokens=n_tokens, seed=seed, text_column=text_column, split=split)
    spec.validate()
    subject = model if isinstance(model, SubjectModel) else load_subject(model, device=device, dtype=dtype)
    if subject.max_context and spec.ctx_len > subject.max_context:
        raise ConfigError(f"--ctx-len: {spec.ctx_len} is beyond the model's context ({subject.max_context} tokens)")
    dev = subject.device
    dictionaries = dictionary if isinstance(dictionary, list) else [dictionary]
    hookpoints = hookpoint if isinstance(hookpoint, list) else [hookpoint]
    enc_dtype = _encode_dtype(encode_dtype)
    targets = _resolve_targets(subject, dictionaries, hookpoints, out, dev, norm_scaling_factor, enc_dtype)
    for t in targets:
        t.dictionary.to(dev, enc_dtype)
    cfg = CollectorConfig(top_k=top_k, n_sample=n_sample, pool_size=pool_size, seed=seed)
    for t in targets:
        t.identity = _identity(subject, t, spec, cfg, max_norm_ratio)
    status = [_check_out_dir(t, overwrite) for t in targets]
    if all(s == "done" for s in status):
        log.info("%s: complete cache(s) already there; nothing to do", out)
        return [LatentCache(t.out_dir) for t in targets]
    n_windows = spec.n_windows
    if check_corpus and is_local(spec):
        # local files can hold a bad line anywhere: find it now, with nothing created, not hours into the run
        n_windows = count_windows(spec, subject.tokenizer)
        if n_windows < spec.n_windows:
            log.warning("corpus %s: %d tokens of text, fewer than --n-tokens %d; extracting what there is",
                        spec.source, n_windows * spec.ctx_len, spec.n_tokens)

    plan = plan_extraction(subject, targets, cfg, n_windows, spec.ctx_len, batch_size, max_memory)
    plan.check(top_k, n_sample, batch_size, max_memory)
    if progress:
        print(plan.describe(), file=sys.stderr, flush=True)
    else:
        log.info(plan.describe())
    identities = [t.identity for t in targets]
    for t in targets:
        t.collector = Collector(t.dictionary.n_latents, spec.ctx_len, cfg, dev)
    # read the first batch before creating anything on disk: an empty corpus or a missing column fails clean
    batches_it = iter_windows(spec, subject.tokenizer, batch_size)
    first = next(batches_it)
    ckpt = _Checkpoint(out, spec.ctx_len)
    ckpt.lock()  # before --overwrite deletes anything: never under another run still writing here
    published = False
    try:
        if overwrite:  # remove only what a cache is made of: never unrelated files in the folder
            for t in targets:
                for name in CACHE_FILES:
                    (t.out_dir / name).unlink(missing_ok=True)
                shutil.rmtree(t.out_dir / ".partial", ignore_errors=True)
            shutil.rmtree(out / ".partial", ignore_errors=True)
        state = None if overwrite else ckpt.load(identities)
        done = 0
        if state is not None:
            for t, st in zip(targets, state["states"]):
                t.collector.load_state(st)
            done = targets[0].collector.n_windows
            log.info("resuming %s at window %d", out, done)
        ckpt.open(done)
        hooks = [subject.hookpoint(t.hookpoint) for t in targets]
        bar = tqdm(total=n_windows * spec.ctx_len, initial=done * spec.ctx_len, unit="tok", unit_scale=True,
                   disable=not progress, desc=f"extract {out.name}", dynamic_ncols=True)
        wid, batches, last_ckpt, interrupted = 0, 0, time.monotonic(), False
        in_batch = False  # True while collectors and windows.bin may disagree: never checkpoint then
        try:
            for batch in itertools.chain([first], batches_it):
                if wid + len(batch) <= done:  # already collected before the interruption
                    wid += len(batch)
                    continue
                if wid < done:
                    batch, wid = batch[done - wid:], done
                in_batch = True
                collect_batch(subject, targets, hooks, batch, wid, max_norm_ratio)
                ckpt.append(batch)
                in_batch = False
                wid += len(batch)
                batches += 1
                bar.update(batch.size)
                if time.monotonic() - last_ckpt > checkpoint_every_s:
                    ckpt.save(identities, [t.collector for t in targets])
                    last_ckpt = time.monotonic()
                if max_batches is not None and batches >= max_batches:
                    interrupted = True
                    break
        except BaseException:
            interrupted = True
            raise
        finally:
            bar.close()
            if interrupted and not in_batch:
                ckpt.save(identities, [t.collector for t in targets])
            if interrupted:  # interrupted mid-batch: the last periodic checkpoint stands
                ckpt.close()
        if interrupted:
            return []
        extra = _manifest_extra(subject)
        windows = ckpt.windows()
        for t in targets:
            q = {"quality": _quality(subject, t, windows, spec.n_tokens, quality_tokens, batch_size,
                                     max_norm_ratio)} if quality else {}
            _publish(t, t.collector, windows, {**extra, **q})
        ckpt.close()
        for t in targets:
            shutil.rmtree(t.out_dir / ".partial", ignore_errors=True)
        shutil.rmtree(out / ".partial", ignore_errors=True)
        published = True
    finally:
        ckpt.unlock(remove=published)  # an unfinished run keeps its lock file beside its .partial/
    return [LatentCache(t.out_dir) for t in targets]


def encode_for_collector(dictionary, x: torch.Tensor, ignore: torch.Tensor):
    """The dictionary's codes of x with the `ignore` positions zeroed, never a dense [B, T, n_latents] tensor over
    ENCODE_CHUNK_BYTES: SparseCodes for top-k encoders, LatentChunks (encoded a latent chunk at a time while the
    collector reads them) for the other rules, a dense tensor when the whole batch fits in one chunk."""
    from .collector import LatentChunks
    from .dictionaries.base import ENCODE_CHUNK_BYTES

    sparse = dictionary.encode_topk(x.to(torch.float32))
    if sparse is None and x[..., 0].numel() * dictionary.n_latents * 4 > ENCODE_CHUNK_BYTES:
        return LatentChunks(dictionary.nonzero_chunks(x.to(torch.float32)), (*x.shape[:-1], dictionary.n_latents),
                            ignore, nnz_bound=dictionary.nnz_bound())
    if sparse is None:
        codes = dictionary.encode(x.to(torch.float32))
        # not in place: an identity-like encoder (raw neurons) returns x itself, which other dictionaries on the
        # same hookpoint still read
        return codes.masked_fill(ignore[..., None], 0)
    vals, idx = sparse
    vals[ignore] = 0
    return SparseCodes(vals, idx, dictionary.n_latents)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def collect_batch(subject: SubjectModel, targets: list[Target], hooks, batch: np.ndarray, wid: int,
                  max_norm_ratio: float) -> None:
    """One batch of windows (global ids wid, wid+1, ...) through the model into every target's collector: the
    step the one-process run and every shard share, so both see the same batches."""
    dev = subject.device
    ids = torch.from_numpy(batch).long()
    acts = subject.capture(ids, hooks)
    special = subject.special_token_mask(ids).to(dev)
    window_ids = torch.arange(wid, wid + len(batch), device=dev)
    for t, h in zip(targets, hooks):
        x = acts[h.name]
        # BOS/EOS/separators and massive-activation outliers: sequence artefacts, not text
        ignore = special | subject.outlier_mask(x, max_norm_ratio)
        t.collector.update(encode_for_collector(t.dictionary, x, ignore), window_ids)


def _quality(subject: SubjectModel, t: Target, windows, run_tokens: int, quality_tokens: int | None,
             batch_size: int, max_norm_ratio: float, usage: bool = True) -> dict:
    """The manifest's "quality" (autointerp.quality) over the run's first windows; with `usage`, dead/dense from
    the collector (a shard's come from the merged statistics, in publish_shards)."""
    from .quality import extraction_quality

    c = t.collector
    return extraction_quality(subject, t.dictionary, t.hookpoint, windows, run_tokens=run_tokens,
                              quality_tokens=quality_tokens, n_active=c.n_active if usage else None,
                              n_tokens=c.n_tokens, batch_size=batch_size, max_norm_ratio=max_norm_ratio)


def _manifest_extra(subject: SubjectModel) -> dict:
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {"autointerp": __version__, "torch": str(torch.__version__), "python": platform.python_version(),
                     "transformers": _version("transformers")},
        "device": str(subject.device),
        "ignored_token_ids": sorted(int(i) for i in subject.tokenizer.all_special_ids),
        "n_heads": n_heads_of(subject.model),
    }


def extract_shard(
    model: str | SubjectModel,
    dictionary: str | object | list,
    hookpoint: str | None,
    corpus: str | CorpusSpec,
    *,
    windows: tuple[int, int],
    n_tokens: int = 100_000,
    ctx_len: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    top_k: int = CollectorConfig.top_k,
    n_sample: int = CollectorConfig.n_sample,
    pool_size: int = 1000,
    text_column: str = "text",
    split: str = "train",
    device: str | None = None,
    dtype: str | None = None,
    max_norm_ratio: float = 5.0,
    encode_dtype: str | None = None,
    norm_scaling_factor: float | None = None,
    on_progress=None,
    quality: bool = True,
    quality_tokens: int | None = None,
) -> bytes | list[bytes]:
    """Collect the windows [w0, w1) of the run `extract` would make with these settings and return the shard's
    state as bytes (`shards.shard_state`) for `publish_shards` — one per dictionary when given a list of them
    (all collected in the same forward passes, each at its hookpoint). Windows before w0 are tokenized and skipped
    (no model call). `on_progress(tokens_done, tokens_total)` is called after each batch. `quality`: shard 0 (the
    run's first windows) runs the quality pass, as `extract` would; publish_shards adds the merged dead/dense."""
    from .shards import shard_state

    w0, w1 = windows
    spec = corpus if isinstance(corpus, CorpusSpec) else CorpusSpec(
        source=corpus, ctx_len=ctx_len, n_tokens=n_tokens, seed=seed, text_column=text_column, split=split)
    spec.validate()
    if w0 % batch_size:
        raise ConfigError(f"shard windows [{w0}, {w1}): must start on a batch boundary (batch_size {batch_size})")
    subject = model if isinstance(model, SubjectModel) else load_subject(model, device=device, dtype=dtype)
    enc_dtype = _encode_dtype(encode_dtype)
    many = isinstance(dictionary, list)
    dictionaries = dictionary if many else [dictionary]
    targets = _resolve_targets(subject, dictionaries, [hookpoint], Path("."), subject.device, norm_scaling_factor,
                               enc_dtype)
    if len(targets) != len(dictionaries):
        raise ConfigError(f"dictionary {dictionaries[0] if len(dictionaries) == 1 else dictionaries}: "
                          f"{len(targets)} members; a job extracts one dictionary per entry (name its hookpoint)")
    cfg = CollectorConfig(top_k=top_k, n_sample=n_sample, pool_size=pool_size, seed=seed)
    for t in targets:
        t.dictionary.to(subject.device, enc_dtype)
        t.identity = _identity(subject, t, spec, cfg, max_norm_ratio)
        t.collector = Collector(t.dictionary.n_latents, spec.ctx_len, cfg, subject.device)
    hooks = [subject.hookpoint(t.hookpoint) for t in targets]
    kept: dict[int, np.ndarray] = {}
    wid = 0
    for batch in iter_windows(spec, subject.tokenizer, batch_size):
        if wid >= w1:
            break
        if wid + len(batch) <= w0:
            wid += len(batch)
            continue
        batch = batch[: w1 - wid]
        collect_batch(subject, targets, hooks, batch, wid, max_norm_ratio)
        kept.update(zip(range(wid, wid + len(batch)), batch))
        wid += len(batch)
        if on_progress is not None:
            on_progress((wid - w0) * spec.ctx_len, (w1 - w0) * spec.ctx_len)
    extra = _manifest_extra(subject)
    first = np.stack([kept[i] for i in sorted(kept)]) if quality and w0 == 0 and kept else None
    qs = [{"quality": _quality(subject, t, first, spec.n_tokens, quality_tokens, batch_size, max_norm_ratio,
                               usage=False)} if first is not None else {} for t in targets]
    out = [shard_state(t.collector, kept, {"identity": t.identity, "windows": [w0, w1], "extra": extra,
                                           "n_latents": int(t.dictionary.n_latents), "ctx_len": spec.ctx_len,
                                           "collector": cfg.as_dict(), **q}) for t, q in zip(targets, qs)]
    return out if many else out[0]


def publish_shards(states: list[bytes], out: str | Path) -> LatentCache:
    """Merge shard states (`extract_shard`'s bytes, any order) into one cache folder at `out`: the cache a
    one-process `extract` of the same windows writes."""
    from .shards import WindowTable, load_shard_state, merge_states

    parts = sorted((load_shard_state(b) for b in states), key=lambda p: p["meta"]["windows"][0])
    meta = parts[0]["meta"]
    for p in parts[1:]:
        if not _same_run(p["meta"]["identity"], meta["identity"]):
            raise ConfigError("merge: shards of different extractions")
    for a, b in zip(parts, parts[1:]):
        if a["meta"]["windows"][1] != b["meta"]["windows"][0]:
            raise ConfigError(f"merge: shard windows {a['meta']['windows']} and {b['meta']['windows']} do not meet")
    cfg = CollectorConfig(**meta["collector"])
    collector = merge_states([p["state"] for p in parts], meta["n_latents"], meta["ctx_len"], cfg)
    t = Target(None, meta["identity"]["hookpoint"], Path(out))
    t.identity = meta["identity"]
    t.out_dir.mkdir(parents=True, exist_ok=True)
    q = meta.get("quality")  # shard 0's pass, with the dead/dense fractions of the merged statistics
    if q is not None:
        from .quality import latent_usage

        q = {**q, **latent_usage(collector.n_active, collector.n_tokens)}
    _publish(t, collector, WindowTable(parts), {**meta["extra"], **({"quality": q} if q is not None else {})})
    shutil.rmtree(t.out_dir / ".partial", ignore_errors=True)
    return LatentCache(t.out_dir)
