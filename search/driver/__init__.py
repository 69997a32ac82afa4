"""Running many trials: the runner, the Tune glue, samplers, schedulers, warm start, the baseline cache and clusters."""
