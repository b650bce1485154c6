"""The shared evaluation of erasure runs: prompt suites, metrics, the evaluation callback and reports."""
