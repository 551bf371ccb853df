"""Training machinery: the losses, one step's pieces, checkpoints, FSDP sharding. Imports ``modeling``,
``data`` and ``store``.

The dependency rule is in pipeline/__init__.py."""
