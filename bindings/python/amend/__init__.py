"""Python bindings for amend (ctypes over the C ABI in include/amend.h).

Objects own their C handle and free it on close() / context exit / garbage collection.
Every failing call raises AmendError carrying the result code and amend's message. Text with a
NUL byte where C takes a NUL-terminated string (a model path, an id, an option) is refused
before the call (AmendError, ERR_INVALID_ARGUMENT), never cut short at the NUL; an integer
parameter C cannot hold (negative, or too large for its C type) raises ValueError naming it,
never wraps around.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

__all__ = [
    "AmendError",
    "Bundle",
    "Model",
    "ModelInfo",
    "Result",
    "ScopeModel",
    "Score",
    "Session",
    "StopReason",
    "TrustStore",
    "Generation",
    "EditActivity",
    "abi_version",
    "library",
    "live_handles",
    "version",
    "PUBLIC_KEY_LEN",
    "FLUSH_TOKEN",
]

PUBLIC_KEY_LEN = 32
FLUSH_TOKEN = -1
ABI_VERSION = 2


class Result(enum.IntEnum):
    """amend_result: one code per failure class (see include/amend.h)."""

    OK = 0
    ERR_NULL_ARGUMENT = 100
    ERR_INVALID_HANDLE = 101
    ERR_INVALID_ARGUMENT = 102
    ERR_INVALID_UTF8 = 103
    ERR_BUFFER_TOO_SMALL = 104
    ERR_BUSY = 105
    ERR_NOT_SUPPORTED = 106
    ERR_PANIC = 107
    ERR_IO = 108
    ERR_STATE_SIZE = 109
    ERR_MODEL_LOAD = 200
    ERR_CONTEXT = 201
    ERR_TOKENIZE = 202
    ERR_CONTEXT_FULL = 203
    ERR_DECODE = 204
    ERR_CANCELLED = 205
    ERR_BUNDLE_FORMAT = 300
    ERR_BUNDLE_VERSION = 301
    ERR_BUNDLE_INTEGRITY = 302
    ERR_SIGNATURE = 303
    ERR_UNTRUSTED_KEY = 304
    ERR_MODEL_MISMATCH = 305
    ERR_EDIT_INVALID = 306
    ERR_EDIT_CONFLICT = 307
    ERR_NOT_FOUND = 308
    ERR_INVALID_KEY = 309
    ERR_BUNDLE_EXPIRED = 310
    ERR_BUNDLE_DOWNGRADE = 311
    ERR_BUNDLE_TRUNCATED = 312
    ERR_BUNDLE_TOO_LONG = 313
    ERR_SCOPE_MODEL = 314
    ERR_SCOPE_MODEL_MISMATCH = 315
    ERR_BUNDLE_UNVERIFIED = 316


class StopReason(enum.IntEnum):
    MAX_TOKENS = 0
    EOS = 1
    CALLBACK = 2
    CONTEXT_FULL = 3
    CANCELLED = 4


class AmendError(Exception):
    """A failed amend call: `code` is a Result, `message` amend's explanation."""

    def __init__(self, code: int, message: str):
        try:
            self.code = Result(code)
        except ValueError:
            self.code = code
        self.message = message
        name = self.code.name if isinstance(self.code, Result) else str(code)
        super().__init__(f"AMEND_{name}: {message}")


# ---- C types -------------------------------------------------------------------------------

class _ModelParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("use_mmap", ctypes.c_bool),
        ("n_threads", ctypes.c_uint32),
        ("backend", ctypes.c_uint32),
        ("ep", ctypes.c_char_p),
        ("ort_library", ctypes.c_char_p),
        ("edit_slots", ctypes.c_char_p),
        ("cpu_fallback", ctypes.c_bool),
        ("static_chunk", ctypes.c_size_t),
        ("static_window", ctypes.c_size_t),
        ("ep_options", ctypes.c_char_p),
        ("private_copy", ctypes.c_bool),
    ]


