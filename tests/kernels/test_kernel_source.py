"""Checks on the Triton kernels' source that no test run on the CPU could make.

A nested loop whose range starts or ends at a value carried over from the enclosing loop's
previous iteration (``done = 0; for j ...: for c in range(done, lo): ...; done = lo``) ran
right under the interpreter but, compiled by Triton 3.6 for the H200, did not carry the
reassigned bound: every iteration started from the first value again (the hybrid decode
step folded its evicted keys several times over, session 17).  Each bound must come from
the iteration's own values instead.
"""

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[2] / "featattn" / "kernels"


def _assigned(nodes):
    out = set()
    for node in nodes:
        for n in ast.walk(node):
            targets = n.targets if isinstance(n, ast.Assign) else \
                [n.target] if isinstance(n, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                out |= {x.id for x in ast.walk(t) if isinstance(x, ast.Name)}
    return out


def carried_loop_bounds(source: str, filename: str = "<src>"):
    """``file:line function: names`` of each nested loop whose range uses a name that the
    enclosing loop carries (assigned before that loop and again inside it)."""
    found = []
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, ast.FunctionDef) or not any(
                "jit" in ast.unparse(d) for d in fn.decorator_list):
            continue
        for outer in (n for n in ast.walk(fn) if isinstance(n, ast.For)):
            before = _assigned(n for n in ast.walk(fn) if n is not fn
                               and isinstance(n, ast.stmt) and n.end_lineno < outer.lineno)
            carried = before & _assigned(outer.body)
            for inner in (n for n in ast.walk(ast.Module(outer.body, [])) if isinstance(n, ast.For)):
                used = {x.id for x in ast.walk(inner.iter) if isinstance(x, ast.Name)} & carried
                if used:
                    found.append(f"{filename}:{inner.lineno} {fn.name}: {sorted(used)}")
    return found


def test_no_kernel_loop_takes_a_bound_carried_from_the_enclosing_loop():
    found = []
    for path in sorted(KERNELS.glob("*.py")):
        found += carried_loop_bounds(path.read_text(), path.name)
    assert not found, "loop bounds carried across iterations (miscompiled on the GPU): " \
        + "; ".join(found)


def test_the_check_finds_the_old_decode_pattern():
    old = (
        "@triton.jit\n"
        "def k(P, T, W):\n"
        "    done = P * 0\n"
        "    for j in range(0, T):\n"
        "        lo = tl.maximum(P + j - W + 1, 0)\n"
        "        for cf in range(done, lo):\n"
        "            pass\n"
        "        done = lo\n"
    )
    assert carried_loop_bounds(old) == ["<src>:6 k: ['done']"]
    fixed = old.replace("range(done, lo)", "range(tl.maximum(P + j - W, 0), lo)")
    assert carried_loop_bounds(fixed) == []
