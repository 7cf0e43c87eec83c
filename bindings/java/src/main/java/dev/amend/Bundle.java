package dev.amend;

import java.nio.charset.StandardCharsets;

/** A verified patch bundle (signature checked against a trust store, built for the model). */
public final class Bundle implements AutoCloseable {
    final long handle;
    private boolean closed;

    private Bundle(long handle) { this.handle = handle; }

    public static Bundle loadFile(TrustStore trust, Model model, String path) {
        return new Bundle(Native.bundleLoadFile(trust.handle, model.handle, path.getBytes(StandardCharsets.UTF_8)));
    }

    /** The bytes are copied. */
    public static Bundle loadBytes(TrustStore trust, Model model, byte[] data) {
        return new Bundle(Native.bundleLoadMemory(trust.handle, model.handle, data));
    }

    public String id() { return Native.bundleId(handle); }
    public int editCount() { return Native.bundleEditCount(handle); }
    public String editId(int index) { return Native.bundleEditId(handle, index); }

    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.bundleFree(handle); }
    }
}
