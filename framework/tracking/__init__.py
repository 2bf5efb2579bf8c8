"""MLflow: the store and its experiments, one run per job, sweeps as parent runs, uploads of
results kept locally while a server was away, and a run's samples as dataset inputs."""
