"""MLflow tracking, by what it tracks: `tracker` (the store, a run, a run reopened on resume),
`cycle_runs` (the cycle job's runs and registered model) and `studies` (sweeps, evidence).
Import from the submodule you need: the package itself imports nothing."""
