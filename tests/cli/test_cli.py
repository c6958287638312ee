"""The command line: ``featattn demo``, ``featattn bench``, ``featattn info``, help and errors.

Runs in-process through ``featattn.cli.main`` (stdout is captured, so not a terminal: the
plain progress and markdown table are what CI sees), plus one subprocess for the entry point.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from featattn import cli
from featattn.cli.bench import _call_fla
from featattn.cli.demo import QUICK_CONFIG
from featattn.cli.ui import UI

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def fails(argv, capsys):
    """argparse-style failure: SystemExit(2) and a message on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exc.value.code == 2, (out, err)
    return err


def table_rows(out):
    """First cell of every markdown table row, header and rule excluded."""
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
    return rows[1:]


def assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 5_000          # a real plot, not an empty canvas
    from matplotlib.image import imread

    h, w, _ = imread(path).shape
    assert h > 100 and w > 100


# --------------------------------------------------------------------------- help


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out and "info" in out


@pytest.mark.parametrize("cmd, flags", [
    ("demo", ["--device", "--steps", "--seq-len", "--feature-maps", "--out", "--quick"]),
    ("bench", ["--device", "--lengths", "--batch", "--heads", "--dqk", "--dv", "--feature-map",
               "--dtype", "--backends", "--window", "--out", "--quick"]),
    ("info", ["--device"]),
])
def test_command_help(cmd, flags, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in flags:
        assert flag in out, flag


def python_env():
    """The environment of a child interpreter that imports the featattn under test (this
    process's sys.path, so a worktree on PYTHONPATH wins over an editable install)."""
    return {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": os.pathsep.join(sys.path)}


def test_entry_point_subprocess():
    """``python -m featattn``: help works and a bad flag exits 2 with a message."""
    env = python_env()
    code = "import featattn.cli; print(featattn.cli.__file__)"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           timeout=120)
    assert where.stdout.strip() == cli.__file__, where.stderr     # the copy under test
    ok = subprocess.run([sys.executable, "-m", "featattn", "--help"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "bench" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "featattn", "demo", "--steps", "0"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2
    assert "--steps" in bad.stderr and "must be >= 1" in bad.stderr


def test_import_featattn_does_not_import_cli():
    """The command line is a leaf: neither ``import featattn`` nor ``import featattn.hf`` loads
    it (attention transfer imports its UI only when it shows progress)."""
    code = ("import sys, featattn, featattn.hf\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('featattn.cli'))\n"
            "assert not loaded, f'import featattn imported {loaded}'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=python_env(), timeout=120)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, expect", [
    ([], "required"),
    (["frobnicate"], "invalid choice"),
    (["demo", "--steps", "0"], "must be >= 1"),
    (["demo", "--steps", "ten"], "expected an integer"),
    (["demo", "--seq-len", "10"], "--seq-len 10 is too short for 24 key-value pairs"),
    (["demo", "--quick", "--kv-pairs", "40"], "exceeds the 16 distinct keys"),
    (["demo", "--feature-maps", "elu", "nope"], "unknown 'nope'; choose from softmax, dpfp, elu"),
    (["demo", "--lr", "-1"], "--lr"),
    (["demo", "--dim", "30", "--heads", "4"], "not divisible"),
    (["demo", "--device", "tpu"], "--device"),
    (["demo", "--no-such-flag"], "unrecognized arguments"),
    (["bench", "--backends", "torch", "fast"], "unknown 'fast'; choose from torch"),
    (["bench", "--feature-map", "nope"], "unknown 'nope'"),
    (["bench", "--lengths", "0"], "must be >= 1"),
    (["bench", "--dtype", "int8"], "invalid choice"),
    (["info", "--device", "tpu"], "--device"),
    (["info", "--out", "x"], "unrecognized arguments"),
])
def test_bad_flags(argv, expect, capsys):
    err = fails(argv, capsys)
    assert expect in err
    assert "usage:" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(capsys):
    assert "CUDA is not available" in fails(["demo", "--device", "cuda"], capsys)


# --------------------------------------------------------------------------- demo


def test_demo_quick(tmp_path, capsys):
    """``featattn demo --quick`` end to end with every default model: the table, progress,
    plot and JSON.  Its sizes, with 30 of its 250 steps (past an evaluation at 25 and the
    warm-up steps left out of tokens/s): the full run trains taylor alone for ~15 s, and
    what it learns is checked by test_demo_quick_softmax_learns."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)    # not 1 (the xdist workers' count), so restoring it shows
    try:
        # one thread: steadier when other jobs share the CPU (OpenMP barriers spin otherwise)
        rc, out, _ = run(["demo", "--quick", "--steps", "30", "--threads", "1", "--out",
                          str(tmp_path)], capsys)
        assert torch.get_num_threads() == 2                   # restored
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    names = ["softmax", "taylor", "elu", "relu", "identity"]
    assert table_rows(out) == names                       # one row per model
    assert f"wrote {tmp_path / 'demo.png'}" in out
    assert_png(tmp_path / "demo.png")
    res = json.loads((tmp_path / "demo.json").read_text())
    assert [r["name"] for r in res["results"]] == names
    assert res["config"] == {**dataclasses.asdict(QUICK_CONFIG), "steps": 30}
    steps = res["config"]["steps"]
    for r in res["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["params"] > 0 and r["tokens_per_s"] > 0
        assert r["curve"][0][0] == 0 and r["curve"][-1] == [steps, r["accuracy"]]
        assert [s for s, _ in r["curve"]] == [0, 25, 30]
    # the plain progress (stdout is not a terminal) reports each model
    for name in names:
        assert f"  {name:<10} {steps:>6}/{steps:<6}" in out
    assert res["threads"] == 1


def test_demo_quick_softmax_learns(tmp_path, capsys):
    """Real learning even in the quick run: softmax recalls (the linear maps learn more
    slowly).  A model's result depends on its config and seed alone, not on the models
    trained before it (test_demo_model_depends_on_the_seed_alone), so this is the accuracy
    the full ``featattn demo --quick`` reports for softmax."""
    rc, out, _ = run(["demo", "--quick", "--feature-maps", "softmax", "--threads", "1",
                      "--out", str(tmp_path)], capsys)
    assert rc == 0 and table_rows(out) == ["softmax"]
    res = json.loads((tmp_path / "demo.json").read_text())
    assert res["config"] == dataclasses.asdict(QUICK_CONFIG) and res["threads"] == 1
    assert res["results"][0]["accuracy"] > 0.5


def test_demo_reproducible_and_png_path(tmp_path, capsys):
    argv = ["demo", "--quick", "--steps", "8", "--eval-every", "4", "--feature-maps", "softmax,elu",
            "--threads", "1"]
    run(argv + ["--out", str(tmp_path / "a")], capsys)
    rc, out, _ = run(argv + ["--out", str(tmp_path / "b" / "curve.png")], capsys)
    assert rc == 0 and table_rows(out) == ["softmax", "elu"]
    assert_png(tmp_path / "b" / "curve.png")
    a = json.loads((tmp_path / "a" / "demo.json").read_text())["results"]
    b = json.loads((tmp_path / "b" / "curve.json").read_text())["results"]
    for ra, rb in zip(a, b):
        assert ra["curve"] == rb["curve"] and ra["final_loss"] == rb["final_loss"]
    # the header and the JSON say what else the numbers depend on
    capability = torch.backends.cpu.get_cpu_capability()
    assert (f"  reproducible for: seed 0, torch {torch.__version__}, threads 1, "
            f"cpu_capability {capability}\n") in out
    env = json.loads((tmp_path / "b" / "curve.json").read_text())["environment"]
    assert env == {"torch": torch.__version__, "device": "cpu", "threads": 1,
                   "cpu_capability": capability}


def test_demo_model_depends_on_the_seed_alone():
    """train_one neither reads nor moves the caller's global RNG: the same result after other
    models or other draws, and the caller's random stream goes on where it was."""
    from featattn.cli.demo import DemoConfig, make_eval_set, train_one

    cfg = DemoConfig(steps=3, seq_len=12, kv_pairs=3, vocab=17, batch=4, dim=8, heads=2,
                     eval_every=3, eval_size=8, seed=5)
    cpu = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ev = make_eval_set(cfg, cpu)
        torch.manual_seed(123)
        expected_draw = torch.rand(4)
        torch.manual_seed(123)
        first = train_one("relu", cfg, cpu, eval_set=ev)
        assert torch.equal(torch.rand(4), expected_draw)      # the caller's stream, untouched
        train_one("softmax", dataclasses.replace(cfg, seed=6), cpu, eval_set=ev)
        torch.rand(1000)
        again = train_one("relu", cfg, cpu, eval_set=ev)
    finally:
        torch.set_num_threads(threads)
    assert again.curve == first.curve and again.final_loss == first.final_loss
    other = train_one("relu", dataclasses.replace(cfg, seed=6), cpu, eval_set=ev)
    assert other.final_loss != first.final_loss                 # and the seed does matter


def test_mqar_layout():
    from featattn.cli.demo import mqar_batch

    gen = torch.Generator().manual_seed(0)
    x, y = mqar_batch(gen, batch=3, seq_len=20, kv_pairs=4, vocab=33)
    assert x.shape == y.shape == (3, 20)
    keys, values = x[:, 0:8:2], x[:, 1:8:2]
    assert ((keys >= 1) & (keys <= 16)).all() and ((values >= 17) & (values <= 32)).all()
    assert (y[:, :8] == -100).all()
    for b in range(3):
        bound = dict(zip(keys[b].tolist(), values[b].tolist()))
        assert len(bound) == 4                                      # distinct keys
        for t in range(8, 20):
            assert y[b, t].item() == bound[x[b, t].item()]          # query -> its value


# --------------------------------------------------------------------------- bench


def test_bench_quick(tmp_path, capsys):
    rc, out, _ = run(["bench", "--quick", "--out", str(tmp_path)], capsys)
    assert rc == 0
    rows = [line for line in out.splitlines() if line.startswith("| ")][1:]
    by_backend = {}
    for line in rows:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        by_backend.setdefault(cells[0], []).append(cells)
    assert {"torch", "reference", "triton", "chunked", "taylor_parallel", "taylor_chunked",
            "sdpa"} <= set(by_backend)
    for name, kernel in (("torch", "torch_chunked"), ("reference", "reference")):
        assert [r[2] for r in by_backend[name]] == ["64", "128"]
        for r in by_backend[name]:
            assert r[1] == kernel                                   # the dispatcher's choice
            assert float(r[3]) > 0 and float(r[4]) > 0 and r[5] == "-"  # no peak memory on CPU
    for name in ("triton", "chunked", "taylor_parallel", "taylor_chunked"):  # not timeable here
        assert len(by_backend[name]) == 1 and by_backend[name][0][-1].startswith("n/a: ")
    assert_png(tmp_path / "bench.png")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert len(data["rows"]) == len(rows)


def test_bench_window_times_the_hybrid_layer(tmp_path, capsys, monkeypatch):
    """--window W: the featattn rows time the hybrid layer (the kernel column says which
    path runs it), the identity map normalised (the shared denominator needs it), fla left
    out with the reason, sdpa as before; the Triton hybrid named in --backends runs in the
    interpreter."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    from featattn import linear_attention as real
    import featattn.cli.bench as B

    seen = []
    monkeypatch.setattr(B, "linear_attention",
                        lambda *a, **kw: seen.append(kw.get("window")) or real(*a, **kw))
    rc, out, _ = run(["bench", "--backends", "torch", "chunked", "sdpa", "fla_chunk",
                      "--window", "8", "--feature-map", "identity", "--lengths", "32", "96",
                      "--batch", "1", "--heads", "1", "--dqk", "16", "--dv", "16",
                      "--out", str(tmp_path)], capsys)
    assert rc == 0 and "window=8 (hybrid)" in out and "normalize=True" in out
    assert "featattn bench: identity, window=8" in out
    rows, short = {}, {}
    for line in out.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            (short if cells[2] == "32" else rows)[cells[0]] = cells
    # at T <= 64 the Triton row says why it is not timed (the direct PyTorch form runs)
    assert "direct PyTorch form" in short["chunked"][-1] and float(short["torch"][4]) > 0
    assert rows["torch"][1] == "torch_chunked" and float(rows["torch"][4]) > 0
    assert rows["chunked"][1] == "chunked" and float(rows["chunked"][4]) > 0
    assert float(rows["sdpa"][4]) > 0
    assert "no hybrid (window) form" in rows["fla_chunk"][-1]
    assert seen and set(seen) == {8}


def test_bench_triton_interpreter(tmp_path, capsys, monkeypatch):
    """A Triton kernel named in --backends runs, under the interpreter on a CPU."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc, out, _ = run(["bench", "--backends", "equal_dim", "torch", "--lengths", "32",
                      "--batch", "1", "--heads", "1", "--dqk", "16", "--dv", "16",
                      "--out", str(tmp_path)], capsys)
    assert rc == 0
    rows = {}
    for line in out.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells
    assert set(rows) == {"backend", "equal_dim", "torch"}
    backend, kernel, T, fwd, fwdbwd, peak, note = rows["equal_dim"]
    assert (kernel, T, note) == ("chunked", "32", "")  # an alias names the kernel it selects
    assert float(fwd) > 0 and float(fwdbwd) > 0


# --------------------------------------------------------------------------- info


def table(out, title):
    """{first cell: cells} of the markdown table printed under the line ``title...``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rows = {}
    for line in lines[start + 3:]:              # title, header, rule
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


def test_info(capsys):
    import platform

    import featattn
    from featattn import _switches
    from featattn.cli.info import CALLS
    from featattn.dispatch import BACKENDS, KERNELS

    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    versions = table(out, "versions")
    assert versions["featattn"][1] == featattn.__version__
    assert versions["featattn"][2] == os.path.dirname(featattn.__file__)   # the copy under test
    assert versions["python"][1] == platform.python_version()
    assert versions["torch"][1] == torch.__version__
    assert set(versions) == {"featattn", "python", "torch", "triton", "transformers"}
    device = table(out, "device")
    assert device["device"][1] == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert device["capability"][1].startswith(
            "{}.{}".format(*torch.cuda.get_device_capability()))
    kernels = table(out, "kernels: backend='auto'")
    assert [c.label for c in CALLS] == ["no map", "elu", "taylor", "hedgehog"]
    for call in CALLS:
        assert kernels[call.label][3] in KERNELS, kernels[call.label]
    if not torch.cuda.is_available():
        assert {kernels[c.label][3] for c in CALLS} == {"torch_chunked"}
        assert "Triton kernels need CUDA" in kernels["elu"][5] \
            or "uses Triton on CUDA only" in kernels["elu"][5]
    backends = table(out, "backends:")
    assert set(backends) == set(BACKENDS)
    assert backends["torch"][2] == "torch_chunked" and backends["reference"][2] == "reference"
    assert "kernels that run here: " in out
    switches = table(out, "switches")
    assert set(switches) == set(_switches.SWITCHES)
    for name, s in _switches.SWITCHES.items():
        assert switches[name][2] == (s.default or "(empty)")
        assert switches[name][4] == s.when


def test_info_switches_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("FEATATTN_SEGMENT", "off")
    monkeypatch.setenv("FEATATTN_FUSE_MAPS", "auto")
    monkeypatch.delenv("FEATATTN_EAGER_CUSTOM_OP", raising=False)
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    switches = table(out, "switches")
    assert switches["FEATATTN_SEGMENT"][1:4] == ["off", "auto", "set"]
    assert switches["FEATATTN_FUSE_MAPS"][1:4] == ["auto", "auto", "set (= default)"]
    assert switches["FEATATTN_EAGER_CUSTOM_OP"][1:4] == ["0", "0", "default"]


def test_info_without_optional_packages(capsys, monkeypatch):
    """A missing transformers (or triton) is reported, not raised."""
    # import the kernels (with triton) before hiding it: imported while it is hidden, they
    # would stay without triton for the later tests of this process
    import featattn.kernels  # noqa: F401
    monkeypatch.setitem(sys.modules, "transformers", None)   # import raises ImportError
    monkeypatch.setitem(sys.modules, "triton", None)
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    versions = table(out, "versions")
    assert versions["transformers"][1:] == ["not installed", "-"]
    assert versions["triton"][1:] == ["not installed", "-"]


def test_info_reports_dispatcher_errors(capsys, monkeypatch):
    """A select_kernel that raises (a switch set to a bad value, say) shows in its row."""
    import featattn

    def boom(*args, **kwargs):
        raise ValueError("FEATATTN_FUSE_MAPS must be 'auto'")

    monkeypatch.setattr(featattn, "select_kernel", boom)
    rc, out, _ = run(["info"], capsys)
    assert rc == 0
    kernels = table(out, "kernels: backend='auto'")
    assert kernels["elu"][3] == "error"
    assert "error: ValueError: FEATATTN_FUSE_MAPS must be 'auto'" in kernels["elu"][5]
    assert table(out, "backends:")["auto"][2] == "n/a"


def test_info_subprocess():
    """``python -m featattn info`` in a fresh interpreter, a switch set in its environment."""
    env = {**python_env(), "FEATATTN_SEGMENT": "off"}
    r = subprocess.run([sys.executable, "-m", "featattn", "info"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert table(r.stdout, "switches")["FEATATTN_SEGMENT"][1:4] == ["off", "auto", "set"]
    assert "kernels: backend='auto'" in r.stdout


def test_call_fla_signatures():
    """fla changed its layout argument across versions; the bench adapts to both."""
    q = k = v = torch.zeros(1, 5, 2, 4)     # [B, T, H, D]

    def new_style(q, k, v, scale=None, normalize=True):
        return q + 1, "state"

    def old_style(q, k, v, scale=None, normalize=True, head_first=True):
        assert head_first is False
        return q + 2, None

    def based(q, k, v, scale=None, use_norm=True, head_first=False):
        return q + 3

    assert (_call_fla(new_style, q, k, v, scale=1.0, normalize=False) == 1).all()
    assert (_call_fla(old_style, q, k, v, scale=1.0, normalize=False) == 2).all()
    assert (_call_fla(based, q, k, v, scale=0.5, use_norm=True) == 3).all()


def test_rich_ui(capsys):
    """The terminal path: a rich table and rich progress bars."""
    ui = UI(fancy=True)
    with ui.progress() as add:
        update = add("elu", 3)
        for i in range(1, 4):
            update(i, f"loss {1 / i:.3f}")
    ui.table("t", ["attention", "acc"], [["elu", "0.5"], ["taylor", "1.0"]], right=[False, True])
    out = capsys.readouterr().out
    assert "taylor" in out and "elu" in out and "3/3" in out
