"""Scorer configuration and latent selection, shared by every entry point (jobs, CLI, API).

A job spec carries scorer options as JSON data; `scorer_config` turns them into the scorer's Config, adding the
job's sampling, prompt folder, negative pool and the live objects some scorers need (subject model, dictionary),
which never travel in a spec.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .scorers import get_scorer


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _option_value(scorer: str, f: dataclasses.Field, value: Any) -> Any:
    """`value` checked against the kind of the field's default (bool, int, float, str, tuple); lists become
    tuples, a dict updates a dataclass default (e.g. sampling), a string names a Path field's folder. Other fields
    (default None or an object) take the value as is."""
    default = _default(f)
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
        try:
            return dataclasses.replace(default, **value)
        except TypeError as e:
            raise ConfigError(f"scorer option {scorer}.{f.name}: {e}") from None
    if isinstance(value, str) and "Path" in str(f.type):
        return Path(value)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        return value
    if not ok:
        raise ConfigError(f"scorer option {scorer}.{f.name}: expected {type(default).__name__} like {default!r}, "
                          f"got {value!r}")
    return value


def check_scorer_options(scorers: Sequence[str], options: Mapping[str, Mapping[str, Any]]) -> dict:
    """{scorer: {field: value}} with every value checked. An option for a scorer not in `scorers`, an unknown field
    or a value of the wrong kind fails with one line naming it."""
    out: dict[str, dict[str, Any]] = {}
    for name, opts in options.items():
        if name not in scorers:
            raise ConfigError(f"scorer option for {name!r}, which is not among the scorers ({', '.join(scorers)})")
        fields = {f.name: f for f in dataclasses.fields(get_scorer(name).Config)}
        unknown = set(opts) - set(fields)
        if unknown:
            raise ConfigError(f"scorer {name}: unknown option(s) {', '.join(sorted(unknown))} "
                              f"(valid: {', '.join(sorted(fields))})")
        out[name] = {k: _option_value(name, fields[k], v) for k, v in opts.items()}
    return out


def scorer_config(name: str, spec, pool, extra: Mapping[str, Any]):
    """(Scorer, Config) for a job spec: the job's sampling, pool and prompt_dir, then the live objects of `extra`
    (by field name), then the spec's scorer options (which win; a dict updates the job's value, e.g. sampling)."""
    scorer = get_scorer(name)
    fields = {f.name for f in dataclasses.fields(scorer.Config)}
    base: dict[str, Any] = {"sampling": spec.sampling_config(), "pool": pool}
    if spec.prompt_dir:
        base["prompt_dir"] = Path(spec.prompt_dir)
    kw = {k: v for k, v in {**base, **extra}.items() if k in fields}
    raw = spec.scorer_options.get(name, {})
    for k, v in check_scorer_options(spec.scorers, {name: raw})[name].items():
        if isinstance(raw[k], Mapping) and dataclasses.is_dataclass(kw.get(k)):
            v = dataclasses.replace(kw[k], **raw[k])
        kw[k] = v
    return scorer, scorer.Config(**kw)


def scorer_config_for_key(name: str, spec):
    """The Config without live objects: what a result's identity is computed from."""
    return scorer_config(name, spec, None, {})[1]


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


__all__ = ["check_scorer_options", "scorer_config", "scorer_config_for_key", "parse_latents"]
