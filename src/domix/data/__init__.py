"""Data: user corpora for domain pre-training (`corpus`), end-task files (`tasks`), the benchmark data
(`benchmark`)."""
