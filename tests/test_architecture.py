"""The package's import rules, checked on the source: which featattn modules may import what.

Every ``import`` / ``from ... import`` statement of every module under featattn/ counts, at any
depth (inside functions, ``try`` blocks and ``if TYPE_CHECKING:`` too), relative imports
resolved to absolute names.  A new dependency edge that breaks a rule fails here with its
file, line and rule; a deliberate one goes into ALLOWED with its reason.
"""

import ast
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "featattn"

# where: the files a rule covers, as repo-relative globs ("dir/**" = everything below dir/,
# "dir/*.py" = that folder's own modules only); minus: files taken out of "where";
# forbidden: module names those files may not import (a name covers its submodules).
CORE = ["featattn/*.py", "featattn/feature_maps/**", "featattn/kernels/**", "featattn/compat/**"]
RULES = {
    "triton only under featattn/kernels/": dict(
        where=["featattn/**"], minus=["featattn/kernels/**"], forbidden=["triton"]),
    "transformers only under featattn/hf/": dict(
        where=["featattn/**"], minus=["featattn/hf/**"], forbidden=["transformers"]),
    "the oracle featattn/reference.py imports nothing of featattn": dict(
        where=["featattn/reference.py"], minus=[], forbidden=["featattn"]),
    "torch.distributed only in featattn/distributed.py (imported when cp_group is given)": dict(
        where=["featattn/**"], minus=["featattn/distributed.py"], forbidden=["torch.distributed"]),
    "the core never imports featattn.cli or featattn.hf": dict(
        where=CORE, minus=[], forbidden=["featattn.cli", "featattn.hf"]),
}

# (file, imported module) -> why this edge is allowed despite a rule.  Each must still occur.
ALLOWED = {
    ("featattn/__init__.py", "featattn.hf"):
        "PEP 562 __getattr__ re-exports featattn.hf's main functions (_HF_NAMES) on first access only",
    ("featattn/__main__.py", "featattn.cli"):
        "`python -m featattn` is the command line's entry point",
    ("featattn/cli/bench.py", "triton.testing"):
        "do_bench times the benchmark when triton is importable (falls back to a wall timer)",
}


def _matches(rel: str, pattern: str) -> bool:
    if pattern.endswith("/**"):
        return rel.startswith(pattern[:-2])
    path, pat = PurePosixPath(rel), PurePosixPath(pattern)
    return len(path.parts) == len(pat.parts) and path.match(pattern)


def _module_name(rel: str) -> str:
    parts = list(PurePosixPath(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, rel: str):
    """``(line, absolute module name)`` for every import in ``source`` (the file ``rel``).
    ``from pkg import name`` yields both ``pkg`` and ``pkg.name`` (name may be a submodule)."""
    module = _module_name(rel)
    package = module if rel.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, filename=rel)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"


def _covers(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


def violations(files):
    """``(rule, file, line, module)`` for every import that breaks a rule (ALLOWED not applied).
    ``files``: ``{repo-relative path: source}``."""
    found = []
    for rule, spec in RULES.items():
        for rel, source in files.items():
            if not any(_matches(rel, p) for p in spec["where"]):
                continue
            if any(_matches(rel, p) for p in spec["minus"]):
                continue
            seen = set()
            for line, name in imports_of(source, rel):
                for bad in spec["forbidden"]:
                    # one report per statement: `from . import hf` yields featattn and featattn.hf
                    if _covers(name, bad) and (line, bad) not in seen:
                        seen.add((line, bad))
                        found.append((rule, rel, line, name))
    return found


def _package_sources():
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def _report(found):
    return "\n".join(f"{rel}:{line}: imports {name} -- breaks rule {rule!r}"
                     for rule, rel, line, name in found)


def _allowed_by(key, violation):
    _, rel, _, name = violation
    return rel == key[0] and _covers(name, key[1])


@pytest.mark.parametrize("rule", list(RULES))
def test_import_rule(rule):
    found = [v for v in violations(_package_sources())
             if v[0] == rule and not any(_allowed_by(key, v) for key in ALLOWED)]
    if found:
        pytest.fail("\n" + _report(found), pytrace=False)


def test_allowed_exceptions_are_still_needed():
    found = violations(_package_sources())
    stale = [key for key in ALLOWED if not any(_allowed_by(key, v) for v in found)]
    assert not stale, f"ALLOWED entries that no longer break a rule; remove them: {stale}"


def test_rules_cover_every_module_they_name():
    """A glob that matches nothing (a folder renamed) would quietly check nothing."""
    rels = list(_package_sources())
    for rule, spec in RULES.items():
        for pattern in spec["where"] + spec["minus"]:
            assert any(_matches(rel, pattern) for rel in rels), (rule, pattern)


def test_checker_sees_imports_anywhere():
    """The checker itself: nested and relative imports count, and the report names file,
    line and rule."""
    src = (
        "import torch\n"
        "def f():\n"
        "    try:\n"
        "        from triton.language import tl\n"
        "    except ImportError:\n"
        "        pass\n"
        "class C:\n"
        "    def g(self):\n"
        "        from .. import hf\n"
        "        from ..cli.ui import UI\n"
    )
    found = violations({"featattn/feature_maps/fake.py": src})
    report = _report(found)
    assert ("featattn/feature_maps/fake.py:4: imports triton.language -- breaks rule "
            "'triton only under featattn/kernels/'") in report
    assert "featattn/feature_maps/fake.py:9: imports featattn.hf" in report
    assert "featattn/feature_maps/fake.py:10: imports featattn.cli.ui" in report
    found = violations({"featattn/reference.py": "def f():\n    from .state import x\n"})
    assert [(v[1], v[2], v[3]) for v in found] == [("featattn/reference.py", 2, "featattn.state")]
    # kernels/ may import triton; the hf leaf may import transformers and the CLI
    assert not violations({"featattn/kernels/x.py": "import triton.language as tl\n"})
    assert not violations({"featattn/hf/x.py": "import transformers\nfrom ..cli.ui import UI\n"})
