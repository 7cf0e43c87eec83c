package dev.amend;

import java.nio.charset.StandardCharsets;

/** A loaded GGUF model. Thread-safe: share one between threads and sessions. */
public final class Model implements AutoCloseable {
    final long handle;

    public Model(String path) { this(path, true, 0); }

    /** @param nThreads default threads for sessions; 0 = available parallelism */
    public Model(String path, boolean useMmap, int nThreads) {
        this(path, new ModelOptions().useMmap(useMmap).nThreads(nThreads));
    }

    /** Opens on the backend {@code options} names (llama.cpp, or ONNX Runtime on an EP). */
    public Model(String path, ModelOptions options) {
        handle = Native.modelOpen(utf8(path), options.useMmap, options.nThreads, options.backend,
                utf8(options.ep), utf8(options.ortLibrary), utf8(options.editSlots), options.cpuFallback,
                options.staticChunk, options.staticWindow, utf8(options.epOptions), options.privateCopy);
    }

    private static byte[] utf8(String s) { return s == null ? null : s.getBytes(StandardCharsets.UTF_8); }

    /** llama.cpp's description, e.g. "gemma3 270M Q4_K - Medium". */
    public String description() { return Native.modelDescription(handle); }

    public int nLayer() { return Native.modelInfo(handle)[0]; }
    public int nEmbd() { return Native.modelInfo(handle)[1]; }
    public int nVocab() { return Native.modelInfo(handle)[5]; }

    /**
     * Frees the model; open sessions keep the weights alive. Idempotent. The stale handle is
     * kept: amend never reuses handles, so use after close is reported as ERR_INVALID_HANDLE
     * by the library itself.
     */
    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.modelFree(handle); }
    }

    private boolean closed;
}