BACKENDS = {"llama.cpp": 0, "onnxruntime": 1}


class _ModelInfo(ctypes.Structure):
    _fields_ = [
        ("n_layer", ctypes.c_uint32),
        ("n_embd", ctypes.c_uint32),
        ("n_ff", ctypes.c_uint32),
        ("n_head", ctypes.c_uint32),
        ("n_head_kv", ctypes.c_uint32),
        ("n_vocab", ctypes.c_uint32),
        ("n_ctx_train", ctypes.c_uint32),
        ("bos", ctypes.c_int32),
        ("eos", ctypes.c_int32),
        ("n_params", ctypes.c_uint64),
        ("size_bytes", ctypes.c_uint64),
    ]


class _SessionParams(ctypes.Structure):
    _fields_ = [
        ("n_ctx", ctypes.c_uint32),
        ("n_ubatch", ctypes.c_uint32),
        ("n_threads", ctypes.c_uint32),
        ("n_threads_batch", ctypes.c_uint32),
    ]


class _GenerateParams(ctypes.Structure):
    _fields_ = [
        ("max_tokens", ctypes.c_uint32),
        ("temperature", ctypes.c_float),
        ("top_k", ctypes.c_uint32),
        ("top_p", ctypes.c_float),
        ("min_p", ctypes.c_float),
        ("repeat_penalty", ctypes.c_float),
        ("repeat_last_n", ctypes.c_uint32),
        ("seed", ctypes.c_uint32),
        ("add_bos", ctypes.c_bool),
        ("stop_at_eos", ctypes.c_bool),
    ]


class _Generation(ctypes.Structure):
    _fields_ = [
        ("n_prompt_tokens", ctypes.c_uint32),
        ("n_generated", ctypes.c_uint32),
        ("stop_reason", ctypes.c_int),
        ("prefill_tok_s", ctypes.c_double),
        ("decode_tok_s", ctypes.c_double),
    ]


class _Score(ctypes.Structure):
    _fields_ = [
        ("n_target_tokens", ctypes.c_uint32),
        ("logprob_sum", ctypes.c_double),
        ("logprob_mean", ctypes.c_double),
        ("n_argmax_match", ctypes.c_uint32),
    ]


class _EditActivity(ctypes.Structure):
    _fields_ = [
        ("bundle_id", ctypes.c_char_p),
        ("edit_id", ctypes.c_char_p),
        ("family", ctypes.c_char_p),
        ("layer", ctypes.c_uint32),
        ("n_fired", ctypes.c_uint32),
        ("n_checked", ctypes.c_uint32),
    ]


class _BundleInfo(ctypes.Structure):
    _fields_ = [
        ("n_edits", ctypes.c_uint32),
        ("version", ctypes.c_uint64),
        ("size_bytes", ctypes.c_uint64),
        ("not_before", ctypes.c_uint64),
        ("expires", ctypes.c_uint64),
    ]


_TOKEN_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_int32,
                             ctypes.POINTER(ctypes.c_char), ctypes.c_size_t)
_EXPLAIN_CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.POINTER(_EditActivity))

