"""Many runs of one config: a search space over its keys, Optuna as the engine, trials as ordinary runs."""
