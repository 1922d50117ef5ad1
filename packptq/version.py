"""The package version (the root ``packptq`` re-exports it; pyproject.toml states the same)."""

__version__ = "0.1.0"
