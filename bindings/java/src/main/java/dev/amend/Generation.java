package dev.amend;

import java.util.Collections;
import java.util.List;

/** The result of {@link Session#generate}. */
public final class Generation {
    public static final int STOP_MAX_TOKENS = 0, STOP_EOS = 1, STOP_CALLBACK = 2, STOP_CONTEXT_FULL = 3, STOP_CANCELLED = 4;
    public final String text;
    public final List<Integer> tokens;
    public final int nPromptTokens;
    public final int stopReason;

    Generation(String text, List<Integer> tokens, int nPromptTokens, int stopReason) {
        this.text = text;
        this.tokens = Collections.unmodifiableList(tokens);
        this.nPromptTokens = nPromptTokens;
        this.stopReason = stopReason;
    }
}
