package dev.amend;

/** Receives each generated token's text; return false to stop (a Kotlin lambda works as is). */
@FunctionalInterface
public interface TokenListener {
    boolean onToken(int token, String text);
}
