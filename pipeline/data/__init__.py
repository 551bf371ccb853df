"""Data: readers, schema adapters, edit distances and buckets, the synthetic generator (pairs and held-out
items), one-sided rows. Imports only ``pipeline.store`` (and the base modules).

The dependency rule is in pipeline/__init__.py."""
