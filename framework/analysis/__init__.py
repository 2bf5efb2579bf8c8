"""Analysis of finished runs: the seed claims' verdicts computed from a run's results
(:mod:`.claims`) and the comparison across runs read back from the store (:mod:`.compare`).
The core imports :mod:`.claims` only for runs that name a claim."""
