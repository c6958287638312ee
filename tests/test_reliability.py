"""Regression tests of the reliability issue (#13): tuned-config cache keys, double backward,
many head dims in one process on the GPU."""

import pytest
import torch

from featattn.kernels import _common


def _chunked():
    from featattn.kernels import chunked

    return chunked


@pytest.mark.parametrize("positional", [True, False])
def test_tuned_launch_keys_on_the_autotuners_declared_key(positional):
    """Head dims passed by position must give their own cache entries: a config tuned for
    one Dk is not valid (shared memory) for another."""
    ch = _chunked()
    launch = ch._FWD
    names = list(launch.tuner.arg_names)
    args = [None] * names.index("DK") + [33, 40]  # DK, DV by position
    key_pos = launch.cache_key(tuple(args) if positional else (), {} if positional else
                               {"DK": 33, "DV": 40})
    other = launch.cache_key(tuple(args[:-2] + [96, 96]) if positional else (),
                             {} if positional else {"DK": 96, "DV": 96})
    assert key_pos != other
    assert 33 in key_pos and 40 in key_pos


def test_tuned_launch_caches_one_config_per_head_dim_pair():
    from featattn.kernels import chunked_attention

    ch = _chunked()
    ch._FWD.best.clear()
    seen = []
    # all in one tile bucket (BK = BV = 32): only DK / DV themselves tell them apart
    for dk, dv in ((20, 20), (24, 20), (20, 28), (24, 20)):
        q, k, v = (torch.randn(1, 1, 5, d) for d in (dk, dk, dv))
        chunked_attention(q, k, v, normalize=True, eps=1e-6)
        seen.append(len(ch._FWD.best))
    assert seen == [1, 2, 3, 3], seen
    dims = {(key[0], key[1]) for key in ch._FWD.best}
    assert dims == {(20, 20), (24, 20), (20, 28)}, dims


def test_tuned_launch_keys_include_tensor_dtypes():
    ch = _chunked()
    names = list(ch._FWD.tuner.arg_names)
    a32 = [torch.empty(1)] + [None] * (names.index("DK") - 1) + [16, 16]
    a16 = [torch.empty(1, dtype=torch.float16)] + a32[1:]
    assert ch._FWD.cache_key(tuple(a32), {}) != ch._FWD.cache_key(tuple(a16), {})
