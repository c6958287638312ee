"""``featattn info``: what featattn finds here: versions, the device, the kernel the dispatcher
picks for a few representative calls, and the switches (environment variables) in force.

Fast by construction: :func:`featattn.select_kernel` reads only shapes, dtypes and devices, so
nothing is compiled or launched, and the sample tensors are one element expanded to their shape.
"""

from __future__ import annotations

import importlib
import os
import platform
import sys
from typing import List, NamedTuple, Optional, Tuple

import torch

__all__ = ["CALLS", "SAMPLE_BHT", "Call", "KernelRow", "versions", "device_rows", "sample_dtype",
           "kernel_rows", "backend_rows", "switch_rows"]

#: (B, H, T) of the sample calls: one long sequence of a mid-sized model (on CUDA, whether T
#: is split into segments, and so where an elementwise map runs, depends on it)
SAMPLE_BHT = (1, 8, 4096)


class Call(NamedTuple):
    """A representative ``linear_attention`` call: a label, the feature map, raw q/k and v
    head dims."""

    label: str
    feature_map: Optional[str]
    dqk: int
    dv: int


#: the calls whose kernel ``featattn info`` shows (taylor: the layer's default 16 dims per
#: head; hedgehog: learnable, 2 * 64 features)
CALLS = (
    Call("no map", None, 64, 64),
    Call("elu", "elu", 64, 64),
    Call("taylor", "taylor", 16, 64),
    Call("hedgehog", "hedgehog", 64, 64),
)

#: the sample call each ``backend=`` is asked about (the others: "no map")
_BACKEND_CALL = {"taylor_fused": "taylor", "taylor_parallel": "taylor", "taylor_chunked": "taylor",
                 "small_vhd": "hedgehog", "recurrent_step": "elu"}


class KernelRow(NamedTuple):
    call: Call
    kernel: Optional[str]          # None: select_kernel raised (``reasons`` holds why)
    map_path: Optional[str]
    reasons: Tuple[str, ...]


# --------------------------------------------------------------------------- versions


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _module_version(name: str) -> Tuple[str, str]:
    """(version, location) of an importable module; never raises."""
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name == name:
            return "not installed", "-"
        return f"not importable ({_first_line(e)})", "-"
    except Exception as e:  # a broken install must not break `featattn info`
        return f"not importable ({_first_line(e)})", "-"
    where = os.path.dirname(getattr(mod, "__file__", None) or "") or "-"
    return str(getattr(mod, "__version__", "unknown")), where


def versions() -> List[Tuple[str, str, str]]:
    """(name, version, location) of featattn, Python, torch, triton and transformers."""
    import featattn

    rows = [("featattn", featattn.__version__, os.path.dirname(featattn.__file__)),
            ("python", platform.python_version(), sys.executable)]
    rows += [(name, *_module_version(name)) for name in ("torch", "triton", "transformers")]
    return rows


# --------------------------------------------------------------------------- device


def _cpu_name() -> str:
    try:  # Linux: the model name; platform.processor() is often just the architecture
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_rows(device: torch.device) -> List[Tuple[str, str]]:
    """(field, value) rows describing ``device`` and the CUDA setup."""
    rows = [("device", str(device))]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        major, minor = torch.cuda.get_device_capability(device)
        rows += [("name", torch.cuda.get_device_name(device)),
                 ("capability", f"{major}.{minor} (sm_{major}{minor})"),
                 ("memory", f"{props.total_memory / 2**30:.1f} GiB"),
                 ("multiprocessors", str(props.multi_processor_count))]
    else:
        rows += [("name", _cpu_name()),
                 ("threads", f"{torch.get_num_threads()} (torch)")]
    if torch.version.cuda is None:
        cuda = "not available (this torch is a CPU build)"
    elif torch.cuda.is_available():
        cuda = f"{torch.cuda.device_count()} device(s), CUDA {torch.version.cuda}"
    else:
        cuda = f"not available (torch built with CUDA {torch.version.cuda}, no device found)"
    rows.append(("cuda", cuda))
    return rows


# --------------------------------------------------------------------------- kernels


def sample_dtype(device: torch.device) -> torch.dtype:
    """What a model would run in: bfloat16 on CUDA, float32 on the CPU (as ``featattn bench``)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _tensor(device, dtype, heads: int, dim: int) -> torch.Tensor:
    B, _, T = SAMPLE_BHT
    # select_kernel reads shape, dtype and device only: one element, expanded, is enough
    return torch.zeros((), device=device, dtype=dtype).expand(B, heads, T, dim)


def _feature_map(call: Call):
    """The call's map, sized like a layer would size it (hedgehog is learnable)."""
    if call.feature_map is None:
        return None
    from ..feature_maps import build_feature_map

    H = SAMPLE_BHT[1]
    return build_feature_map(call.feature_map, call.dqk, H, H)


def _select(call: Call, device, dtype, backend: str = "auto"):
    from .. import select_kernel

    H = SAMPLE_BHT[1]
    q = _tensor(device, dtype, H, call.dqk)
    v = _tensor(device, dtype, H, call.dv)
    return select_kernel(q, q, v, feature_map=_feature_map(call), backend=backend)


def kernel_rows(device: torch.device) -> List[KernelRow]:
    """The kernel ``backend="auto"`` picks for each of :data:`CALLS` on ``device``.  An error
    (a switch set to a bad value, say) is reported in the row, not raised."""
    dtype = sample_dtype(device)
    rows = []
    for call in CALLS:
        try:
            choice = _select(call, device, dtype)
        except Exception as e:
            rows.append(KernelRow(call, None, None, (f"error: {_first_line(e)}",)))
            continue
        rows.append(KernelRow(call, choice.name, choice.map_path, tuple(choice.reasons)))
    return rows


def backend_rows(device: torch.device) -> List[Tuple[str, str, Optional[str], str]]:
    """(backend, sample call, kernel or None, why not) for every ``backend=`` value: whether
    forcing it works on ``device`` (``backend="triton"`` or a kernel name raises where it
    cannot run; that message is the why)."""
    from ..dispatch import BACKENDS, KernelUnavailable

    dtype = sample_dtype(device)
    calls = {c.label: c for c in CALLS}
    rows = []
    for backend in BACKENDS:
        call = calls[_BACKEND_CALL.get(backend, "no map")]
        try:
            choice = _select(call, device, dtype, backend)
        except KernelUnavailable as e:  # the dispatcher's reasons, one per kernel tried
            rows.append((backend, call.label, None, "; ".join(e.reasons)))
            continue
        except Exception as e:
            rows.append((backend, call.label, None, _first_line(e)))
            continue
        rows.append((backend, call.label, choice.name, ""))
    return rows


# --------------------------------------------------------------------------- switches


def switch_rows() -> List[Tuple[str, str, str, str, str]]:
    """(name, value, default, state, read at) for every declared switch; state is
    ``default`` (not set), ``set`` or ``set (= default)``."""
    from .. import _switches

    rows = []
    for name, s in _switches.SWITCHES.items():
        value = _switches.read(name)
        if name not in os.environ:
            state = "default"
        elif value == s.default:
            state = "set (= default)"
        else:
            state = "set"
        rows.append((name, value, s.default, state, s.when))
    return rows
