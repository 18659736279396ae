"""The package version (one place; ``pyproject.toml`` carries the same string)."""

__all__ = ["VERSION"]

VERSION = "0.2.0"
