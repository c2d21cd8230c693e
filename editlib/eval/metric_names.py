"""The lm-eval metrics this project handles by name, importable without torch (the reporting jobs,
editlib.study.tables and .findings, read them too)."""

# loglikelihood_rolling metrics: per text a pair (log-likelihood, words or bytes), and over the
# texts a ratio of sums, for which lm-eval reports no standard error
RATIO_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
# perplexities whose change from the unedited model is taken on the log scale: the log of word or
# byte perplexity is minus the log-likelihood per word or byte, so its change is a ratio of sums
LOG_CHANGE_METRICS = ("word_perplexity", "byte_perplexity")
# lower-is-better metrics, for rows that do not carry lm-eval's direction (tables written before
# the downstream tables kept it)
LOWER_IS_BETTER = frozenset({"perplexity", *RATIO_METRICS})
