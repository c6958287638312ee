import os
import sys

import torch

# the test folders mirror the package (tests/kernels/, tests/hf/, ...); the helpers every
# folder shares (helpers.py) sit here, importable from all of them
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

# On machines without a GPU the Triton kernels run in the interpreter on CPU tensors.  The
# variable must be set before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Under the interpreter every load and store of a kernel is checked against its tensors'
# memory (tests/_bounds.py): an address outside every tensor argument fails the test here.
if os.environ.get("TRITON_INTERPRET") == "1":
    import _bounds  # noqa: E402

    _bounds.install()

# Under pytest-xdist (`-n 8`, also on 2-core machines) one intra-op thread per worker: with
# torch's default of one per core, the workers' OpenMP threads spin against each other and the
# small CPU models of the tests run up to ten times slower.  Tests that need a thread count
# set it themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poison_kernel_outputs():
    """Every buffer a Triton kernel writes starts as NaN, so an element it forgets to write
    fails the test instead of passing with stale memory.  featattn.testing.poisoned_outputs
    is featattn.kernels._common's own switch, the one the benchmarks flip too."""
    from featattn.testing import poisoned_outputs

    with poisoned_outputs():
        yield


def pytest_collection_modifyitems(config, items):
    for item in items:  # modules whose tests move to the GPU when there is one
        if getattr(getattr(item, "module", None), "DEV", None) in ("cuda", "cpu"):
            item.add_marker(pytest.mark.on_device)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


_CONTEXT_LOST = ("illegal memory access", "unspecified launch failure", "misaligned address",
                 "illegal instruction", "device-side assert")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A GPU fault (illegal memory access and the like) leaves the process's CUDA context
    unusable, so every later test in it would fail too and hide which test faulted.  Name the
    test and end the process: under pytest-xdist the controller reports that test as crashed
    and starts a fresh worker for the rest (without xdist the run ends there, the test named
    on stderr).  On a machine without CUDA it does nothing."""
    yield
    if call.excinfo is None or not torch.cuda.is_available():
        return
    text = str(call.excinfo.value)
    if any(s in text for s in _CONTEXT_LOST):
        first = (text.splitlines() or [""])[0]
        sys.stderr.write(f"\nCUDA context lost in {item.nodeid}: {first}\n")
        sys.stderr.flush()
        os._exit(3)


def pytest_runtest_logreport(report):
    """With ``FEATATTN_FAILURE_LOG=path``, append each failing test's name and traceback to that
    file as it happens (benchmarks/gpu_tests.sh sets it): a GPU run stopped by the device's
    time limit keeps its failures, where pytest-xdist's interrupted run prints no summary.
    Written by the controlling process only (workers' reports reach it too)."""
    path = os.environ.get("FEATATTN_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    with open(path, "a") as f:
        f.write(f"FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


class _Shard:
    """``FEATATTN_TEST_SHARD=i/n`` (1 <= i <= n): keep every n-th selected test, starting at
    the i-th, after the -m / -k selection (benchmarks/gpu_tests.sh's GPU_TESTS_SHARD), so
    that n runs, each inside the device machine's 10-minute limit, cover every GPU test once
    instead of each covering an arbitrary part."""

    def __init__(self, spec: str):
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            i = n = 0
        if not 1 <= i <= n:
            raise pytest.UsageError(f"FEATATTN_TEST_SHARD must be i/n with 1 <= i <= n (e.g. "
                                    f"1/2), got {spec!r}")
        self.i, self.n = i, n

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        keep = [it for j, it in enumerate(items) if j % self.n == self.i - 1]
        drop = [it for j, it in enumerate(items) if j % self.n != self.i - 1]
        if drop:
            config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_configure(config):
    spec = os.environ.get("FEATATTN_TEST_SHARD")
    if spec:
        config.pluginmanager.register(_Shard(spec), "featattn-test-shard")
