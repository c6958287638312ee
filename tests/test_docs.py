"""Every ```python block in README.md and docs/*.md runs."""

import pathlib
import re

import pytest

from featattn.feature_maps import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks():
    for path in FILES:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            if "# doctest: skip" in code:
                continue
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(_blocks()))
def test_doc_block_runs(code):
    before = dict(registry._REGISTRY)
    try:
        exec(compile(code, "<doc>", "exec"), {"__name__": "__doc__"})
    finally:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(before)
