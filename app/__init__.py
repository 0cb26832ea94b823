"""exitserve: an inference service for multi-exit classifiers with adaptive early exit."""

__version__ = "0.1.0"
