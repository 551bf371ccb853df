"""One module per stage (model, pair, reference, train, evaluate, analyse), each with ``run(cfg, upstream,
root) -> Artifact``. A stage imports the packages below it (and ``analysis``), never another stage.

The dependency rule is in pipeline/__init__.py."""
