package dev.amend;

/** The ed25519 public keys (32 bytes each) that bundles must be signed by. Thread-safe. */
public final class TrustStore implements AutoCloseable {
    public static final int PUBLIC_KEY_LEN = 32;
    final long handle;
    private boolean closed;

    public TrustStore(byte[]... keys) {
        byte[] all = new byte[keys.length * PUBLIC_KEY_LEN];
        for (int i = 0; i < keys.length; i++) {
            if (keys[i].length != PUBLIC_KEY_LEN) {
                throw new IllegalArgumentException("public keys are 32 bytes, key " + i + " has " + keys[i].length);
            }
            System.arraycopy(keys[i], 0, all, i * PUBLIC_KEY_LEN, PUBLIC_KEY_LEN);
        }
        handle = Native.trustStoreNew(all, keys.length);
    }

    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.trustStoreFree(handle); }
    }
}
