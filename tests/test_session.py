"""Generation sessions: interrupted generation, saved with tiermem.checkpoint and restored into a fresh
model, continues with exactly the tokens of one uninterrupted call."""

import pytest
import torch
from hf_models import packed_stores

import tiermem
from tiermem import GenerationSession

pytest.importorskip("transformers")

TOTAL = 24
SAMPLED = dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=20)
MODES = {"greedy": {}, "sampled": SAMPLED}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    return packed_stores(tmp_path_factory.mktemp("session-stores"), ("llama3", "opt", "llama2"))


@pytest.fixture(scope="module")
def batch():
    """3 rows of 7 tokens; rows 1 and 2 left-padded by 3 and 5."""
    ids = torch.randint(3, 256, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    for row, pad in ((1, 3), (2, 5)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


def load(store, **kwargs):
    return tiermem.load(store, max_batch_size=4, max_seq_len=64, **kwargs)


def uninterrupted(store, batch, sampling, n=TOTAL, **kwargs):
    ids, mask = batch
    with load(store) as m:
        return m.generate(ids, n, attention_mask=mask, seed=1234, **sampling, **kwargs)


def save_and_restore(session, path):
    """Checkpoint the session's state and read it back as a new session (device 'cpu')."""
    tiermem.checkpoint.save_async(session.state_dict(), path).result()
    return GenerationSession.from_state_dict(tiermem.checkpoint.load(path), device="cpu")


def interrupted(store, batch, sampling, pieces, tmp_path, **kwargs):
    """Generate in `pieces`, closing the model, checkpointing and restoring between pieces."""
    ids, mask = batch
    session = GenerationSession()
    with load(store) as m:
        out = m.generate(ids, pieces[0], attention_mask=mask, seed=1234, session=session, **sampling, **kwargs)
    for k, n in enumerate(pieces[1:]):
        session = save_and_restore(session, tmp_path / f"gen-{k}")
        with load(store) as m:
            out = m.generate(None, n, session=session)
    return out, session


@pytest.mark.parametrize("variant", ["llama3", "opt"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("pieces", [(10, 14), (5, 9, 10), (0, 24)], ids=["2 pieces", "3 pieces", "after prompt"])
def test_interrupted_generation_equals_uninterrupted(stores, batch, tmp_path, variant, mode, pieces):
    ref = uninterrupted(stores[variant], batch, MODES[mode], eos_token_id=[])
    assert ref.shape == (3, 7 + TOTAL)
    out, session = interrupted(stores[variant], batch, MODES[mode], pieces, tmp_path, eos_token_id=[])
    assert torch.equal(out, ref), f"{variant} {mode} {pieces}: tokens differ after restoring"
    assert session.new_tokens == TOTAL and session.prompt_length == 7
    assert torch.equal(session.tokens.cpu(), ref)


def test_sampled_sessions_differ_from_greedy_and_across_seeds(stores, batch):
    greedy = uninterrupted(stores["llama3"], batch, {})
    a = uninterrupted(stores["llama3"], batch, SAMPLED)
    assert not torch.equal(a, greedy)
    ids, mask = batch
    with load(stores["llama3"]) as m:
        b = m.generate(ids, TOTAL, attention_mask=mask, seed=99, session=GenerationSession(), **SAMPLED)
    assert not torch.equal(a, b)


def test_in_memory_continuation_grows_the_cache(stores, batch):
    ids, mask = batch
    ref = uninterrupted(stores["opt"], batch, SAMPLED)
    s = GenerationSession()
    with load(stores["opt"]) as m:
        m.generate(ids, 3, attention_mask=mask, seed=1234, session=s, **SAMPLED)
        assert s.cache.max_len == 7 + 3
        for n in (1, 0, 6, 14):
            out = m.generate(None, n, session=s, micro_batches=2)
        assert s.cache.max_len >= 7 + TOTAL and s.cache.length == 7 + TOTAL - 1
        # passing the session's tokens back (a loop `out = m.generate(out, ...)`) and its settings is fine
        out2 = m.generate(out, 0, session=s, **SAMPLED)
    assert torch.equal(out, ref) and torch.equal(out2, ref)
    out[0, 0] = 7  # the returned tensor is a copy: the session is unaffected
    assert torch.equal(s.tokens, ref)


def test_state_dict_round_trips_and_keeps_only_filled_kv(stores, batch, tmp_path):
    ids, mask = batch
    s = GenerationSession()
    with load(stores["llama3"]) as m:
        m.generate(ids, 10, attention_mask=mask, seed=3, session=s, **SAMPLED)
        assert s.cache.max_len == 17
    sd = s.state_dict()
    tiermem.checkpoint.save_async(sd, tmp_path / "ckpt").result()
    back = tiermem.checkpoint.load(tmp_path / "ckpt")
    assert back["attention_mask"].dtype == torch.bool and torch.equal(back["attention_mask"], sd["attention_mask"])
    assert back["unfinished"].dtype == torch.bool and torch.equal(back["unfinished"], sd["unfinished"])
    assert back["rng"]["state"].dtype == torch.uint8 and torch.equal(back["rng"]["state"], sd["rng"]["state"])
    assert back["rng"]["device"] == "cpu"
    assert back["sampling"] == sd["sampling"] and back["model"] == sd["model"]
    assert back["kv"]["length"] == 16 and all(k.shape[2] == 16 for k in back["kv"]["keys"] + back["kv"]["values"])
    for a, b in zip(sd["kv"]["keys"] + sd["kv"]["values"], back["kv"]["keys"] + back["kv"]["values"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(back["tokens"], s.tokens) and back["new_tokens"] == 10
    restored = GenerationSession.from_state_dict(back)
    assert restored.cache.max_len == 16 and restored.generator is None  # bound to a model on first use
    assert restored.sampling == s.sampling
    # a restored session that was never used saves the same state again
    again = restored.state_dict()
    assert torch.equal(again["rng"]["state"], sd["rng"]["state"]) and again["kv"]["length"] == 16


def test_zero_new_tokens_session_saves_an_empty_cache(stores, batch, tmp_path):
    ids, mask = batch
    s = GenerationSession()
    with load(stores["opt"]) as m:
        out = m.generate(ids, 0, attention_mask=mask, session=s)
    assert torch.equal(out, ids) and s.new_tokens == 0 and s.cache.length == 0
    restored = save_and_restore(s, tmp_path / "empty")
    assert restored.cache.length == 0 and restored.new_tokens == 0
    assert torch.equal(restored.attention_mask, mask.bool())


def eos_choices(store, batch):
    """Greedy tokens of the uninterrupted run, no EOS (for choosing EOS ids)."""
    return uninterrupted(store, batch, {}, eos_token_id=[])[:, 7:]


def test_row_finished_before_the_save_stays_padded(stores, batch, tmp_path):
    store = stores["llama3"]
    new = eos_choices(store, batch)
    eos = int(new[0, 3])  # row 0 emits it at step 4, before the save after 10
    kwargs = dict(eos_token_id=[eos], pad_token_id=0)
    ref = uninterrupted(store, batch, {}, **kwargs)
    out, s = interrupted(store, batch, {}, (10, 14), tmp_path, **kwargs)
    assert torch.equal(out, ref)
    first = int((out[0, 7:] == eos).nonzero()[0])
    assert first <= 3 and (out[0, 7 + first + 1:] == 0).all() and out.shape[1] - 7 - first - 1 > 14
    assert not bool(s.unfinished[0])


@pytest.mark.parametrize("finish", ["before the save", "after the save"])
def test_every_row_finishing_stops_across_the_interruption(stores, batch, tmp_path, finish):
    store = stores["opt"]
    new = eos_choices(store, batch)
    step = 2 if finish == "before the save" else 13
    eos = new[:, step].tolist()  # every row finishes at step + 1 at the latest
    ref = uninterrupted(store, batch, {}, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] <= 7 + step + 1
    out, s = interrupted(store, batch, {}, (10, 14), tmp_path, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref) and not bool(s.unfinished.any())
    with load(store) as m:  # a finished session generates nothing more
        assert torch.equal(m.generate(None, 5, session=s), ref)


def test_restoring_into_another_model_names_the_mismatch(stores, batch, tmp_path):
    ids, mask = batch
    s = GenerationSession()
    with load(stores["llama3"]) as m:
        m.generate(ids, 4, attention_mask=mask, session=s)
    restored = save_and_restore(s, tmp_path / "llama3")
    with load(stores["opt"]) as m, pytest.raises(tiermem.ConfigError, match="model_type: session 'llama'"):
        m.generate(None, 4, session=restored)
    with load(stores["llama2"]) as m, pytest.raises(tiermem.ConfigError, match="num_kv_heads: session 2, model 4"):
        m.generate(None, 4, session=restored)
    with load(stores["llama3"], dtype=torch.float64) as m, pytest.raises(tiermem.ConfigError, match="float64"):
        m.generate(None, 4, session=restored)
    hf = stores["llama3"].parent / "hf"  # packed_stores' layout: root/variant/{hf,store}
    other_weights = tiermem.pack(hf, tmp_path / "int8", quant="int8", group_size=32, progress=False)
    with load(other_weights) as m, pytest.raises(tiermem.ConfigError, match="weights: session '[0-9a-f]{16}'"):
        m.generate(None, 4, session=restored)  # the same config: it continued on them, mixing two models
    with load(stores["llama3"]) as m:  # still usable on the right model after the refusals
        assert m.generate(None, 4, session=restored).shape == (3, 7 + 8)
    copy = tiermem.pack(hf, tmp_path / "copy", progress=False)  # the same weights packed again: the same id
    with load(copy) as m:
        assert m.generate(None, 4, session=save_and_restore(s, tmp_path / "again")).shape == (3, 7 + 8)


def test_continuation_rejects_other_settings(stores, batch):
    ids, mask = batch
    s = GenerationSession()
    with load(stores["opt"]) as m:
        m.generate(ids, 4, attention_mask=mask, seed=1, session=s, **SAMPLED)
        for bad, match in [(dict(temperature=0.5), "temperature=0.5"), (dict(do_sample=False), "do_sample"),
                           (dict(top_k=5), "top_k"), (dict(eos_token_id=7), "eos_token_id"),
                           (dict(pad_token_id=9), "pad_token_id"), (dict(seed=1), "RNG"),
                           (dict(generator=torch.Generator()), "RNG"),
                           (dict(attention_mask=mask), "attention_mask")]:
            with pytest.raises(tiermem.ConfigError, match=match):
                m.generate(None, 2, session=s, **bad)
        with pytest.raises(tiermem.ConfigError, match="input_ids differ"):
            m.generate(ids, 2, session=s)
        with pytest.raises(tiermem.BudgetError, match="max_seq_len"):
            m.generate(None, 64, session=s)
        assert s.new_tokens == 4  # refused calls change nothing
        # the session's own settings and generator are accepted
        m.generate(None, 2, session=s, generator=s.generator, eos_token_id=2, **SAMPLED)
        assert s.new_tokens == 6


def test_empty_session_and_bad_state_dicts_are_refused(stores, batch):
    s = GenerationSession()
    assert not s.started
    with pytest.raises(tiermem.ConfigError, match="empty"):
        s.state_dict()
    with pytest.raises(tiermem.ConfigError, match="format"):
        GenerationSession.from_state_dict({"tokens": torch.zeros(1, 2)})
    ids, mask = batch
    with load(stores["opt"]) as m:
        with pytest.raises(tiermem.ConfigError, match="temperature"):  # checked before the session is filled
            m.generate(ids, 2, attention_mask=mask, session=s, do_sample=True, temperature=0.0)
        assert not s.started
        m.generate(ids, 2, attention_mask=mask, session=s)
    sd = s.state_dict()
    with pytest.raises(tiermem.ConfigError, match="inconsistent"):
        GenerationSession.from_state_dict(dict(sd, unfinished=torch.ones(2, dtype=torch.bool)))
    with pytest.raises(tiermem.ConfigError, match="malformed"):
        GenerationSession.from_state_dict({k: v for k, v in sd.items() if k != "kv"})
    kv = sd["kv"]
    malformed = [  # each raised AttributeError, ValueError or RuntimeError, or failed at the next generate
        dict(sd, tokens=sd["tokens"].tolist()), dict(sd, tokens=sd["tokens"][0]), dict(sd, attention_mask=None),
        dict(sd, kv=dict(kv, keys=[1] * len(kv["keys"]))), dict(sd, rng={"device": "cpu", "state": 5}),
        dict(sd, sampling=dict(sd["sampling"], do_sample=True, temperature=float("nan"))),
    ]
    for bad in malformed:
        with pytest.raises(tiermem.ConfigError, match="malformed"):
            GenerationSession.from_state_dict(bad)
    with pytest.raises(tiermem.ConfigError, match="cannot move the GenerationSession to device 'bogus'"):
        GenerationSession.from_state_dict(sd, device="bogus")
    half_dim = [k[..., : k.shape[-1] // 2] for k in kv["keys"]]
    edited = {  # well-formed, but not this model's: refused at the next generate, before anything runs
        "does not fit the model": dict(sd, kv=dict(kv, keys=kv["keys"][:1], values=kv["values"][:1])),
        r"does not fit the model \(2 layers": dict(sd, kv=dict(kv, keys=half_dim,
                                                            values=[v[..., : v.shape[-1] // 2] for v in kv["values"]])),
        "token ids outside the model's vocabulary": dict(sd, tokens=sd["tokens"] + 10**6),
        "sampler RNG state is not one torch can take": dict(sd, sampling=dict(sd["sampling"], do_sample=True),
                                                            rng={"device": "cpu", "state": torch.zeros(3)}),
    }
    with load(stores["opt"]) as m:
        for match, bad in edited.items():
            with pytest.raises(tiermem.ConfigError, match=match):
                m.generate(None, 2, session=GenerationSession.from_state_dict(bad))


def test_a_step_interrupted_midway_leaves_a_consistent_session(stores, batch, tmp_path, monkeypatch):
    """Ctrl-C during a forward pass (after the cache was written): save, restore, continue exactly."""
    ids, mask = batch
    ref = uninterrupted(stores["llama3"], batch, {}, eos_token_id=[])
    s = GenerationSession()
    with load(stores["llama3"]) as m:
        real, calls = m.executor.forward, []

        def forward(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return out

        monkeypatch.setattr(m.executor, "forward", forward)
        with pytest.raises(KeyboardInterrupt):
            m.generate(ids, TOTAL, attention_mask=mask, eos_token_id=[], session=s)
    assert s.new_tokens == 5 and s.cache.length == 7 + 4
    restored = save_and_restore(s, tmp_path / "interrupted")
    with load(stores["llama3"]) as m:
        out = m.generate(None, TOTAL - 5, session=restored)
    assert torch.equal(out, ref)
