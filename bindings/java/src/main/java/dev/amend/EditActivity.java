package dev.amend;

/** What one edit did during the last generation or scoring (see {@link Session#explain()}). */
public final class EditActivity {
    public final String bundleId;
    /** "" for a bundle-wide low-rank adapter. */
    public final String editId;
    /** "codebook", "patch_neurons", "low_rank" or "memory". */
    public final String family;
    public final int layer;
    /** How often the edit changed the computation. */
    public final int nFired;
    /** How often it was checked (0 when the family reports only firings). */
    public final int nChecked;

    EditActivity(String bundleId, String editId, String family, int layer, int nFired, int nChecked) {
        this.bundleId = bundleId;
        this.editId = editId;
        this.family = family;
        this.layer = layer;
        this.nFired = nFired;
        this.nChecked = nChecked;
    }

    @Override public String toString() {
        return bundleId + "/" + editId + " " + family + "@" + layer + " fired " + nFired + "/" + nChecked;
    }
}
