"""Chat corpora (autointerp.chat): conversations through SmolLM2's chat template, one conversation per window run,
special tokens kept or dropped, each token's role stored and turned into the assistant_share statistic."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from autointerp.chat import ROLE_ID, chat_windows, conversation_tokens, window_roles
from autointerp.cli import app
from autointerp.corpus import CorpusSpec

ANIMALS = ["zebra", "walrus", "heron", "otter", "lynx", "bison", "gecko", "moose"]


def conversations(n: int = 16) -> list[list[dict]]:
    """Conversation i names its own animal in every turn (so a window's text says which conversation it is from)
    and has i % 4 + 1 exchanges (lengths vary: some fit a window, some continue over several)."""
    out = []
    for i in range(n):
        a = ANIMALS[i % len(ANIMALS)] + str(i)
        msgs = [{"role": "system", "content": f"You answer questions about the {a}."}]
        for t in range(i % 4 + 1):
            msgs.append({"role": "user", "content": f"Question {t}: where does the {a} live?"})
            msgs.append({"role": "assistant", "content": f"The {a} lives near water, answer {t}, {a}."})
        out.append(msgs)
    return out


def _write(path, convs):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    return path


@pytest.fixture(scope="module")
def tok(subject):
    return subject.tokenizer


def test_roles_follow_the_messages_and_special_tokens_are_kept_or_dropped(tok):
    conv = conversations(2)[1]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids, roles = conversation_tokens(tok, conv, "keep")
    assert start in ids and len(ids) == len(roles)
    for role in ("system", "user", "assistant"):
        text = tok.decode([i for i, r in zip(ids, roles) if r == ROLE_ID[role]])
        assert text == "".join(m["content"] for m in conv if m["role"] == role)
    # template tokens (turn headers, <|im_start|>) belong to no message
    assert all(r == ROLE_ID["other"] for i, r in zip(ids, roles) if i == start)
    dids, droles = conversation_tokens(tok, conv, "drop")
    from autointerp.chat import special_ids

    special = special_ids(tok)
    assert start not in dids and not special & set(dids) and tok.convert_tokens_to_ids("<|im_end|>") in special
    assert [(i, r) for i, r in zip(ids, roles) if i not in special] == list(zip(dids, droles))


@pytest.mark.parametrize("special", ["keep", "drop"])
def test_windows_start_at_conversation_boundaries_and_never_mix_two(tmp_path, tok, special):
    """Walking the windows in order, each one either starts the next conversation at its first token or continues
    the current one exactly where the previous window stopped: no window holds two conversations, none is lost."""
    from autointerp.chat import iter_conversations, pad_id

    convs = conversations()
    spec = CorpusSpec(source=str(_write(tmp_path / "chat.jsonl", convs)), ctx_len=48, n_tokens=10 ** 6, chat=True,
                      special_tokens=special)
    start = tok.convert_tokens_to_ids("<|im_start|>")
    pad = pad_id(tok)
    order = [conversation_tokens(tok, c, special) for c in iter_conversations(spec)]
    assert sorted(len(o[0]) for o in order) == sorted(len(conversation_tokens(tok, c, special)[0]) for c in convs)
    conv, pos, starts = -1, 0, 0
    for ids, roles in chat_windows(spec, tok):
        ids, roles = ids.tolist(), roles.tolist()
        assert len(ids) == 48 and (start in ids) == (special == "keep")
        n = len(ids)
        while n and ids[n - 1] == pad:
            n -= 1
        if conv + 1 < len(order) and ids[:n] == order[conv + 1][0][:n]:  # the next conversation, from its start
            conv, pos, starts = conv + 1, n, starts + 1
            assert roles[:n] == order[conv][1][:n]
            continue
        body = ids[1:n] if special == "keep" and ids[0] == tok.bos_token_id else ids[:n]  # a continuation's BOS
        assert body and body == order[conv][0][pos:pos + len(body)], "a window mixes conversations or skips"
        pos += len(body)
    assert starts == len(convs)


def test_a_chat_extraction_stores_roles_and_assistant_share(tmp_path, tok):
    from autointerp.cache import LatentCache
    from autointerp.chat import role_shares
    from autointerp.store import open_store
    from autointerp.store.analyses import latent_stats
    from autointerp.store.queries import LatentFilter, list_latents

    corpus = _write(tmp_path / "chat.jsonl", conversations(24))
    out = tmp_path / "cache"
    r = CliRunner().invoke(app, ["extract", "--corpus", str(corpus), "--chat", "-d", "topk-neurons:8", "--hookpoint",
                                 "mlp_neurons.2", "--out", str(out), "--n-tokens", "3072", "--ctx-len", "48",
                                 "--batch-size", "16", "--no-progress", "--no-quality", "--top-k", "10",
                                 "--n-sample", "10", "--pool-size", "16"])
    assert r.exit_code == 0, r.output
    cache = LatentCache(out)
    roles = cache.array("roles")
    windows = cache.array("windows")
    assert roles.shape == windows.shape
    spec = CorpusSpec(**cache.manifest["corpus"])
    # every stored window's roles are its tokens' roles in its conversation
    all_w = list(chat_windows(spec, tok))
    by_ids = {tuple(w.tolist()): rl for w, rl in all_w}
    for w, rl in zip(windows, roles):
        assert (by_ids[tuple(w.tolist())] == rl).all()
    shares = role_shares(cache)
    # by hand for one alive latent: the roles at its firing tokens in its kept windows
    j = int(cache.alive_latents()[0])
    cnt = np.zeros(5)
    for buf in ("top", "sample"):
        rows, acts = cache.kept(buf, j)
        for row, a in zip(rows, acts):
            for p in np.nonzero(a > 0)[0]:
                cnt[roles[row, p]] += 1
    assert np.allclose(shares[j], cnt / cnt.sum())
    store = open_store()
    d = store.dictionary(str(out))
    stats = {s["latent"]: s for s in latent_stats(store, d["id"], stat="assistant_share")}
    assert stats[j]["value"] == pytest.approx(shares[j, ROLE_ID["assistant"]])
    mostly = [k for k, s in stats.items() if s["value"] >= 0.9]
    rows, _ = list_latents(store, d["id"], f=LatentFilter(stat="assistant_share", min_stat=0.9), limit=200)
    assert mostly and sorted(r["index"] for r in rows) == sorted(mostly)[:200]


def test_chat_bad_input_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n" + json.dumps({"text": "x"}))
    args = ["extract", "--corpus", str(bad), "--chat", "-d", "topk-neurons:8", "--hookpoint", "mlp_neurons.2",
            "--out", str(tmp_path / "o"), "--n-tokens", "256", "--ctx-len", "32", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output and "messages" in r.output
    assert not (tmp_path / "o" / "manifest.json").exists()
    r = CliRunner().invoke(app, args + ["--special-tokens", "maybe"])
    assert r.exit_code == 2 and "--special-tokens" in r.output


def test_a_sharded_chat_extraction_job_spec_equals_the_one_process_run(tmp_path, subject):
    """The job path: ExtractionSpec(chat=True) hands its corpus (chat fields included) to every shard; the merged
    cache has the one-process run's windows and roles. A plain-text spec's key is what it was before chat existed."""
    from autointerp.extract import extract, extract_shard, publish_shards
    from autointerp.jobs.spec import ExtractionSpec
    from autointerp.names import digest

    corpus = _write(tmp_path / "chat.jsonl", conversations(12))
    ex = ExtractionSpec(dictionary="topk-neurons:8", hookpoint="mlp_neurons.2", corpus=str(corpus), n_tokens=1536,
                        ctx_len=32, batch_size=8, top_k=6, n_sample=6, pool_size=8, chat=True,
                        special_tokens="drop", shards=3)
    plain = ex.model_copy(update={"chat": False, "special_tokens": "keep"})
    legacy = plain.model_dump(mode="json", exclude={"shards", "device", "also", "names", "chat", "special_tokens"})
    assert plain.key() == digest(legacy) and ex.key() != plain.key()
    kw = {k: v for k, v in ex.extract_kwargs().items() if k not in ("device", "dtype")}
    assert len(ex.shard_bounds()) == 3
    states = [extract_shard(subject, "topk-neurons:8", "mlp_neurons.2", ex.corpus_spec(), windows=b, quality=False,
                            **kw) for b in ex.shard_bounds()]
    merged = publish_shards(states, tmp_path / "merged")
    (one,) = extract(subject, "topk-neurons:8", "mlp_neurons.2", ex.corpus_spec(), tmp_path / "one", quality=False,
                     progress=False, **kw)
    assert merged.manifest["corpus"]["chat"] and merged.manifest["corpus"]["special_tokens"] == "drop"
    assert (np.asarray(merged.array("windows")) == np.asarray(one.array("windows"))).all()
    assert (np.asarray(merged.array("roles")) == np.asarray(one.array("roles"))).all()
    assert tok_start_absent(subject.tokenizer, np.asarray(one.array("windows")))


def tok_start_absent(tok, windows) -> bool:
    return tok.convert_tokens_to_ids("<|im_start|>") not in set(windows.ravel().tolist())
