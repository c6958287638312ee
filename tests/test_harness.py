"""The test harness's own switches (tests/conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _collect(target, shard=None):
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    if shard:
        env["FEATATTN_TEST_SHARD"] = shard
    p = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-p", "no:xdist", target],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    return p.returncode, [ln for ln in p.stdout.splitlines() if "::" in ln], p.stdout + p.stderr


def test_shards_cover_every_test_once():
    """FEATATTN_TEST_SHARD=i/n: n runs hold every selected test exactly once."""
    target = "tests/test_errors.py"
    rc, everything, _ = _collect(target)
    assert rc == 0 and len(everything) >= 6, everything
    parts = [_collect(target, f"{i}/3")[1] for i in (1, 2, 3)]
    assert all(parts), parts
    assert sorted(sum(parts, [])) == sorted(everything)


def test_a_bad_shard_is_explained():
    rc, _, out = _collect("tests/test_errors.py", "3/2")
    assert rc != 0 and "FEATATTN_TEST_SHARD must be i/n" in out, out
