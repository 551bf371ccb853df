"""Evaluation machinery: lm-eval suites and their data-parallel path, preference metrics, probes. Imports
``modeling``, ``data`` and ``store``.

The dependency rule is in pipeline/__init__.py."""
