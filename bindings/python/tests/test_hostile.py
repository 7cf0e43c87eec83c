"""A careless caller of the Python API: text with a NUL byte where C reads a NUL-terminated
string is refused (C would act on the part before the NUL: another file, another bundle),
integers C cannot hold raise ValueError instead of wrapping around, and an early-closed
stream() does not leave a cancel behind for the session's next generation."""

import threading

import pytest

import amend
from amend import AmendError, Result

PROMPT = "The capital of France is"
# RFC 8032 test vector 1: a valid ed25519 public key.
KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def test_nul_bytes_are_refused_not_cut(model_path, model, session, tmp_path):
    # The part before the NUL is a real model: C would have opened it.
    with pytest.raises(AmendError) as e:
        amend.Model(model_path + "\0.ignored")
    assert e.value.code == Result.ERR_INVALID_ARGUMENT and "NUL" in e.value.message
    with pytest.raises(AmendError) as e:
        amend.Model(model_path, backend="onnxruntime", ep="cpu\0x")
    assert e.value.code == Result.ERR_INVALID_ARGUMENT and "ep" in e.value.message
    with amend.TrustStore([KEY]) as trust:
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_file(trust, model, str(tmp_path / "missing.amend") + "\0x")
        assert e.value.code == Result.ERR_INVALID_ARGUMENT
    for rollback in (session.rollback_bundle, session.rollback_edit):
        with pytest.raises(AmendError) as e:
            rollback("no-such-id\0tail")
        assert e.value.code == Result.ERR_INVALID_ARGUMENT and "NUL" in e.value.message
        with pytest.raises(TypeError):
            rollback(None)


def test_integers_do_not_wrap(model_path, model, session):
    # 2**32 wrapped to 0 tokens, -1 to UINT32_MAX (generate until the context is full).
    for bad in (2**32, 2**32 + 3, -1):
        with pytest.raises(ValueError, match="max_tokens"):
            session.generate(PROMPT, max_tokens=bad)
    for name in ("seed", "top_k"):
        with pytest.raises(ValueError, match=name):
            session.generate(PROMPT, max_tokens=1, **{name: -1})
    with pytest.raises(TypeError):
        session.generate(PROMPT, max_tokens=1.5)
    with pytest.raises(ValueError, match="n_ctx"):
        amend.Session(model, n_ctx=-1)
    with pytest.raises(ValueError, match="n_threads"):
        amend.Session(model, n_threads=-1)
    with pytest.raises(ValueError, match="n_threads"):
        amend.Model(model_path, n_threads=-1)
    with pytest.raises(ValueError, match="n_threads"):
        amend.ScopeModel(model_path, n_threads=2**32)
    with pytest.raises(ValueError, match="static_shapes"):
        amend.Model(model_path, backend="onnxruntime", static_shapes=(-1, 64))
    # The session is unharmed.
    assert len(session.generate(PROMPT, max_tokens=2, stop_at_eos=False).tokens) == 2


def test_stream_closed_after_the_generation_ended_keeps_no_cancel(session):
    before = set(threading.enumerate())
    it = session.stream(PROMPT, max_tokens=2, stop_at_eos=False)
    next(it)
    # Let the worker finish the generation while the consumer has not read its end.
    for th in set(threading.enumerate()) - before:
        th.join(60)
    it.close()
    g = session.generate(PROMPT, max_tokens=2, stop_at_eos=False)
    assert len(g.tokens) == 2


def test_stream_closed_early_stops_the_generation(session):
    it = session.stream(PROMPT, max_tokens=400, stop_at_eos=False)
    next(it)
    it.close()  # returns once the worker stopped (at its next token)
    assert len(session.generate(PROMPT, max_tokens=2, stop_at_eos=False).tokens) == 2
