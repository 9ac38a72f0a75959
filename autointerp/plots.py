"""A dictionary's score plot (PNG): the distribution of each scorer's headline score per explainer, and score against
firing frequency — what the demo writes and the dictionary page shows."""

from __future__ import annotations

import io
from pathlib import Path

from sqlalchemy import select

from .store import HEADLINE, Store
from .store.store import T_EXPL, T_LATENT, T_SCORE


def score_points(store: Store, dictionary_pk: int) -> list[dict]:
    """(scorer, explainer, latent, value, frequency) of every non-skipped score of a dictionary."""
    q = (select(T_SCORE.c.scorer, T_EXPL.c.explainer, T_EXPL.c.latent, T_SCORE.c.value, T_LATENT.c.frequency)
         .join(T_EXPL, T_EXPL.c.id == T_SCORE.c.explanation_id)
         .join(T_LATENT, (T_LATENT.c.dictionary_pk == T_EXPL.c.dictionary_pk) & (T_LATENT.c.index == T_EXPL.c.latent))
         .where(T_EXPL.c.dictionary_pk == dictionary_pk, T_SCORE.c.value.is_not(None)))
    with store.tx() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def dictionary_plot_png(store: Store, dictionary: str | int) -> bytes | None:
    """The PNG bytes, or None when the dictionary has no score yet."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = store.dictionary(dictionary)
    pts = score_points(store, d["id"])
    if not pts:
        return None
    scorers = sorted({p["scorer"] for p in pts})
    explainers = sorted({p["explainer"] for p in pts})
    fig, axes = plt.subplots(2, len(scorers), figsize=(4.2 * len(scorers), 6.4), squeeze=False)
    colours = dict(zip(explainers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, s in enumerate(scorers):
        top, bottom = axes[0][j], axes[1][j]
        for e in explainers:
            v = [p["value"] for p in pts if p["scorer"] == s and p["explainer"] == e]
            if v:
                top.hist(v, bins=10, range=(0, 1) if min(v) >= 0 else (-1, 1), alpha=0.55, label=f"{e} (n={len(v)})",
                         color=colours[e])
                f = [p["frequency"] or 1e-9 for p in pts if p["scorer"] == s and p["explainer"] == e]
                bottom.scatter(f, v, s=14, alpha=0.7, color=colours[e], label=e)
        top.set_title(f"{s}: {HEADLINE.get(s, 'score')}")
        top.legend(fontsize=7)
        bottom.set_xscale("log")
        bottom.set_xlabel("firing frequency")
        bottom.set_ylabel(HEADLINE.get(s, "score"))
    fig.suptitle(f"{d['name']} ({d['hookpoint']}, {d['n_latents']} latents)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write_dictionary_plot(store: Store, dictionary: str | int, path: str | Path) -> Path | None:
    png = dictionary_plot_png(store, dictionary)
    if png is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
