"""What the installed package ships besides its modules."""

import pathlib
import sys

import featattn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_py_typed_marker():
    """PEP 561: the marker lies in the package directory and setuptools is told to ship it
    (package data is not included by default)."""
    assert (pathlib.Path(featattn.__file__).parent / "py.typed").is_file()
    if sys.version_info >= (3, 11):
        import tomllib

        config = tomllib.loads((ROOT / "pyproject.toml").read_text())
        assert "py.typed" in config["tool"]["setuptools"]["package-data"]["featattn"]
