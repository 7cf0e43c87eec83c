package dev.amend;

import java.nio.charset.StandardCharsets;

/**
 * The scope model retrieval memories route with (a {@code bert} GGUF such as
 * ~/.cache/amend/all-minilm-l6-v2-q8_0.gguf). Open it once and give it to every session with
 * {@link Session#setScopeModel}. Thread-safe.
 */
public final class ScopeModel implements AutoCloseable {
    final long handle;

    public ScopeModel(String path) { this(path, 0); }

    /** @param nThreads threads for the encoder; 0 = available parallelism */
    public ScopeModel(String path, int nThreads) {
        handle = Native.scopeModelOpen(path.getBytes(StandardCharsets.UTF_8), nThreads);
    }

    /** Frees the handle; sessions that were given it keep it alive. Idempotent. */
    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.scopeModelFree(handle); }
    }

    private boolean closed;
}