_P = ctypes.c_void_p
_RES = ctypes.c_int
_SIGNATURES = {
    "amend_version": (ctypes.c_char_p, []),
    "amend_abi_version": (ctypes.c_uint32, []),
    "amend_result_name": (ctypes.c_char_p, [ctypes.c_int32]),
    "amend_last_error_code": (_RES, []),
    "amend_last_error": (ctypes.c_char_p, []),
    "amend_live_handles": (ctypes.c_size_t, []),
    # Streaming verification (caller-owned state of AMEND_VERIFY_STREAM_STATE_SIZE bytes).
    "amend_verify_stream_init": (_RES, [_P, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]),
    "amend_verify_stream_update": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t]),
    "amend_verify_stream_finish": (_RES, [_P]),
    "amend_model_default_params": (_ModelParams, []),
    "amend_model_open": (_RES, [ctypes.c_char_p, ctypes.POINTER(_ModelParams), ctypes.POINTER(_P)]),
    "amend_model_free": (None, [_P]),
    "amend_model_get_info": (_RES, [_P, ctypes.POINTER(_ModelInfo)]),
    "amend_model_description": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_trust_store_new": (_RES, [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_P)]),
    "amend_trust_store_free": (None, [_P]),
    "amend_bundle_load_file": (_RES, [_P, _P, ctypes.c_char_p, ctypes.POINTER(_P)]),
    "amend_bundle_load_memory": (_RES, [_P, _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_P)]),
    "amend_bundle_load_file_bytes": (_RES, [_P, _P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_P)]),
    "amend_bundle_free": (None, [_P]),
    "amend_bundle_get_info": (_RES, [_P, ctypes.POINTER(_BundleInfo)]),
    "amend_bundle_channel": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_bundle_id": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_bundle_edit_id": (_RES, [_P, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_session_default_params": (_SessionParams, []),
    "amend_generate_default_params": (_GenerateParams, []),
    "amend_session_open": (_RES, [_P, ctypes.POINTER(_SessionParams), ctypes.POINTER(_P)]),
    "amend_session_free": (None, [_P]),
    "amend_session_activate": (_RES, [_P, _P]),
    "amend_session_set_state_file": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t]),
    "amend_session_rollback_bundle": (_RES, [_P, ctypes.c_char_p]),
    "amend_session_rollback_edit": (_RES, [_P, ctypes.c_char_p]),
    "amend_session_set_lora_scale": (_RES, [_P, ctypes.c_char_p, ctypes.c_float]),
    "amend_session_active_bundle_count": (_RES, [_P, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_session_active_bundle_id": (_RES, [_P, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "amend_session_generate": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_GenerateParams), _TOKEN_CB, _P, ctypes.POINTER(_Generation)]),
    "amend_session_cancel": (_RES, [_P]),
    "amend_session_score": (_RES, [_P, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Score)]),
    "amend_session_explain": (_RES, [_P, _EXPLAIN_CB, _P]),
    "amend_scope_model_open": (_RES, [ctypes.c_char_p, ctypes.c_uint32, ctypes.POINTER(_P)]),
    "amend_scope_model_open_bytes": (_RES, [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.POINTER(_P)]),
    "amend_scope_model_free": (None, [_P]),
    "amend_session_set_scope_model": (_RES, [_P, _P]),
}


def _find_library() -> str:
    env = os.environ.get("AMEND_LIBRARY")
    if env:
        return env
    here = Path(__file__).resolve().parent
    for name in ("libamend.so", "libamend.dylib", "amend.dll"):
        if (here / name).exists():
            return str(here / name)
    found = ctypes.util.find_library("amend")
    if found:
        return found
    raise OSError(
        "libamend not found: set AMEND_LIBRARY to the path of libamend.so "
        "(cargo build --release -p amend-ffi), or install it where the linker finds it"
    )


_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def library() -> ctypes.CDLL:
    """The loaded C library (loaded on first use; signatures declared)."""
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(_find_library())
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype = restype
                fn.argtypes = argtypes
            if lib.amend_abi_version() != ABI_VERSION:
                raise OSError(
                    f"libamend ABI {lib.amend_abi_version()} does not match these bindings ({ABI_VERSION})"
                )
            _lib = lib
        return _lib


def _check(code: int) -> None:
    if code != Result.OK:
        msg = library().amend_last_error().decode("utf-8", "replace")
        raise AmendError(code, msg)


def _string_out(fn, *args) -> str:
    """Calls an amend (buf, buf_len, out_len) accessor: size query, then copy."""
    n = ctypes.c_size_t(0)
    code = fn(*args, None, 0, ctypes.byref(n))
    if code not in (Result.OK, Result.ERR_BUFFER_TOO_SMALL):
        _check(code)
    buf = ctypes.create_string_buffer(n.value + 1)
    _check(fn(*args, buf, len(buf), None))
    return buf.value.decode("utf-8")


