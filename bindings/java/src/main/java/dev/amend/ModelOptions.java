package dev.amend;

/**
 * How to open a {@link Model} (amend_model_params): the backend (llama.cpp, or ONNX Runtime on an
 * execution provider) and its options. Setters return this, for chaining.
 */
public final class ModelOptions {
    /** AMEND_BACKEND_LLAMA_CPP: llama.cpp on the CPU (the default). */
    public static final int BACKEND_LLAMA_CPP = 0;
    /** AMEND_BACKEND_ONNXRUNTIME: ONNX Runtime on {@link #ep}. */
    public static final int BACKEND_ONNXRUNTIME = 1;

    boolean useMmap = true;
    boolean privateCopy = true;
    int nThreads;
    int backend = BACKEND_LLAMA_CPP;
    String ep, ortLibrary, editSlots;
    boolean cpuFallback;
    long staticChunk, staticWindow;
    /** KEY=VALUE lines (amend_model_params.ep_options), or null. */
    String epOptions;

    /** Memory-map the weights (llama.cpp; default true). */
    public ModelOptions useMmap(boolean v) { useMmap = v; return this; }
    /**
     * Run from a private, sealed in-memory copy of the file (llama.cpp on Linux; default true): a
     * process that rewrites or truncates the model file after open changes nothing this model
     * computes. False: llama.cpp maps the file itself.
     */
    public ModelOptions privateCopy(boolean v) { privateCopy = v; return this; }
    /** Default threads for sessions (ONNX Runtime: intra-op threads); 0 = the default. */
    public ModelOptions nThreads(int v) { nThreads = v; return this; }
    /** {@link #BACKEND_LLAMA_CPP} or {@link #BACKEND_ONNXRUNTIME}; other values: ERR_INVALID_ARGUMENT. */
    public ModelOptions backend(int v) { backend = v; return this; }
    /** ONNX Runtime's execution provider: "cpu" (null), "openvino[:CPU|GPU|NPU]", "qnn", ... */
    public ModelOptions ep(String v) { ep = v; return this; }
    /** The ONNX Runtime library (null: $AMEND_ORT_LIB, else what scripts/fetch-ort.sh installed). */
    public ModelOptions ortLibrary(String v) { ortLibrary = v; return this; }
    /** The graph's edit slots, e.g. "cb:12:ffn_input:ffn_output" (docs/backends.md); null: none. */
    public ModelOptions editSlots(String v) { editSlots = v; return this; }
    /** Let nodes the EP does not take run on the CPU EP (default false: such a graph is an error). */
    public ModelOptions cpuFallback(boolean v) { cpuFallback = v; return this; }
    /**
     * Fixed shapes on ONNX Runtime, as QNN needs: a prefill graph of {@code chunk} tokens and a
     * one-token decode graph over a KV window of {@code window} positions (sessions' n_ctx at most
     * {@code window}); (0, 0), the default, is dynamic shapes.
     */
    public ModelOptions staticShapes(long chunk, long window) { staticChunk = chunk; staticWindow = window; return this; }
    /**
     * An option for the execution provider, given to it as it is (repeatable), e.g.
     * {@code epOption("backend_path", "libQnnHtp.so")} for QNN's NPU backend. A key with '=' or
     * a newline anywhere: IllegalArgumentException.
     */
    public ModelOptions epOption(String key, String value) {
        if (key.isEmpty() || key.contains("=") || (key + value).contains("\n"))
            throw new IllegalArgumentException("epOption: bad option " + key + "=" + value);
        epOptions = (epOptions == null ? "" : epOptions + "\n") + key + "=" + value;
        return this;
    }
}
