"""The store: content-addressed artifacts and their keys (code identity, hub revisions), artifacts built by
several processes together, the store CLI, and the W&B mirror. Imports nothing of the pipeline but
``pipeline.errors`` and ``pipeline.environment``.

The dependency rule is in pipeline/__init__.py."""
