"""The package version, importable without the rest of peftplan."""

__version__ = "0.1.0"
