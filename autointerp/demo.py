"""The built-in demo dictionary: a small TopK SAE trained once on SmolLM2's middle layer, then cached.

No pretrained SAE can be installed offline, so `builtin:demo` trains one (a couple of minutes on a laptop CPU) the
first time it is asked for, under the autointerp cache folder; later runs load it in milliseconds.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .corpus import CorpusSpec
from .errors import ConfigError
from .hf_loading import cache_root

log = logging.getLogger(__name__)

DEMO_HOOKPOINT = "resid_post.15"
DEMO = {"n_latents": 2048, "k": 32, "n_tokens": 64_000, "seed": 0, "steps": 1000, "version": 4}


def demo_dictionary_path() -> Path:
    return cache_root() / "dictionaries" / "demo-smollm2-v{version}-{n_latents}-k{k}-{n_tokens}tok-{steps}steps".format(**DEMO)


def ensure_demo_dictionary(subject=None, progress: bool = True) -> Path:
    """Path to the demo SAE's sparsify folder (a hookpoint subfolder inside), training it if needed."""
    from .train_sae import train_topk_sae

    root = demo_dictionary_path()
    folder = root / DEMO_HOOKPOINT
    if (folder / "cfg.json").is_file() and (folder / "sae.safetensors").is_file():
        return folder
    from .activations import collect_activations
    from .subject import load_subject

    if subject is None:
        subject = load_subject("builtin:smollm2")
    if not subject.spec.startswith("builtin:smollm2"):
        raise ConfigError("dictionary builtin:demo is trained for --model builtin:smollm2; pass your own --dictionary")
    log.info("training the demo dictionary once into %s", root)
    # a corpus seed different from extraction's default, so the SAE is not evaluated on its own training windows
    spec = CorpusSpec(source="builtin", ctx_len=64, n_tokens=DEMO["n_tokens"], seed=1234)
    acts = collect_activations(subject, DEMO_HOOKPOINT, spec, progress=progress)
    train_topk_sae(acts, n_latents=DEMO["n_latents"], k=DEMO["k"], out_dir=root, hookpoint=DEMO_HOOKPOINT,
                   seed=DEMO["seed"], steps=DEMO["steps"], progress=progress)
    return folder
