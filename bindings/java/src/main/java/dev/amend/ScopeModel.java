package dev.amend;

import java.nio.charset.StandardCharsets;

/**
 * The scope model that routes retrieval memories: a {@code bert} GGUF such as
 * ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf (scripts/fetch-scope-model.sh). Open it once and
 * give it to every session that activates serac bundles ({@link Session#setScopeModel});
 * sessions keep it alive, so it may be closed while they are open. Thread-safe.
 *
 * <p>A file that is missing, not a regular file, corrupt or not a {@code bert} encoder throws
 * {@link AmendException} with {@link Result#ERR_SCOPE_MODEL}.
 */
public final class ScopeModel implements AutoCloseable {
    final long handle;
    private boolean closed;

    public ScopeModel(String path) { this(path, 0); }

    /** @param nThreads encoder threads, at most 512; 0 = one (docs/runtime.md, Threading) */
    public ScopeModel(String path, int nThreads) {
        this(path.getBytes(StandardCharsets.UTF_8), nThreads);
    }

    /** With the path as raw bytes (on unix any bytes but NUL, UTF-8 or not). */
    public ScopeModel(byte[] path, int nThreads) {
        handle = Native.scopeModelOpen(path, nThreads);
    }

    /** Frees the handle; sessions that were given it keep the model alive. Idempotent. */
    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.scopeModelFree(handle); }
    }
}
