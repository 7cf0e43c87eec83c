package dev.amend;

/** Generation parameters; the defaults are the Rust API's (greedy, 128 tokens). */
public final class GenerateOptions {
    public int maxTokens = 128;
    public float temperature = 0f;
    public int topK = 40;
    public float topP = 0.95f;
    public float minP = 0.05f;
    public int seed = 0;
    public boolean stopAtEos = true;

    public GenerateOptions maxTokens(int v) { maxTokens = v; return this; }
    public GenerateOptions temperature(float v) { temperature = v; return this; }
    public GenerateOptions topK(int v) { topK = v; return this; }
    public GenerateOptions topP(float v) { topP = v; return this; }
    public GenerateOptions minP(float v) { minP = v; return this; }
    public GenerateOptions seed(int v) { seed = v; return this; }
    public GenerateOptions stopAtEos(boolean v) { stopAtEos = v; return this; }
}
