"""The version of lsdb (one place; pyproject.toml repeats it and tests/test_packaging.py checks they agree)."""

__version__ = "0.2.0"
