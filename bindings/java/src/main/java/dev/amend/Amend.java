package dev.amend;

/** Library-level facts. */
public final class Amend {
    private Amend() {}
    public static String version() { return Native.version(); }
    public static int abiVersion() { return Native.abiVersion(); }
    /** Handles opened and not yet closed (leak checks). */
    public static long liveHandles() { return Native.liveHandles(); }
}
