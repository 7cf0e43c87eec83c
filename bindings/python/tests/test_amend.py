import ctypes
import os
import subprocess
import threading

import pytest

import amend
from amend import AmendError, Result, StopReason

PROMPT = "The capital of France is"


def test_version_and_abi():
    assert amend.version().count(".") == 2
    assert amend.abi_version() == amend.ABI_VERSION


def test_result_constants_match_the_library():
    # Every code the library names is a Result member of that name, and back.
    lib = amend.library()
    named = {}
    for code in range(-1, 1000):
        name = lib.amend_result_name(code).decode()
        if name != "AMEND_UNKNOWN_RESULT":
            named[code] = name
    assert named == {r.value: "AMEND_" + r.name for r in Result}


def test_null_and_forged_handles_through_the_abi():
    lib = amend.library()
    info = ctypes.c_void_p()
    # NULL handle
    assert lib.amend_session_cancel(None) == Result.ERR_NULL_ARGUMENT
    assert b"session" in lib.amend_last_error()
    # a pointer amend never returned
    assert lib.amend_session_cancel(ctypes.c_void_p(0xDEAD0)) == Result.ERR_INVALID_HANDLE
    assert b"not a live amend_session handle" in lib.amend_last_error()
    assert lib.amend_last_error_code() == Result.ERR_INVALID_HANDLE
    # free(NULL) is fine
    lib.amend_model_free(None)
    assert lib.amend_last_error_code() == Result.OK
    del info


def test_missing_model_raises_specific_error(tmp_path):
    with pytest.raises(AmendError) as e:
        amend.Model(tmp_path / "missing.gguf")
    assert e.value.code == Result.ERR_IO and "not found" in e.value.message
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not a gguf file" * 4)
    with pytest.raises(AmendError) as e:
        amend.Model(junk)
    assert e.value.code == Result.ERR_MODEL_LOAD


def test_trust_store_rejects_bad_input():
    with pytest.raises(ValueError):
        amend.TrustStore([b"short"])
    with pytest.raises(AmendError) as e:
        amend.TrustStore([])
    assert e.value.code == Result.ERR_INVALID_ARGUMENT


def test_model_info(model):
    info = model.info
    assert info.n_layer == 18 and info.n_embd == 640 and info.n_vocab == 262144
    assert "gemma3" in model.description


def test_bad_utf8_prompt(session):
    with pytest.raises(AmendError) as e:
        session.generate(b"The capital of \xc3\x28 is", max_tokens=2)
    assert e.value.code == Result.ERR_INVALID_UTF8 and "byte 15" in e.value.message


# RFC 8032 test vector 1: a valid ed25519 public key.
RFC8032_KEY = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def test_corrupt_bundle_buffer(model):
    with amend.TrustStore([RFC8032_KEY]) as trust:
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_bytes(trust, model, b"not a bundle" * 10)
    assert e.value.code == Result.ERR_BUNDLE_FORMAT and "bad magic" in e.value.message


def test_greedy_generation_is_deterministic(session):
    a = session.generate(PROMPT, max_tokens=8, stop_at_eos=False)
    b = session.generate(PROMPT, max_tokens=8, stop_at_eos=False)
    assert a.tokens == b.tokens and len(a.tokens) == 8
    assert a.text == b.text and a.text.strip()
    assert a.stop_reason == StopReason.MAX_TOKENS


