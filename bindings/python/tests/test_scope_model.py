"""The scope model serac bundles route their memories with (issue 16): opening it, giving it to a
session, and the specific codes for a bundle whose scope model is absent or another one. The
serac bundle and the modified scope-model copy come from make_test_bundles (ffi.sh passes it
the scope model); tests that need them skip without them."""
import os
from pathlib import Path

import pytest

import amend
from amend import AmendError, Result

SCOPE = os.environ.get("AMEND_SCOPE_MODEL") or str(
    Path(os.environ.get("AMEND_CACHE") or Path.home() / ".cache/amend")
    / "all-minilm-l6-v2-q8_0.gguf")
PROMPT, TARGET = "The capital of France is", " Berlin"


@pytest.fixture(scope="module")
def scope_path():
    if not Path(SCOPE).is_file():
        if os.environ.get("AMEND_REQUIRE_MODEL") == "1":
            pytest.fail(f"scope model {SCOPE} missing (AMEND_REQUIRE_MODEL=1)")
        pytest.skip(f"scope model {SCOPE} missing (scripts/fetch-scope-model.sh)")
    return SCOPE


@pytest.fixture(scope="module")
def serac_bundles():
    d = os.environ.get("AMEND_TEST_BUNDLES")
    if not d or not os.path.isfile(os.path.join(d, "serac.amend")):
        pytest.skip("no serac.amend in AMEND_TEST_BUNDLES (scripts/test.d/ffi.sh writes it)")
    return d


def _code(fn, *args):
    with pytest.raises(AmendError) as e:
        fn(*args)
    return e.value.code, e.value.message


def test_bad_scope_model_files(tmp_path):
    before = amend.live_handles()
    code, msg = _code(amend.ScopeModel, tmp_path / "missing.gguf")
    assert code == Result.ERR_SCOPE_MODEL and "not found" in msg
    assert _code(amend.ScopeModel, tmp_path)[0] == Result.ERR_SCOPE_MODEL
    fifo = tmp_path / "fifo.gguf"
    os.mkfifo(fifo)
    assert _code(amend.ScopeModel, fifo)[0] == Result.ERR_SCOPE_MODEL
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 4)
    assert _code(amend.ScopeModel, junk)[0] == Result.ERR_SCOPE_MODEL
    code, msg = _code(amend.ScopeModel, junk, 513)
    assert code == Result.ERR_INVALID_ARGUMENT and "n_threads" in msg
    assert amend.live_handles() == before


def test_null_arguments_through_the_abi():
    lib = amend.library()
    assert lib.amend_scope_model_open(None, 0, None) == Result.ERR_NULL_ARGUMENT
    assert lib.amend_scope_model_open_bytes(b"", 0, 0, None) == Result.ERR_NULL_ARGUMENT
    assert lib.amend_session_set_scope_model(None, None) == Result.ERR_NULL_ARGUMENT
    lib.amend_scope_model_free(None)
    assert lib.amend_last_error_code() == Result.OK


def test_open_close_and_non_utf8_path(scope_path, tmp_path):
    before = amend.live_handles()
    with amend.ScopeModel(scope_path, n_threads=1) as s:
        assert amend.live_handles() == before + 1
    assert s.closed and amend.live_handles() == before
    s.close()  # idempotent
    odd = os.path.join(os.fsencode(tmp_path), b"scope-\xff.gguf")
    os.symlink(os.fsencode(scope_path), odd)
    amend.ScopeModel(odd).close()
    assert amend.live_handles() == before


def test_not_a_bert_model(model_path):
    code, msg = _code(amend.ScopeModel, model_path)
    assert code == Result.ERR_SCOPE_MODEL and "bert" in msg


def _trust(bundles):
    with open(os.path.join(bundles, "key.raw"), "rb") as f:
        return amend.TrustStore([f.read()])


def test_serac_bundle_needs_its_scope_model(session, model, scope_path, serac_bundles):
    base = session.score(PROMPT, TARGET).logprob_sum
    with _trust(serac_bundles) as trust:
        bundle = amend.Bundle.load_file(trust, model, os.path.join(serac_bundles, "serac.amend"))
    # No scope model: refused whole, nothing applied.
    code, msg = _code(session.activate, bundle)
    assert code == Result.ERR_SCOPE_MODEL and "test-serac" in msg
    assert session.active_bundles == []
    assert session.score(PROMPT, TARGET).logprob_sum == base
    assert [a for a in session.explain() if a.family == "memory"] == []
    # Another scope model (one weight changed): MISMATCH, nothing applied.
    with amend.ScopeModel(os.path.join(serac_bundles, "scope-other.gguf")) as other:
        session.set_scope_model(other)
    code, msg = _code(session.activate, bundle)
    assert code == Result.ERR_SCOPE_MODEL_MISMATCH and "test-serac" in msg
    assert session.active_bundles == []
    assert session.score(PROMPT, TARGET).logprob_sum == base
    # The right one (closed at once: the session keeps it alive): the prompt routes.
    with amend.ScopeModel(scope_path) as right:
        session.set_scope_model(right)
    session.activate(bundle)
    assert session.active_bundles == ["test-serac"]
    edited = session.score(PROMPT, TARGET).logprob_sum
    assert edited > base + 1.0, (edited, base)
    assert any(a.family == "memory" and a.n_fired >= 1 for a in session.explain())
    # It cannot be taken away while the bundle needs it.
    assert _code(session.set_scope_model, None)[0] == Result.ERR_SCOPE_MODEL
    session.rollback_bundle("test-serac")
    session.set_scope_model(None)
    assert session.score(PROMPT, TARGET).logprob_sum == base
    bundle.close()
