package dev.amend;

/** A failed amend call: {@link #code()} is the amend_result value, the message amend's text. */
public final class AmendException extends RuntimeException {
    private static final long serialVersionUID = 1L;
    private final int code;
    private final String codeName;

    public AmendException(int code, String codeName, String message) {
        super(codeName + ": " + message);
        this.code = code;
        this.codeName = codeName;
    }

    /** The numeric result code (see {@link Result}). */
    public int code() { return code; }

    /** The code's name, e.g. "AMEND_ERR_MODEL_MISMATCH". */
    public String codeName() { return codeName; }
}
