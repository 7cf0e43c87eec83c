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


def _child_generates_the_parent_text(s):
    """Forks; the child generates with `s` (made by the parent) and sends its text back."""
    import os
    import select
    import signal

    want = s.generate(PROMPT, max_tokens=8, stop_at_eos=False).text
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only the session's calls, then _exit
        code = 1
        try:
            os.close(r)
            text = s.generate(PROMPT, max_tokens=8, stop_at_eos=False).text
            os.write(w, text.encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    ready, _, _ = select.select([r], [], [], 60)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)
        raise AssertionError("the forked child hung generating with the parent's session")
    got = b""
    while chunk := os.read(r, 4096):
        got += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert got.decode() == want
    # The parent's session still generates on its own threads.
    assert s.generate(PROMPT, max_tokens=8, stop_at_eos=False).text == want


def test_session_made_before_fork_generates_in_the_child(model):
    """A process that forks after making a session (multiprocessing's "fork" start method):
    the child has none of the parent's compute threads. Since session 39 they are started once
    per session, and the child's first decode goes back to per-call threads instead of waiting
    for them forever; the child's text is the parent's."""
    s = amend.Session(model, n_ctx=512, n_threads=2)
    try:
        _child_generates_the_parent_text(s)
    finally:
        s.close()


def _ort_library():
    import os

    cache = os.environ.get("AMEND_CACHE") or os.path.expanduser("~/.cache/amend")
    lib = os.environ.get("AMEND_ORT_LIB") or os.path.join(cache, "ort/cpu/libonnxruntime.so.1.32.0")
    if not os.path.exists(lib):
        pytest.skip("ONNX Runtime library missing (make ort)")
    return lib


def test_onnx_runtime_session_made_before_fork_and_telemetry_off(model_path):
    """The same on ONNX Runtime's CPU EP with 2 threads; and loading ONNX Runtime through the
    C ABI set ORT_DISABLE_TELEMETRY=1 in the process (ONNX Runtime 1.29+ keeps a device id and
    an event store for Microsoft's collector otherwise) unless the process had the variable."""
    import ctypes
    import os

    _ort_library()
    m = amend.Model(model_path, backend="onnxruntime", ep="cpu", n_threads=2)
    try:
        s = amend.Session(m, n_ctx=256, n_threads=2)
        try:
            _child_generates_the_parent_text(s)
        finally:
            s.close()
    finally:
        m.close()
    if "ORT_DISABLE_TELEMETRY" not in os.environ:  # the variable as the process started
        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_char_p
        assert libc.getenv(b"ORT_DISABLE_TELEMETRY") == b"1"
