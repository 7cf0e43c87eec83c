package dev.amend;

/**
 * The JNI layer (bindings/java/native/amend_jni.c over libamend). Handles are the C pointers
 * as longs; every method throws {@link AmendException} on failure.
 */
final class Native {
    private Native() {}

    static {
        String path = System.getProperty("amend.jni.library");
        if (path != null && !path.isEmpty()) {
            System.load(path);
        } else {
            System.loadLibrary("amend_jni");
        }
    }

    /** Receives tokens from amend_session_generate; returns false to stop. */
    interface TokenSink {
        boolean onToken(int token, byte[] utf8);
    }

    static native String version();
    static native int abiVersion();
    static native String resultName(int code);
    static native long liveHandles();

    /** ep, ortLibrary, editSlots, epOptions: UTF-8 or null (amend_model_params' NULL defaults). */
    static native long modelOpen(byte[] pathUtf8, boolean useMmap, int nThreads, int backend,
                                 byte[] ep, byte[] ortLibrary, byte[] editSlots, boolean cpuFallback,
                                 long staticChunk, long staticWindow, byte[] epOptions,
                                 boolean privateCopy);
    static native void modelFree(long model);
    static native String modelDescription(long model);

    /** Through amend_scope_model_open_bytes: the path's exact bytes. */
    static native long scopeModelOpen(byte[] path, int nThreads);
    static native void scopeModelFree(long scope);
    /** scope == 0: none. */
    static native void sessionSetScopeModel(long session, long scope);
    /** n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx_train, bos, eos. */
    static native int[] modelInfo(long model);

    static native long trustStoreNew(byte[] keys, int nKeys);
    static native void trustStoreFree(long trust);

    static native long bundleLoadFile(long trust, long model, byte[] pathUtf8);
    static native long bundleLoadMemory(long trust, long model, byte[] data);
    static native void bundleFree(long bundle);
    static native String bundleId(long bundle);
    static native int bundleEditCount(long bundle);
    static native String bundleEditId(long bundle, int index);

    static native long sessionOpen(long model, int nCtx, int nThreads);
    static native void sessionFree(long session);
    static native void sessionActivate(long session, long bundle);
    static native void sessionRollbackBundle(long session, byte[] idUtf8);
    static native void sessionRollbackEdit(long session, byte[] idUtf8);
    static native void sessionSetLoraScale(long session, byte[] idUtf8, float scale);
    static native String[] sessionActiveBundles(long session);
    static native EditActivity[] sessionExplain(long session);
    /** Returns n_prompt_tokens, n_generated, stop_reason. */
    static native int[] sessionGenerate(long session, byte[] promptUtf8, int maxTokens, float temperature,
            int topK, float topP, float minP, int seed, boolean stopAtEos, TokenSink sink);
    static native void sessionCancel(long session);
    /** Returns n_target_tokens, logprob_sum, logprob_mean, n_argmax_match. */
    static native double[] sessionScore(long session, byte[] promptUtf8, byte[] targetUtf8);
}