def _text(s, what: str) -> bytes:
    # bytes pass through unchanged so callers can test amend's own UTF-8 validation.
    if isinstance(s, bytes):
        return s
    if isinstance(s, str):
        return s.encode("utf-8")
    raise TypeError(f"{what} must be str or bytes, not {type(s).__name__}")


def _cstr(b: bytes, what: str) -> bytes:
    """`b` for a NUL-terminated C parameter: C would stop at an embedded NUL and act on a
    different path or id, so it is refused as amend's `_bytes` functions refuse it."""
    at = b.find(b"\0")
    if at >= 0:
        raise AmendError(Result.ERR_INVALID_ARGUMENT, f"{what} contains a NUL byte (at byte {at})")
    return b


def _path(p, what: str = "path") -> bytes:
    return _cstr(os.fsencode(p), what)


def _uint(v, what: str, bits: int = 32) -> int:
    """An integer parameter checked against its C type: ctypes would silently wrap -1 to
    UINT32_MAX (max_tokens: generate until the context is full) and 2**32 to 0."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    if not 0 <= v < (1 << bits):
        raise ValueError(f"{what} {v} is outside 0..={(1 << bits) - 1}")
    return v


def version() -> str:
    return library().amend_version().decode()


def abi_version() -> int:
    return library().amend_abi_version()


def live_handles() -> int:
    """Handles opened and not yet freed (leak checks)."""
    return library().amend_live_handles()


class _Handle:
    _free_name = ""

    def __init__(self, ptr: int):
        self._ptr = ptr
        self._closed = False

    @property
    def _as_parameter_(self):
        # After close() the stale handle is still passed: amend never reuses handle values,
        # so the library itself reports ERR_INVALID_HANDLE with its message.
        return ctypes.c_void_p(self._ptr)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Frees the C handle (idempotent)."""
        if not self._closed and self._ptr:
            self._closed = True
            getattr(library(), self._free_name)(ctypes.c_void_p(self._ptr))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class ModelInfo:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_vocab: int
    n_ctx_train: int
    bos: int
    eos: int
    n_params: int
    size_bytes: int


class Model(_Handle):
    """A loaded GGUF model; share it between threads and sessions."""

    _free_name = "amend_model_free"

    def __init__(self, path, use_mmap: bool = True, n_threads: int = 0,
                 backend: str = "llama.cpp", ep: str = "cpu", ort_library=None,
                 edit_slots: str = "", cpu_fallback: bool = False, static_shapes=None,
                 ep_options=None, private_copy: bool = True):
        """`backend` "onnxruntime" runs the model on ONNX Runtime's execution provider `ep`
        with the edit slots `edit_slots` (see docs/backends.md); `static_shapes=(chunk,
        window)` fixes every shape, as QNN needs (sessions' n_ctx at most `window`);
        `ep_options`, a dict, goes to the EP as it is (e.g. {"backend_path": "libQnnHtp.so"});
        `private_copy` (llama.cpp, Linux) runs from a sealed in-memory copy of the file, which
        another process cannot change (docs/security.md); False maps the file itself."""
        lib = library()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        params = lib.amend_model_default_params()
        params.use_mmap = use_mmap
        params.n_threads = _uint(n_threads, "n_threads")
        params.backend = BACKENDS[backend]
        # The strings are borrowed for the call: these locals keep them alive until it returns.
        ep_b, slots_b = _cstr(ep.encode(), "ep"), _cstr(edit_slots.encode(), "edit_slots")
        lib_b = _path(ort_library, "ort_library") if ort_library is not None else None
        params.ep, params.edit_slots, params.ort_library = ep_b, slots_b, lib_b
        params.cpu_fallback = cpu_fallback
        params.private_copy = private_copy
        options_b = None
        if ep_options:
            lines = []
            for k, v in ep_options.items():
                k, v = str(k), str(v)
                if "\n" in k + v or "=" in k or not k:
                    raise ValueError(f"ep_options: bad option {k!r}={v!r}")
                lines.append(f"{k}={v}")
            options_b = _cstr("\n".join(lines).encode(), "ep_options")
        params.ep_options = options_b
        if static_shapes is not None:
            chunk, window = static_shapes
            bits = 8 * ctypes.sizeof(ctypes.c_size_t)
            params.static_chunk = _uint(chunk, "static_shapes chunk", bits)
            params.static_window = _uint(window, "static_shapes window", bits)
        raw = _path(path)
        out = ctypes.c_void_p()
        _check(lib.amend_model_open(raw, ctypes.byref(params), ctypes.byref(out)))
        super().__init__(out.value)

    @property
    def info(self) -> ModelInfo:
        i = _ModelInfo()
        _check(library().amend_model_get_info(self, ctypes.byref(i)))
        return ModelInfo(*(getattr(i, f) for f, _ in _ModelInfo._fields_))

    @property
    def description(self) -> str:
        return _string_out(library().amend_model_description, self)


