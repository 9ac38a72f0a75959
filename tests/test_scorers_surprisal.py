"""Surprisal scorer with the real local SmolLM2: naming the activating words in the prefix lowers the loss on
activating examples more than on negatives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from judges_sim import word_record
from test_scorers_embedding import ANIMALS, THINGS, _sentences

from autointerp.sampling import SamplingConfig
from autointerp.scorers import surprisal as sp

# the CPU is shared: with 2 OpenMP threads competing with other processes a forward pass is ~10x slower
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def record():
    return word_record(_sentences(ANIMALS), _sentences(THINGS), ANIMALS, latent=2)


# small: SmolLM2 on a shared 2-core CPU runs ~50 tokens/s
CFG = sp.SurprisalConfig(sampling=SamplingConfig(n_explain=5, n_test=8, n_negatives=8, min_test=5, min_negatives=5))


def test_explanation_reduces_loss_on_activating_examples(record):
    good = asyncio.run(sp.score(record, "animals: dog, cat, horse, rabbit, goat, parrot", None, config=CFG))
    bad = asyncio.run(sp.score(record, "tax law and accounting rules", None, config=CFG))
    m = good.metrics
    assert good.skipped is None and m["n_activating"] == 8 and m["n_negative"] == 8
    assert m["mean_reduction_activating"] > m["mean_reduction_negative"]
    assert m["auc"] > 0.75
    assert bad.metrics["auc"] < m["auc"]
    assert good.prompt_version.startswith("surprisal@")
    # the neutral losses are shared: same test set, same neutral prefix -> identical values
    assert good.details["loss_neutral"] == bad.details["loss_neutral"]


def test_text_losses_ignore_prefix_tokens():
    model, tok = sp._load(CFG.model, None)
    texts = ["The cat sat on the mat.", "Stocks fell sharply on Monday."]
    a = sp.text_losses(model, tok, "Hello.\n", texts, batch_size=1)
    b = sp.text_losses(model, tok, "Hello.\n", texts[::-1], batch_size=2)  # batched with padding
    assert np.allclose(a, b[::-1], atol=1e-4)
    # a prefix that contains the text makes it far less surprising
    c = sp.text_losses(model, tok, "Repeat: The cat sat on the mat.\n", texts[:1])
    assert c[0] < a[0] - 0.5


def test_text_losses_match_a_plain_forward_pass():
    model, tok = sp._load(CFG.model, None)
    prefix, text = "Animals:\n", "The dog barked at the horse."
    a = sp.text_losses(model, tok, prefix, [text, "Hi"], batch_size=2)[0]
    p, t = tok(prefix).input_ids, tok(text, add_special_tokens=False).input_ids  # BOS as the tokenizer adds it
    ids = torch.tensor([p + t])
    lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    ref = -lp[len(p) - 1 :].gather(-1, ids[0, len(p):, None]).mean()
    assert a == pytest.approx(float(ref), abs=1e-4)


def test_config_rejects_a_model_object_as_spec():
    """A loaded model goes in `lm`; in `model` (a spec string) it fails at once with one clear line."""
    from autointerp.errors import ConfigError

    with pytest.raises(ConfigError, match="surprisal: model must be a model spec string, got Linear"):
        sp.SurprisalConfig(model=torch.nn.Linear(1, 1))
    with pytest.raises(ConfigError, match="lm must be a"):
        sp.SurprisalConfig(lm=torch.nn.Linear(1, 1))
