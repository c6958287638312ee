"""The bounds-checked interpreter (tests/_bounds.py) catches what a GPU would fault on."""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the interpreter's bounds checking")


def test_the_checker_is_installed():
    import _bounds

    assert _bounds.install(), _bounds.UNAVAILABLE


def test_an_access_past_every_tensor_fails():
    import triton
    import triton.language as tl
    from _bounds import OutOfBounds

    @triton.jit
    def copy16(x, y, shift, N: tl.constexpr):
        offs = tl.arange(0, 16)
        tl.store(y + offs, tl.load(x + offs + shift, mask=offs < N))

    x, y = torch.arange(16.0), torch.zeros(16)
    copy16[(1,)](x, y, 0, 16)
    assert torch.equal(y, x)
    copy16[(1,)](x, y, 8, 8)  # the lanes past 8 are masked off: fine
    with pytest.raises(Exception, match="OutOfBounds.*load of 8 element"):
        copy16[(1,)](x, y, 8, 16)
    assert issubclass(OutOfBounds, IndexError)
