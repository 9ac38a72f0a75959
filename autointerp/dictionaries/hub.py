"""Hugging Face Hub ids for dictionaries.

Syntax: `owner/repo[@revision][:subpath]`, e.g.
  EleutherAI/sae-llama-3-8b-32x:layers.24                        (one sparsify hookpoint folder)
  google/gemma-scope-2b-pt-res:layer_20/width_16k/average_l0_71   (one Gemma Scope SAE)
  someone/saes@v1.0:blocks.8.hook_resid_pre                       (a pinned revision)
Only the subpath is downloaded (allow_patterns), through the normal huggingface_hub cache, so HF_HUB_CACHE /
HF_HUB_OFFLINE work as usual.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from autointerp.errors import ConfigError

from ._files import one_line

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?::(?P<sub>[^:]+))?$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None
    subpath: str | None  # posix path inside the repo, no leading/trailing slash

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "") + (f":{self.subpath}" if self.subpath else "")

    def with_subpath(self, sub: str | None) -> "HubRef":
        return HubRef(self.repo_id, self.revision, sub.strip("/") if sub else None)


def parse_hub_id(spec: str) -> HubRef | None:
    """A HubRef when `spec` has the hub-id shape, else None (it is then only a local path)."""
    if spec.startswith(("/", ".", "~")):
        return None
    m = _HUB_ID.match(spec)
    if not m or ".." in m.group("repo"):
        return None
    sub = m.group("sub")
    return HubRef(m.group("repo"), m.group("rev"), sub.strip("/") if sub else None)


def allow_patterns(ref: HubRef) -> list[str] | None:
    # The subpath may be a folder (take everything under it) or a single file such as .../params.npz.
    return [f"{ref.subpath}/*", ref.subpath] if ref.subpath else None


def download(ref: HubRef, patterns: list[str] | None = None) -> tuple[Path, Path]:
    """(snapshot root, local path of ref.subpath) in the huggingface_hub cache, downloading what is missing."""
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns or allow_patterns(ref)))
    except Exception as e:  # not found, gated, offline without a cached copy, invalid id, network errors
        raise ConfigError(
            f"{ref}: not a local path, and the Hugging Face Hub download failed ({type(e).__name__}: {one_line(e)})"
        ) from e
    local = root / ref.subpath if ref.subpath else root
    if ref.subpath and not local.exists():
        raise ConfigError(f"{ref}: '{ref.subpath}' not found in hub repo {ref.repo_id} (nothing matched it)")
    return root, local
