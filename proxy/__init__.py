"""pullgate: a node-level verifying pull-through OCI registry mirror."""

__version__ = "0.1.0"