def test_private_copy(model_path, tmp_path):
    # private_copy reaches the C struct: off, llama.cpp maps the file (it is in this process's
    # mappings); on (the default), a truncation under the open model changes nothing (a mapped
    # file would end the process with SIGBUS).
    import shutil
    f = tmp_path / "m.gguf"
    shutil.copyfile(model_path, f)
    maps = lambda: open("/proc/self/maps").read()
    with amend.Model(str(f), private_copy=False) as m, amend.Session(m, n_ctx=256) as s:
        assert str(f) in maps()
        mapped = s.generate(PROMPT, max_tokens=6, stop_at_eos=False).tokens
    with amend.Model(str(f)) as m, amend.Session(m, n_ctx=256) as s:
        assert str(f) not in maps()
        before = s.generate(PROMPT, max_tokens=6, stop_at_eos=False).tokens
        assert before == mapped
        os.truncate(f, os.path.getsize(f) // 2)
        assert s.generate(PROMPT, max_tokens=6, stop_at_eos=False).tokens == before


def test_callback_stops_generation(session):
    seen = []
    g = session.generate(PROMPT, max_tokens=16, stop_at_eos=False,
                         on_token=lambda t, s: seen.append(t) or len(seen) < 3)
    assert len(seen) == 3 and g.tokens == seen and g.stop_reason == StopReason.CALLBACK


def test_callback_exception_propagates(session):
    def boom(_t, _s):
        raise KeyError("from callback")

    with pytest.raises(KeyError):
        session.generate(PROMPT, max_tokens=4, on_token=boom)
    # the session is still usable
    assert len(session.generate(PROMPT, max_tokens=2, stop_at_eos=False).tokens) == 2


def test_reentry_from_callback_is_busy(session):
    codes = []

    def reenter(_t, _s):
        try:
            session.generate("x", max_tokens=1)
        except AmendError as e:
            codes.append(e.code)
        return False

    session.generate(PROMPT, max_tokens=4, on_token=reenter)
    assert codes == [Result.ERR_BUSY]


def test_cancel_from_another_thread(session):
    started = threading.Event()

    def on_token(_t, _s):
        started.set()
        return True

    def canceller():
        started.wait(60)
        session.cancel()

    th = threading.Thread(target=canceller)
    th.start()
    with pytest.raises(AmendError) as e:
        session.generate(PROMPT, max_tokens=400, stop_at_eos=False, on_token=on_token)
    th.join()
    assert e.value.code == Result.ERR_CANCELLED


def test_stream_yields_the_same_text(session):
    full = session.generate(PROMPT, max_tokens=8, stop_at_eos=False).text
    assert "".join(session.stream(PROMPT, max_tokens=8, stop_at_eos=False)) == full


def test_score(session):
    paris = session.score(PROMPT, " Paris")
    banana = session.score(PROMPT, " banana")
    assert paris.n_target_tokens >= 1 and paris.logprob_sum < 0
    assert paris.logprob_sum > banana.logprob_sum


def test_same_tokens_as_rust_api(session, model_path):
    ref = os.environ.get("AMEND_REFERENCE_BIN")
    if not ref:
        pytest.skip("AMEND_REFERENCE_BIN not set (scripts/test.d/ffi.sh sets it)")
    want = subprocess.run(
        [ref, "--model", model_path, "--tokens", "12", "--seed", "42", "--temperature", "0.8"],
        check=True, capture_output=True, text=True).stdout.split()
    got = session.generate(PROMPT, max_tokens=12, seed=42, temperature=0.8)
    assert [str(t) for t in got.tokens] == want


def test_backend_choice(model_path):
    with pytest.raises(ValueError):
        amend.Model(model_path, backend="tpu")
    with pytest.raises(AmendError) as e:
        amend.Model(model_path, backend="onnxruntime", edit_slots="cb:nope")
    assert e.value.code == Result.ERR_INVALID_ARGUMENT
    cache = os.environ.get("AMEND_CACHE") or os.path.expanduser("~/.cache/amend")
    lib = os.environ.get("AMEND_ORT_LIB") or os.path.join(cache, "ort/cpu/libonnxruntime.so.1.32.0")
    if not os.path.exists(lib):
        pytest.skip("ONNX Runtime library missing (make ort)")
    # The same greedy tokens on ONNX Runtime as on llama.cpp for this prompt.
    m = amend.Model(model_path, backend="onnxruntime", ep="cpu", n_threads=1)
    s = amend.Session(m, n_ctx=256)
    got = s.generate(PROMPT, max_tokens=4).tokens
    s.close()
    m.close()
    m2 = amend.Model(model_path)
    s2 = amend.Session(m2, n_ctx=256)
    want = s2.generate(PROMPT, max_tokens=4).tokens
    s2.close()
    m2.close()
    assert got == want
    # Fixed shapes (a prefill chunk and a KV window, as QNN needs): the same tokens; a context
    # beyond the window and half-given shapes are refused.
    m3 = amend.Model(model_path, backend="onnxruntime", n_threads=1, static_shapes=(16, 256))
    with pytest.raises(AmendError) as e:
        amend.Session(m3, n_ctx=512)
    assert e.value.code == Result.ERR_INVALID_ARGUMENT
    s3 = amend.Session(m3, n_ctx=256)
    assert s3.generate(PROMPT, max_tokens=4).tokens == want
    s3.close()
    m3.close()
    with pytest.raises(AmendError) as e:
        amend.Model(model_path, backend="onnxruntime", static_shapes=(16, 0))
    assert e.value.code == Result.ERR_INVALID_ARGUMENT
    # Provider options reach the library: the CPU EP takes none, refused by name.
    with pytest.raises(AmendError) as e:
        amend.Model(model_path, backend="onnxruntime", ep_options={"num_of_threads": "1"})
    assert e.value.code == Result.ERR_INVALID_ARGUMENT
    assert "provider options" in e.value.message
    with pytest.raises(ValueError):
        amend.Model(model_path, backend="onnxruntime", ep_options={"a\nb": "1"})


def test_closed_objects_raise(model_path):
    m = amend.Model(model_path)
    s = amend.Session(m, n_ctx=128)
    m.close()  # the session keeps the weights alive
    assert len(s.generate(PROMPT, max_tokens=1, stop_at_eos=False).tokens) == 1
    s.close()
    with pytest.raises(AmendError) as e:
        s.generate(PROMPT, max_tokens=1)
    assert e.value.code == Result.ERR_INVALID_HANDLE


def test_explain_and_rollback_report_clearly(session):
    with pytest.raises(AmendError) as e:
        session.rollback_bundle("no-such-bundle")
    assert e.value.code == Result.ERR_NOT_FOUND
    assert session.active_bundles == []


@pytest.fixture(scope="module")
def bundles():
    d = os.environ.get("AMEND_TEST_BUNDLES")
    if not d:
        pytest.skip("AMEND_TEST_BUNDLES not set (scripts/test.d/ffi.sh writes them)")
    return d


def _trust(bundles):
    with open(os.path.join(bundles, "key.raw"), "rb") as f:
        return amend.TrustStore([f.read()])


def test_bundle_load_and_inspect(model, bundles):
    with _trust(bundles) as trust:
        b = amend.Bundle.load_file(trust, model, os.path.join(bundles, "good.amend"))
        assert b.id == "test-good" and b.n_edits == 1 and b.edit_ids == ["e-paris"]
        assert b.channel == "test" and b.version == 1
        with open(os.path.join(bundles, "good.amend"), "rb") as f:
            data = f.read()
        assert amend.Bundle.load_bytes(trust, model, data).id == "test-good"
        corrupt = bytearray(data)
        corrupt[-7] ^= 0x5A
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_bytes(trust, model, bytes(corrupt))
        assert e.value.code in (Result.ERR_BUNDLE_INTEGRITY, Result.ERR_SIGNATURE,
                                Result.ERR_BUNDLE_FORMAT)
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_bytes(trust, model, data[:40])
        assert e.value.code == Result.ERR_BUNDLE_FORMAT and "truncated" in e.value.message


def test_bundle_for_another_model(model, bundles):
    with _trust(bundles) as trust:
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_file(trust, model, os.path.join(bundles, "other-model.amend"))
        assert e.value.code == Result.ERR_MODEL_MISMATCH and "another model" in e.value.message
        with pytest.raises(AmendError) as e:
            amend.Bundle.load_file(trust, model, os.path.join(bundles, "untrusted.amend"))
        assert e.value.code == Result.ERR_UNTRUSTED_KEY


def test_activate_list_explain_rollback(session, model, bundles):
    with _trust(bundles) as trust:
        good = amend.Bundle.load_file(trust, model, os.path.join(bundles, "good.amend"))
        session.activate(good)
        with pytest.raises(AmendError) as e:
            session.activate(good)
        assert e.value.code == Result.ERR_BUNDLE_DOWNGRADE and "replay" in e.value.message
        assert session.active_bundles == ["test-good"]
        session.generate(PROMPT, max_tokens=2)
        acts = session.explain()
        assert [(a.bundle_id, a.edit_id, a.family) for a in acts] == [("test-good", "e-paris", "codebook")]
        assert acts[0].n_checked > 0 and acts[0].n_fired == 0
        session.rollback_edit("e-paris")
        with pytest.raises(AmendError) as e:
            session.rollback_edit("e-paris")
        assert e.value.code == Result.ERR_EDIT_CONFLICT
        session.rollback_bundle("test-good")
        assert session.active_bundles == []


def test_same_tokens_as_rust_api_with_a_bundle(session, model, model_path, bundles):
    ref = os.environ.get("AMEND_REFERENCE_BIN")
    if not ref:
        pytest.skip("AMEND_REFERENCE_BIN not set (scripts/test.d/ffi.sh sets it)")
    lora = os.path.join(bundles, "lora.amend")
    want = subprocess.run(
        [ref, "--model", model_path, "--tokens", "12", "--seed", "7", "--temperature", "0.7",
         "--bundle", lora, "--key", os.path.join(bundles, "key.raw")],
        check=True, capture_output=True, text=True).stdout.split()
    base = session.generate(PROMPT, max_tokens=12, seed=7, temperature=0.7)
    with _trust(bundles) as trust:
        session.activate(amend.Bundle.load_file(trust, model, lora))
    got = session.generate(PROMPT, max_tokens=12, seed=7, temperature=0.7)
    assert [str(t) for t in got.tokens] == want
    assert got.tokens != base.tokens, "the bundle changed nothing"
    # teacher-forced scoring sees the edit too
    edited = session.score(PROMPT, got.text)
    session.rollback_bundle("test-lora")
    assert session.score(PROMPT, got.text).logprob_sum < edited.logprob_sum


def test_no_handles_leak(model):
    # The session-scoped model is the only handle that may still be open here.
    import gc

    gc.collect()
    assert amend.live_handles() == 1, amend.live_handles()


def test_set_lora_scale_scales_the_adapter(session, model, bundles):
    base = session.score(PROMPT, " Paris").logprob_sum
    with _trust(bundles) as trust:
        session.activate(amend.Bundle.load_file(trust, model, os.path.join(bundles, "lora.amend")))
    edited = session.score(PROMPT, " Paris").logprob_sum
    assert edited != base, "the bundle changed nothing"
    session.set_lora_scale("test-lora", 0.0)
    assert session.score(PROMPT, " Paris").logprob_sum == base
    for bad in (float("nan"), 1e30, -101.0):
        with pytest.raises(AmendError) as e:
            session.set_lora_scale("test-lora", bad)
        assert e.value.code == Result.ERR_INVALID_ARGUMENT and "LoRA scale" in str(e.value)
    assert session.score(PROMPT, " Paris").logprob_sum == base, "a refusal changed the scale"
    session.set_lora_scale("test-lora", 1)
    assert session.score(PROMPT, " Paris").logprob_sum == edited


def test_set_lora_scale_refuses_unknown_ids_and_non_numbers(session):
    with pytest.raises(AmendError) as e:
        session.set_lora_scale("no-such-bundle", 0.5)
    assert e.value.code == Result.ERR_NOT_FOUND and "no-such-bundle" in str(e.value)
    with pytest.raises(AmendError) as e:
        session.set_lora_scale(b"\xff", 0.5)
    assert e.value.code == Result.ERR_INVALID_UTF8
    with pytest.raises(TypeError):
        session.set_lora_scale("test-lora", "1")
