package dev.amend;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * A context window plus active edits. Use from one thread at a time (a concurrent call fails
 * with ERR_BUSY); {@link #cancel()} may be called from any thread.
 */
public final class Session implements AutoCloseable {
    final long handle;
    private boolean closed;

    public Session(Model model) { this(model, 0, 0); }

    /** @param nCtx context window in tokens, 0 = default (2048) */
    public Session(Model model, int nCtx, int nThreads) {
        handle = Native.sessionOpen(model.handle, nCtx, nThreads);
    }

    public Generation generate(String prompt, GenerateOptions options) {
        return generate(prompt.getBytes(StandardCharsets.UTF_8), options, null);
    }

    public Generation generate(String prompt, GenerateOptions options, TokenListener listener) {
        return generate(prompt.getBytes(StandardCharsets.UTF_8), options, listener);
    }

    /** With the prompt as UTF-8 bytes (invalid UTF-8 gives ERR_INVALID_UTF8). */
    public Generation generate(byte[] promptUtf8, GenerateOptions options, TokenListener listener) {
        ByteArrayOutputStream text = new ByteArrayOutputStream();
        List<Integer> tokens = new ArrayList<>();
        Native.TokenSink sink = (token, utf8) -> {
            text.write(utf8, 0, utf8.length);
            if (token == -1) return true; // flush of held-back text
            tokens.add(token);
            return listener == null || listener.onToken(token, new String(utf8, StandardCharsets.UTF_8));
        };
        GenerateOptions o = options == null ? new GenerateOptions() : options;
        int[] r = Native.sessionGenerate(handle, promptUtf8, o.maxTokens, o.temperature, o.topK, o.topP, o.minP,
                o.seed, o.stopAtEos, sink);
        return new Generation(new String(text.toByteArray(), StandardCharsets.UTF_8), tokens, r[0], r[2]);
    }

    /** Stops the running generation within one token; callable from any thread. */
    public void cancel() { Native.sessionCancel(handle); }

    public Score score(String prompt, String target) {
        return new Score(Native.sessionScore(handle, prompt.getBytes(StandardCharsets.UTF_8), target.getBytes(StandardCharsets.UTF_8)));
    }

    /**
     * Throws ERR_SCOPE_MODEL / ERR_SCOPE_MODEL_MISMATCH for a bundle whose memories need a scope
     * model this session lacks / has another one of; nothing of it is applied then.
     */
    public void activate(Bundle bundle) { Native.sessionActivate(handle, bundle.handle); }

    /**
     * The scope model this session's bundles route their memories with (null: none). Set it
     * before activating such a bundle. The session keeps the model alive, so {@code scope} may be
     * closed afterwards. Refused (ERR_SCOPE_MODEL / ERR_SCOPE_MODEL_MISMATCH) while an active
     * bundle needs the current one.
     */
    public void setScopeModel(ScopeModel scope) {
        Native.sessionSetScopeModel(handle, scope == null ? 0L : scope.handle);
    }
    public void rollbackBundle(String bundleId) { Native.sessionRollbackBundle(handle, bundleId.getBytes(StandardCharsets.UTF_8)); }
    public void rollbackEdit(String editId) { Native.sessionRollbackEdit(handle, editId.getBytes(StandardCharsets.UTF_8)); }
    /**
     * Scales the low-rank adapters of active bundle {@code bundleId} from the next request on: 1 as
     * compiled, 0 disables them, negative subtracts them. Throws {@link AmendException} with
     * {@link Result#ERR_INVALID_ARGUMENT} for a NaN, infinite or |scale| &gt; 100 and
     * {@link Result#ERR_NOT_FOUND} for an id no active bundle has; the scale in use is then unchanged.
     */
    public void setLoraScale(String bundleId, float scale) {
        Native.sessionSetLoraScale(handle, bundleId.getBytes(StandardCharsets.UTF_8), scale);
    }
    public List<String> activeBundles() { return Arrays.asList(Native.sessionActiveBundles(handle)); }

    /** What the active edits did during the last generation or scoring. */
    public List<EditActivity> explain() { return Arrays.asList(Native.sessionExplain(handle)); }

    @Override public synchronized void close() {
        if (!closed) { closed = true; Native.sessionFree(handle); }
    }
}
