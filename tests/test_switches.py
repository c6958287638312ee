"""featattn/_switches.py declares every environment variable the package reads; the docs
table lists them all; undeclared names are refused."""

import pathlib
import re

import pytest

from featattn import _switches

ROOT = pathlib.Path(__file__).resolve().parents[1]
READS = re.compile(r"(?:read|enabled|getenv|environ\.get)\(\s*[\"'](FEATATTN_\w+)"
                   r"|environ\[\s*[\"'](FEATATTN_\w+)")


def test_every_variable_in_the_source_is_declared():
    used = set()
    for path in (ROOT / "featattn").rglob("*.py"):
        if path.name == "_switches.py":
            continue
        # the names os.environ / os.getenv / _switches.read / _switches.enabled are asked for
        for a, b in READS.findall(path.read_text()):
            used.add(a or b)
    assert {"FEATATTN_POISON", "FEATATTN_FUSE_MAPS"} <= used, f"the scan is broken: {used}"
    assert used <= set(_switches.SWITCHES), sorted(used - set(_switches.SWITCHES))


def test_docs_table_lists_every_switch():
    doc = (ROOT / "docs" / "kernels-and-dispatch.md").read_text()
    for name, s in _switches.SWITCHES.items():
        assert f"| `{name}` | `{s.default}` | {s.when} |" in doc, name


def test_read_refuses_undeclared_names_and_returns_defaults(monkeypatch):
    with pytest.raises(KeyError, match="not a declared switch"):
        _switches.read("FEATATTN_NOPE")
    monkeypatch.delenv("FEATATTN_FUSE_MAPS", raising=False)
    assert _switches.read("FEATATTN_FUSE_MAPS") == "auto"
    monkeypatch.setenv("FEATATTN_POISON", "1")
    assert _switches.enabled("FEATATTN_POISON")
