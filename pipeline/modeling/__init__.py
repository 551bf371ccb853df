"""The model's side: loading, the tiny model, forward layouts (packing, batching), the chunked log-prob
head, scoring, precision, the reference scores read back. Imports ``data`` and ``store``.

The dependency rule is in pipeline/__init__.py."""
