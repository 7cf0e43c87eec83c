package dev.amend;

/** amend_result codes (include/amend.h). */
public final class Result {
    private Result() {}
    public static final int OK = 0;
    public static final int ERR_NULL_ARGUMENT = 100;
    public static final int ERR_INVALID_HANDLE = 101;
    public static final int ERR_INVALID_ARGUMENT = 102;
    public static final int ERR_INVALID_UTF8 = 103;
    public static final int ERR_BUFFER_TOO_SMALL = 104;
    public static final int ERR_BUSY = 105;
    public static final int ERR_NOT_SUPPORTED = 106;
    public static final int ERR_PANIC = 107;
    public static final int ERR_IO = 108;
    public static final int ERR_STATE_SIZE = 109;
    public static final int ERR_MODEL_LOAD = 200;
    public static final int ERR_CONTEXT = 201;
    public static final int ERR_TOKENIZE = 202;
    public static final int ERR_CONTEXT_FULL = 203;
    public static final int ERR_DECODE = 204;
    public static final int ERR_CANCELLED = 205;
    public static final int ERR_BUNDLE_FORMAT = 300;
    public static final int ERR_BUNDLE_VERSION = 301;
    public static final int ERR_BUNDLE_INTEGRITY = 302;
    public static final int ERR_SIGNATURE = 303;
    public static final int ERR_UNTRUSTED_KEY = 304;
    public static final int ERR_MODEL_MISMATCH = 305;
    public static final int ERR_EDIT_INVALID = 306;
    public static final int ERR_EDIT_CONFLICT = 307;
    public static final int ERR_NOT_FOUND = 308;
    public static final int ERR_INVALID_KEY = 309;
    public static final int ERR_BUNDLE_EXPIRED = 310;
    public static final int ERR_BUNDLE_DOWNGRADE = 311;
    public static final int ERR_BUNDLE_TRUNCATED = 312;
    public static final int ERR_BUNDLE_TOO_LONG = 313;
    public static final int ERR_SCOPE_MODEL = 314;
    public static final int ERR_SCOPE_MODEL_MISMATCH = 315;
    public static final int ERR_BUNDLE_UNVERIFIED = 316;
}