class TrustStore(_Handle):
    """The ed25519 public keys (32 bytes each) that bundles must be signed by."""

    _free_name = "amend_trust_store_free"

    def __init__(self, keys: Sequence[bytes]):
        keys = [bytes(k) for k in keys]
        for k in keys:
            if len(k) != PUBLIC_KEY_LEN:
                raise ValueError(f"public keys are {PUBLIC_KEY_LEN} bytes, got {len(k)}")
        blob = b"".join(keys)
        out = ctypes.c_void_p()
        _check(library().amend_trust_store_new(blob or None, len(keys), ctypes.byref(out)))
        super().__init__(out.value)


class Bundle(_Handle):
    """A verified patch bundle (signature checked, built for the model)."""

    _free_name = "amend_bundle_free"

    @classmethod
    def load_file(cls, trust: TrustStore, model: Model, path) -> "Bundle":
        # The path's exact bytes (any path the OS accepts; a NUL is refused, not cut at).
        raw = os.fsencode(path)
        out = ctypes.c_void_p()
        _check(library().amend_bundle_load_file_bytes(trust, model, raw, len(raw), ctypes.byref(out)))
        return cls(out.value)

    @classmethod
    def load_bytes(cls, trust: TrustStore, model: Model, data: bytes) -> "Bundle":
        data = bytes(data)
        out = ctypes.c_void_p()
        _check(library().amend_bundle_load_memory(trust, model, data, len(data), ctypes.byref(out)))
        return cls(out.value)

    @property
    def id(self) -> str:
        return _string_out(library().amend_bundle_id, self)

    @property
    def channel(self) -> str:
        return _string_out(library().amend_bundle_channel, self)

    @property
    def version(self) -> int:
        i = _BundleInfo()
        _check(library().amend_bundle_get_info(self, ctypes.byref(i)))
        return i.version

    @property
    def n_edits(self) -> int:
        i = _BundleInfo()
        _check(library().amend_bundle_get_info(self, ctypes.byref(i)))
        return i.n_edits

    @property
    def edit_ids(self) -> List[str]:
        lib = library()
        return [_string_out(lib.amend_bundle_edit_id, self, i) for i in range(self.n_edits)]


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: List[int]
    n_prompt_tokens: int
    stop_reason: StopReason
    prefill_tok_s: float
    decode_tok_s: float


@dataclass(frozen=True)
class Score:
    n_target_tokens: int
    logprob_sum: float
    logprob_mean: float
    n_argmax_match: int


@dataclass(frozen=True)
class EditActivity:
    bundle_id: str
    edit_id: str
    family: str
    layer: int
    n_fired: int
    n_checked: int


