"""What a stored latent index means. An unsigned dictionary's units are its latents. A signed dictionary (AbsTopK,
ITDA, raw neurons: codes of either sign) is stored as 2n units, its latents' "+" poles then their "-" poles
(`dictionaries.Poles`), so that each pole gets its own examples, statistics, explanations and scores."""

from __future__ import annotations


def unit_pole(index: int, n_units: int, signed: bool) -> tuple[int, str | None]:
    """(latent, pole) of stored unit `index`: pole "+" / "-" for a signed dictionary, None for an unsigned one."""
    if not signed:
        return index, None
    half = n_units // 2
    return (index, "+") if index < half else (index - half, "-")


def unit_label(index: int, n_units: int, signed: bool) -> str:
    """How pages and tables name a unit: "#12", or "#12+" / "#12-" for a signed dictionary's poles."""
    latent, pole = unit_pole(index, n_units, signed)
    return f"#{latent}{pole or ''}"
