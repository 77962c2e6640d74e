"""The package version (a module of its own, so that the bundle can stamp it without importing the package)."""

__version__ = "0.1.0"
