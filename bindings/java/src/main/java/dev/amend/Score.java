package dev.amend;

/** Teacher-forced log-probability of a target after a prompt. */
public final class Score {
    public final int nTargetTokens;
    public final double logprobSum;
    public final double logprobMean;
    public final int nArgmaxMatch;

    Score(double[] v) {
        nTargetTokens = (int) v[0];
        logprobSum = v[1];
        logprobMean = v[2];
        nArgmaxMatch = (int) v[3];
    }
}
