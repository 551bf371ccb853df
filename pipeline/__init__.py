"""prefopt: preference-optimisation experiments as cached, reproducible stages.

The tree, by role, in the order data flows (a package imports only the packages listed above it, and its own
modules; ``stages`` never import each other; no import cycles, even inside a package):

    errors, environment,  base modules: one-line user errors, process environment, SIGTERM/SIGINT
    interrupts
    store/                artifacts, keys, code identity, hub revisions, collective builds, store CLI, W&B mirror
    data/                 readers, adapters, edit distance, synthetic data, one-sided rows
    modeling/             model loading, tiny model, packing, batching, log-prob head, scoring, precision
    training/ evaluation/ losses, the step, checkpoints, sharding | lm-eval suites, metrics, probes (siblings:
                          neither imports the other)
    analysis (top level)  tables, figures, report from artifacts
    stages/               model, pair, reference, train, evaluate, analyse: one ``run`` each
    orchestration/        the run's chain, sweeps, validation, CLI, cluster jobs, dashboard
    __main__              the entry point

tests/test_layout.py reads every import with ``ast`` and fails on a violation or a cycle.
"""
