"""Dictionaries (SAEs, transcoders, neurons) behind one interface.

    from autointerp.dictionaries import load_dictionary, load_dictionary_set, Dictionary
    d = load_dictionary("/ckpts/sae-pythia/layers.6")               # format detected from the files
    d = load_dictionary("EleutherAI/sae-pythia-70m-32k:layers.3")    # hub id: owner/repo[@rev][:subpath]
    d = load_dictionary("topk-neurons:32", d_in=2048, hookpoint="layers.3.mlp.act_fn")
    codes = d.encode(acts)        # [..., d_in] -> dense float32 [..., n_latents]
    recon = d.reconstruct(acts)   # decode(encode(acts)) in the activations' own space
    units = as_units(d)           # a signed dictionary (d.signed) as 2n unsigned units: "+" poles, then "-" poles
"""

from autointerp.units import unit_pole

from .base import Dictionary, LinearDictionary, NeuronDictionary, Poles, as_units
from .loader import FORMATS, MARKERS, load_cached_dictionary, load_dictionary, load_dictionary_set

__all__ = [
    "FORMATS",
    "MARKERS",
    "Dictionary",
    "LinearDictionary",
    "NeuronDictionary",
    "Poles",
    "as_units",
    "unit_pole",
    "load_cached_dictionary",
    "load_dictionary",
    "load_dictionary_set",
]
