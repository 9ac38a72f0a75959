"""Latent selection: which latents of a dictionary a job (or a command) works on."""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError


def parse_latents(spec: str | Sequence[int] | None, alive: Sequence[int], n_latents: int,
                  n: int | None = None) -> list[int]:
    """Latents of a selection: '0-99,120', 'all' (every alive latent), a list, or None (the first `n` alive ones).
    A reversed range, a number out of range or a selection of nothing is one error naming it."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        alive = list(alive)
        out = alive[: n or len(alive)]
        if not out:
            raise ConfigError("latents: the dictionary has no alive latent (nothing fired during extraction)")
        return [int(i) for i in out]
    if isinstance(spec, str) and spec.strip() == "all":
        return parse_latents(None, alive, n_latents, None)
    out: list[int] = []
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    for part in parts:
        if not isinstance(part, str):
            out.append(int(part))
            continue
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if b < a:
                    raise ConfigError(f"latents: range {part!r} is reversed (write {b}-{a})")
                out.extend(range(a, b + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise ConfigError(f"latents: {part!r} is not a number or a range like 0-99") from None
    bad = [i for i in out if not 0 <= i < n_latents]
    if bad:
        raise ConfigError(f"latents: {bad[0]} out of range (the dictionary has {n_latents} latents)")
    if not out:
        raise ConfigError("latents: the selection names no latent")
    return list(dict.fromkeys(out))


__all__ = ["parse_latents"]
