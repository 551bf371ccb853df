"""Running stages: the chain of one run, sweeps, config validation, the CLI, cluster jobs, the W&B
dashboard. The top of the tree: imports anything, nothing imports it (but the entry point).

The dependency rule is in pipeline/__init__.py."""
