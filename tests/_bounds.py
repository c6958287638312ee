"""A bounds-checked Triton interpreter, installed by conftest.py under TRITON_INTERPRET=1.

On the GPU a load or store outside every allocation faults (illegal memory access) and one
inside another tensor silently reads or corrupts it; the interpreter does neither: it reads
and writes whatever host memory an address names.  So every kernel launch here records the
storages of its tensor arguments, and every load or store checks that each address it
touches (its mask's lanes only) lies inside one of them, raising :class:`OutOfBounds`
otherwise.  Limits: storage bounds (an access past a view but inside its storage, or inside
another argument, still passes); the interpreter's single tile config; masked loads and
stores only (no kernel here uses atomics); faults of the GPU compiler are not seen (the
map-in-kernel split of session 15 passed here and faulted on the H200).  It patches the
interpreter's internals (triton.runtime.interpreter, checked on Triton 3.9): if they move,
install() leaves the interpreter alone and tests/kernels/test_bounds.py fails, saying so.
"""

from __future__ import annotations

import numpy as np


class OutOfBounds(IndexError):
    """A kernel touched memory outside every tensor it was given."""


def _storages(x, out):
    if isinstance(x, (tuple, list)):
        for y in x:
            _storages(y, out)
    elif hasattr(x, "untyped_storage"):
        st = x.untyped_storage()
        out.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
    elif hasattr(x, "base") and hasattr(x.base, "untyped_storage"):  # tensor descriptors
        _storages(x.base, out)


#: Why install() could not patch this Triton's interpreter (None: installed or not tried).
UNAVAILABLE = None


def install() -> bool:
    """Patch triton.runtime.interpreter (idempotent).  Returns False, with the reason in
    :data:`UNAVAILABLE`, when this Triton's interpreter lacks the internals it patches: the
    suite then runs unchecked and tests/kernels/test_bounds.py fails, naming the reason."""
    global UNAVAILABLE
    import inspect

    from triton.runtime import interpreter as interp

    if getattr(interp, "_featattn_bounds", False):
        return True
    want = {(getattr(interp, "GridExecutor", None), "_init_args_hst"): 3,
            (getattr(interp, "InterpreterBuilder", None), "create_masked_load"): 6,
            (getattr(interp, "InterpreterBuilder", None), "create_masked_store"): 5}
    for (owner, name), n in want.items():
        fn = getattr(owner, name, None)
        if fn is None or len(inspect.signature(fn).parameters) != n \
                or not hasattr(interp, "_get_np_dtype"):
            UNAVAILABLE = (f"triton.runtime.interpreter has no {name}({n - 1} arguments) or "
                           f"_get_np_dtype as tests/_bounds.py expects (Triton "
                           f"{getattr(__import__('triton'), '__version__', '?')})")
            return False
    launch = {"ranges": [], "kernel": "?"}
    init_args = interp.GridExecutor._init_args_hst

    def _init_args_hst(self, args_dev, kwargs):
        args, kw = init_args(self, args_dev, kwargs)
        ranges = []
        _storages(list(args) + list(kw.values()), ranges)
        launch["ranges"], launch["kernel"] = ranges, getattr(self.fn, "__name__", "?")
        return args, kw

    def check(kind, ptrs, mask):
        p = np.asarray(ptrs.data).astype(np.uint64)
        p = p[np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape)]
        if p.size == 0:
            return
        size = np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        ok = np.zeros(p.shape, dtype=bool)
        for lo, hi in launch["ranges"]:
            ok |= (p >= lo) & (p + size <= hi)
        if not ok.all():
            bad = p[~ok]
            raise OutOfBounds(
                f"{launch['kernel']}: a {kind} of {bad.size} element(s) outside every tensor "
                f"argument (first address {int(bad[0]):#x}); on a GPU this is an illegal memory "
                f"access or a silent read / write of other memory: check the offsets and masks")

    builder = interp.InterpreterBuilder
    load, store = builder.create_masked_load, builder.create_masked_store

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def create_masked_store(self, ptrs, value, mask, cache_policy):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, cache_policy)

    interp.GridExecutor._init_args_hst = _init_args_hst
    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    interp._featattn_bounds = True
    return True