class ScopeModel(_Handle):
    """The scope model that routes retrieval memories: a `bert` GGUF such as
    ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf (scripts/fetch-scope-model.sh). Open it once and
    give it to every session that activates serac bundles (Session.set_scope_model); sessions
    keep it alive, so it may be closed while they are open. Thread-safe.

    A file that is missing, not a regular file, corrupt or not a `bert` encoder raises
    AmendError with ERR_SCOPE_MODEL. `n_threads`: encoder threads, at most 512; 0 = one (docs/runtime.md, Threading).
    """

    _free_name = "amend_scope_model_free"

    def __init__(self, path, n_threads: int = 0):
        raw = os.fsencode(path)  # bytes: any path the OS accepts, UTF-8 or not
        n_threads = _uint(n_threads, "n_threads")
        out = ctypes.c_void_p()
        _check(library().amend_scope_model_open_bytes(raw, len(raw), n_threads, ctypes.byref(out)))
        super().__init__(out.value)


class Session(_Handle):
    """A context window plus active edits. One thread at a time; cancel() from any thread."""

    _free_name = "amend_session_free"

    def __init__(self, model: Model, n_ctx: int = 0, n_threads: int = 0):
        lib = library()
        params = lib.amend_session_default_params()
        if _uint(n_ctx, "n_ctx"):
            params.n_ctx = n_ctx
        params.n_threads = _uint(n_threads, "n_threads")
        out = ctypes.c_void_p()
        _check(lib.amend_session_open(model, ctypes.byref(params), ctypes.byref(out)))
        super().__init__(out.value)
        self._model = model  # keeps the Python object alive for users' convenience

    @staticmethod
    def _params(max_tokens, temperature, seed, top_k, top_p, min_p, stop_at_eos) -> _GenerateParams:
        p = library().amend_generate_default_params()
        if max_tokens is not None:
            p.max_tokens = _uint(max_tokens, "max_tokens")
        if temperature is not None:
            p.temperature = temperature
        if seed is not None:
            p.seed = _uint(seed, "seed")
        if top_k is not None:
            p.top_k = _uint(top_k, "top_k")
        if top_p is not None:
            p.top_p = top_p
        if min_p is not None:
            p.min_p = min_p
        if stop_at_eos is not None:
            p.stop_at_eos = stop_at_eos
        return p

    def generate(
        self,
        prompt,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        seed: Optional[int] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        stop_at_eos: Optional[bool] = None,
        on_token: Optional[Callable[[int, str], bool]] = None,
    ) -> Generation:
        """Generates a continuation. `on_token(token_id, text)` may return False to stop.
        Unset parameters take amend's defaults (the Rust API's). Raises AmendError with
        ERR_CANCELLED when cancel() stopped it."""
        data = _text(prompt, "prompt")
        params = self._params(max_tokens, temperature, seed, top_k, top_p, min_p, stop_at_eos)
        tokens: List[int] = []
        pieces: List[bytes] = []
        error: List[BaseException] = []

        def cb(_ud, token, text, text_len):
            chunk = ctypes.string_at(text, text_len)
            pieces.append(chunk)
            if token == FLUSH_TOKEN:
                return True
            tokens.append(token)
            if on_token is None:
                return True
            try:
                return on_token(token, chunk.decode("utf-8")) is not False
            except BaseException as e:  # never unwind through C: stop and re-raise after
                error.append(e)
                return False

        c_cb = _TOKEN_CB(cb)  # kept referenced for the duration of the call
        g = _Generation()
        code = library().amend_session_generate(
            self, data, len(data), ctypes.byref(params), c_cb, None, ctypes.byref(g))
        if error:
            raise error[0]
        _check(code)
        return Generation(
            text=b"".join(pieces).decode("utf-8"),
            tokens=tokens,
            n_prompt_tokens=g.n_prompt_tokens,
            stop_reason=StopReason(g.stop_reason),
            prefill_tok_s=g.prefill_tok_s,
            decode_tok_s=g.decode_tok_s,
        )

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Yields text pieces as they are generated (generation runs on a worker thread;
        closing the iterator early stops it at its next token)."""
        q: "queue.Queue" = queue.Queue()
        done = object()
        # Not cancel(): a cancel that arrives after the generation ended is kept and would
        # stop this session's next generation (ERR_CANCELLED).
        stop = threading.Event()

        def on_token(_t, s):
            q.put(s)
            return not stop.is_set()

        def run():
            try:
                self.generate(prompt, on_token=on_token, **kwargs)
                q.put(done)
            except BaseException as e:
                q.put(e)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        finished = False
        try:
            while True:
                item = q.get()
                if item is done:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item:
                    yield item
        finally:
            if not finished:
                stop.set()
            worker.join()

    def cancel(self) -> None:
        """Stops the running generation within one token; callable from any thread."""
        _check(library().amend_session_cancel(self))

    def score(self, prompt, target) -> Score:
        """Teacher-forced log-probability of `target` after `prompt`, with the active edits."""
        p, t = _text(prompt, "prompt"), _text(target, "target")
        s = _Score()
        _check(library().amend_session_score(self, p, len(p), t, len(t), ctypes.byref(s)))
        return Score(s.n_target_tokens, s.logprob_sum, s.logprob_mean, s.n_argmax_match)

    def activate(self, bundle: Bundle) -> None:
        """Raises ERR_SCOPE_MODEL / ERR_SCOPE_MODEL_MISMATCH for a bundle whose memories need a
        scope model the session lacks / has another one of; nothing of it is applied then."""
        _check(library().amend_session_activate(self, bundle))

    def set_scope_model(self, scope: Optional[ScopeModel]) -> None:
        """The scope model this session's bundles route their memories with (None: none). Set it
        before activating such a bundle. Refused (ERR_SCOPE_MODEL / ERR_SCOPE_MODEL_MISMATCH)
        while an active bundle needs the current one."""
        _check(library().amend_session_set_scope_model(self, scope))

    def rollback_bundle(self, bundle_id: str) -> None:
        raw = _cstr(_text(bundle_id, "bundle_id"), "bundle_id")
        _check(library().amend_session_rollback_bundle(self, raw))

    def set_lora_scale(self, bundle_id: str, scale: float) -> None:
        """Scales the low-rank adapters of active bundle `bundle_id` from the next request on:
        1 as compiled, 0 disables them, negative subtracts them. Raises ERR_INVALID_ARGUMENT for
        a NaN, infinite or |scale| > 100 and ERR_NOT_FOUND for an id no active bundle has; the
        scale in use is then unchanged."""
        raw = _cstr(_text(bundle_id, "bundle_id"), "bundle_id")
        # ctypes would take a bool as 1.0; a str would fail with an unhelpful ArgumentError.
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float, not {type(scale).__name__}")
        _check(library().amend_session_set_lora_scale(self, raw, float(scale)))

    def rollback_edit(self, edit_id: str) -> None:
        raw = _cstr(_text(edit_id, "edit_id"), "edit_id")
        _check(library().amend_session_rollback_edit(self, raw))

    @property
    def active_bundles(self) -> List[str]:
        lib = library()
        n = ctypes.c_size_t()
        _check(lib.amend_session_active_bundle_count(self, ctypes.byref(n)))
        return [_string_out(lib.amend_session_active_bundle_id, self, i) for i in range(n.value)]

    def explain(self) -> List[EditActivity]:
        """Which active edits fired during the last generation or scoring."""
        out: List[EditActivity] = []

        def cb(_ud, a):
            a = a.contents
            out.append(EditActivity(a.bundle_id.decode(), a.edit_id.decode(), a.family.decode(),
                                    a.layer, a.n_fired, a.n_checked))
            return True

        _check(library().amend_session_explain(self, _EXPLAIN_CB(cb), None))
        return out
