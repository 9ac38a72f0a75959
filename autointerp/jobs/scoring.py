"""Scorer options of a job spec → the scorer's Config.

A job spec carries scorer options as JSON data; `check_scorer_options` checks them (the spec validates itself
through it) and `scorer_config` turns them into the scorer's Config, adding the job's sampling, prompt folder,
negative pool and the live objects some scorers need (subject model, dictionary), which never travel in a spec.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import ConfigError
from ..scorers import get_scorer


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


__all__ = ["check_scorer_options", "scorer_config", "scorer_config_for_key"]
