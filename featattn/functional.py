"""``linear_attention``: validate, apply the feature map, dispatch.

Shape legend: B batch, H query heads, Hkv key/value heads (Hkv divides H), T time,
Dqk raw q/k head dim, Dk expanded feature dim (``feature_map.output_dim(Dqk)``), Dv value dim.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, Optional, Tuple, Union, overload

import torch

from .chunked import chunked_linear_attention
from .dispatch import (Call, _check_backend, _unfusable_reason, hybrid_direct, needs_grad,
                       select, taylor_varlen_mode)
from .feature_maps import FeatureMap, TaylorFeatureMap, resolve_feature_map
from .reference import quadratic_linear_attention
from .state import LinearAttentionState, compute_dtype, no_autocast

__all__ = ["linear_attention", "decode_step"]


@overload
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    feature_map: Union[None, str, FeatureMap] = ..., normalize: bool = ..., eps: float = ...,
    scale: Optional[float] = ..., initial_state: Optional[LinearAttentionState] = ...,
    return_state: Literal[False] = ..., backend: str = ..., layout: str = ...,
    cu_seqlens: Optional[torch.Tensor] = ..., cp_group: Optional[Any] = ...,
    window: int = ..., window_weight: Union[None, float, torch.Tensor] = ...,
    window_scale: Optional[float] = ..., causal: bool = ...,
    key_padding_mask: Optional[torch.Tensor] = ...,
) -> torch.Tensor: ...


@overload
def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    feature_map: Union[None, str, FeatureMap] = ..., normalize: bool = ..., eps: float = ...,
    scale: Optional[float] = ..., initial_state: Optional[LinearAttentionState] = ...,
    return_state: Literal[True], backend: str = ..., layout: str = ...,
    cu_seqlens: Optional[torch.Tensor] = ..., cp_group: Optional[Any] = ...,
    window: int = ..., window_weight: Union[None, float, torch.Tensor] = ...,
    window_scale: Optional[float] = ..., causal: bool = ...,
    key_padding_mask: Optional[torch.Tensor] = ...,
) -> Tuple[torch.Tensor, LinearAttentionState]: ...


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    feature_map: Union[None, str, FeatureMap] = None,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    initial_state: Optional[LinearAttentionState] = None,
    return_state: bool = False,
    backend: str = "auto",
    layout: str = "bhtd",
    cu_seqlens: Optional[torch.Tensor] = None,
    cp_group: Optional[Any] = None,
    window: int = 0,
    window_weight: Union[None, float, torch.Tensor] = None,
    window_scale: Optional[float] = None,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, LinearAttentionState]]:
    """Causal linear attention.

    ``o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s / (phi(q_t) . sum_{s<=t} phi(k_s) + eps)``

    Args:
        q: ``[B, H, T, Dqk]`` queries.  Strided views (e.g. a ``[B, T, H, D]`` tensor
            transposed) are fine.
        k: ``[B, Hkv, T, Dqk]`` keys; Hkv must divide H (grouped-query attention: query head
            h reads k/v head ``h // (H // Hkv)``, without copying k/v).
        v: ``[B, Hkv, T, Dv]`` values; Dv may differ from Dqk.
        feature_map: None (q and k already are features), a registered name such as
            ``"elu"``, ``"taylor"``, ``"identity"``, ``"relu"``, or a :class:`FeatureMap`.
        normalize: divide by ``phi(q_t) . sum_{s<=t} phi(k_s) + eps``; False returns the
            numerator only.
        eps: added to the denominator (in fp32), > 0.
        scale: multiplies q before the feature map; None takes the map's default
            (``feature_map.default_scale(Dqk)``, 1 for every built-in map).
        initial_state: a :class:`LinearAttentionState` (kv ``[B, H, Dk, Dv]``, z
            ``[B, H, Dk]``) summarising an earlier prefix.
        return_state: also return the state after the last token.
        backend: ``"auto"``, ``"torch"`` (chunked PyTorch), ``"reference"`` (quadratic
            oracle), ``"triton"``, a kernel name (``"chunked"``, ``"taylor_parallel"``,
            ``"taylor_chunked"``) or an alias (``"equal_dim"``, ``"small_vhd"``,
            ``"taylor_fused"``).  See :func:`featattn.select_kernel`.
        layout: ``"bhtd"`` (the default, as above and as ``scaled_dot_product_attention``)
            or ``"bthd"``: q ``[B, T, H, Dqk]``, k ``[B, T, Hkv, Dqk]``, v ``[B, T, Hkv, Dv]``
            and o ``[B, T, H, Dv]`` (fla's and FlashAttention's layout), read and written in
            place, with no transpose copies.  The state's shapes do not change.
        cu_seqlens: None, or packed sequences: an int32/int64 tensor ``[N + 1]`` on q's
            device (``cu_seqlens[0] == 0``, strictly increasing, last entry the total T);
            q, k, v then hold N sequences back to back in a batch of one (``[1, H, T, D]``)
            and each is attended alone, as FlashAttention's and fla's ``cu_seqlens``.
            ``initial_state`` and the returned state are then per sequence (kv
            ``[N, H, Dk, Dv]``, z ``[N, H, Dk]``).  The Triton chunked kernel takes them
            natively; the other backends run the sequences one after another.
        cp_group: None, or a ``torch.distributed.ProcessGroup`` for context parallelism:
            each rank of the group holds a contiguous slice of one sequence (rank order is
            sequence order; only T may differ between ranks) and gets its slice of the whole
            sequence's output.  One all_gather of the ranks' states forward, one of their
            gradients backward (``B * H * Dk * (Dv + 1)`` fp32 values a rank, whatever T),
            plus a tiny one that checks the ranks agree.  ``initial_state`` is the whole
            sequence's (pass the same on every rank; each rank gets its full gradient); the
            returned state is the state after the rank's slice (the last rank's is the whole
            sequence's).  Every rank must make the call and, when it needs a gradient,
            backpropagate through it.  With ``cu_seqlens`` (the whole packed row's
            boundaries, the same on every rank, ending at the sum of the ranks' T) each rank
            holds a contiguous slice of the row: sequences may cross rank boundaries, and the
            rank returns the states of the sequences it holds a part of (each after its last
            token of it).  See docs/distributed.md.
        window: 0, or W > 0 for the hybrid layer (LoLCATs): a softmax over each query's last
            W keys (itself included) plus linear attention over every older key, under one
            denominator (docs/hybrid.md has the formula).  Needs ``normalize=True``.  The
            returned state then also holds the last W raw keys and values.
        window_weight: the mixing weight f in (0, 1) of the softmax part (the linear part
            gets 1 - f): a float, or a tensor ``[H]`` (learnable: FeatureAttention uses a
            sigmoid of a parameter).  Default 0.5.
        window_scale: multiplies the raw ``q . k`` of the softmax part (default
            ``1 / sqrt(Dqk)``); ``scale`` still scales q before the feature map.
        causal: True (the default); False lets every query read every key (encoders, vision,
            diffusion): ``o_t = phi(q_t) S / (phi(q_t) . z + eps)`` with ``S``, ``z`` summed
            over all T (plus ``initial_state``), two GEMMs a head in PyTorch on any device.
            The returned state is then the whole sequence's.
        key_padding_mask: None, or ``[B, T]`` bool (or 0/1 integers, as Hugging Face's
            ``attention_mask``): False marks padded keys, which then add nothing to any sum
            (their features and values are zeroed).  Outputs at padded positions are
            computed but meaningless.  For packed sequences use ``cu_seqlens`` instead.
            With ``window > 0`` each row's real tokens are attended as one packed sequence
            (the window counts real keys; outputs at padded positions are 0; every row needs
            a real token), as FlashAttention's varlen recipe does.

    Returns:
        o: ``[B, H, T, Dv]`` (``[B, T, H, Dv]`` with ``layout="bthd"``) in the input dtype,
        or ``(o, state)`` when ``return_state``.
        The state's kv/z are fp32 (float64 when the inputs are float64).
    """
    if layout == "bthd":
        q, k, v = _to_bhtd(q, "q"), _to_bhtd(k, "k"), _to_bhtd(v, "v")
    elif layout != "bhtd":
        raise ValueError(f"layout must be 'bhtd' ([B, H, T, D]) or 'bthd' ([B, T, H, D]), "
                         f"got {layout!r}")
    out = _linear_attention(q, k, v, feature_map, normalize, eps, scale, initial_state,
                            return_state, backend, cu_seqlens=cu_seqlens, cp_group=cp_group,
                            window=window, window_weight=window_weight,
                            window_scale=window_scale, causal=causal,
                            key_padding_mask=key_padding_mask)
    if layout == "bthd":
        if return_state:
            return out[0].transpose(1, 2), out[1]
        return out.transpose(1, 2)
    return out


def _to_bhtd(x, name):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"with layout='bthd', {name} must be 4-D ([B, T, H, D]), got {got}")
    return x.transpose(1, 2)


def _linear_attention(q, k, v, feature_map, normalize, eps, scale, initial_state, return_state,
                      backend, in_place=False, out_buf=None, cu_seqlens=None, cp_group=None,
                      window=0, window_weight=None, window_scale=None, causal=True,
                      key_padding_mask=None):
    """linear_attention on [B, H, T, D] views.  ``in_place``: the new state goes into
    ``initial_state``'s own tensors (decode_step); ``out_buf``: o is written there."""
    B, H, T, Dqk, Hkv, Dv = _validate_qkv(q, k, v)
    if out_buf is not None:
        _validate_out(out_buf, q, (B, H, T, Dv))
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(return_state, bool):
        raise TypeError(f"return_state must be a bool, got {type(return_state).__name__}")
    eps = _validate_eps(eps, q.dtype)
    _check_backend(backend)
    fm = _named_map(feature_map) if isinstance(feature_map, str) else resolve_feature_map(feature_map)
    scale = _validate_scale(scale, fm, Dqk)
    Dk = fm.output_dim(Dqk) if fm is not None else Dqk
    if fm is not None and (isinstance(Dk, bool) or not isinstance(Dk, numbers.Integral)
                           or Dk < 1):
        raise TypeError(f"feature map {fm.name!r} ({type(fm).__name__}): output_dim({Dqk}) must "
                        f"be an int >= 1, got {Dk!r}")
    cu = None
    n_states = B  # (the Call below keeps the tensors' batch: 1 for packed sequences)
    if cu_seqlens is not None:
        if in_place:
            raise ValueError("decode_step does not take packed sequences; call it per sequence")
        # with cp_group the last entry is the whole row's length, checked once the ranks' T
        # are known (featattn.distributed)
        cu = _validate_cu_seqlens(cu_seqlens, q, total=-1 if cp_group is not None else None)
        n_states = len(cu) - 1  # the states are per sequence
    kv0, z0 = _validate_state(initial_state, normalize, n_states, H, Dk, Dv, q.device)
    return_state = return_state or in_place
    window = _validate_window(window, window_weight, window_scale, normalize, initial_state,
                              q, k, v, cu, cp_group, in_place)
    if window:  # the defaults: f = 0.5, the softmax's scale 1 / sqrt(Dqk)
        window_weight = 0.5 if window_weight is None else window_weight
        window_scale = 1.0 / math.sqrt(Dqk) if window_scale is None else float(window_scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    for what, bad in (("window > 0", window > 0), ("cu_seqlens", cu is not None),
                      ("cp_group", cp_group is not None)):
        if what == "window > 0" and causal:  # (a key_padding_mask packs the rows, below)
            continue
        if bad and (not causal or key_padding_mask is not None):
            opt = "causal=False" if not causal else "key_padding_mask"
            raise ValueError(f"{opt} is not supported with {what}; "
                             + ("pack the sequences without padding (cu_seqlens) instead"
                                if what == "cu_seqlens" and causal else "call without it"))
    if key_padding_mask is not None and window:  # each row's real tokens as one sequence
        return _padded_window(q, k, v, key_padding_mask, fm, normalize, eps, scale,
                              initial_state, return_state, backend, window, window_weight,
                              window_scale)
    if key_padding_mask is not None:  # padded keys: zero features and values, then as usual
        keep = _validate_key_mask(key_padding_mask, q)
        q, k = _torch_map(fm, q * scale if scale != 1.0 else q, k, Dqk, Dk) if fm is not None \
            else ((q * scale if scale != 1.0 else q), k)
        k = k.masked_fill(~keep, 0.0)
        v = v.masked_fill(~keep, 0.0)
        fm, scale, Dqk = None, 1.0, Dk
    if cp_group is not None:
        return _context_parallel(q, k, v, fm, normalize, eps, scale, kv0, z0, initial_state,
                                 return_state, backend, cp_group, Dk, cu, cu_seqlens,
                                 window, window_weight, window_scale)

    if cu is not None:
        taylor_varlen_mode()  # a bad switch value raises whichever kernel runs
    call = Call(q.device, q.dtype, B, H, T, Dqk, Dk, Dv, fm,
                kv0 is not None or z0 is not None or return_state, kv0 is not None,
                needs_grad(q, k, v, initial_state, fm) or _weight_grad(window_weight),
                window, causal, Hkv, cu is not None)
    choice = select(call, backend)
    kernel = choice.name
    if not causal:
        return _noncausal(q, k, v, fm, normalize, eps, scale, kv0, z0, return_state, kernel,
                          Dqk, Dk)
    if window and cu is not None:
        return _hybrid_packed(q, k, v, fm, eps, scale, initial_state, kv0, z0, return_state,
                              kernel, window, window_weight, window_scale, Dqk, Dk, cu,
                              choice.map_path, cu_seqlens)
    if window:
        return _hybrid(q, k, v, fm, eps, scale, initial_state, kv0, z0, return_state, kernel,
                       window, window_weight, window_scale, Dqk, Dk, choice.map_path,
                       in_place=in_place, out_buf=out_buf)
    if cu is not None and not (kernel == "chunked" or (
            kernel == "taylor_chunked" and taylor_varlen_mode() == "native")):
        # no packed form: one sequence at a time
        return _per_sequence(q, k, v, fm, normalize, eps, scale, kv0, z0, return_state, backend, cu)
    # q, k, v and the state are validated above: the kernels' own checks are skipped
    if kernel == "recurrent_step":
        direct = in_place and _fp32_dense(kv0) and (z0 is None or _fp32_dense(z0))
        out, kv, z = _step(q, k, v, fm, scale, normalize, eps, kv0, z0, return_state or in_place,
                           kv_out=kv0 if direct else None, z_out=z0 if direct else None,
                           out=out_buf)
        if direct:
            return out
    elif kernel == "chunked":
        from .kernels import chunked_attention

        in_kernel, keps = {}, eps
        proj = fm.triton_projection() if choice.map_fused else None
        if proj is not None and choice.map_path == "kernel":  # a learned projection map,
            from .kernels import projected_attention  # inside its own kernels

            out, kv, z = projected_attention(
                q, k, v, proj, normalize=normalize, eps=eps, scale=scale, initial_kv=kv0,
                initial_z=z0, return_state=return_state, cu_seqlens=cu_seqlens, check=False)
        elif proj is not None:  # its Triton pass, then the chunked kernel on the features
            from .kernels import projected as _projected

            if _projected.pair_epilogue_applies(proj, q):  # both as one autograd node
                out, kv, z = _projected.projection_pass_attention(
                    q, k, v, proj, normalize=normalize, eps=eps, scale=scale, initial_kv=kv0,
                    initial_z=z0, return_state=return_state, cu_seqlens=cu_seqlens)
            else:
                q, k = _projected.projection_features(q, k, proj, scale)
                proj = None
        elif choice.map_path == "triton_pass":  # a Triton pass makes the features
            in_kernel = dict(feature_map=fm, scale=scale, map_pass=True)
        elif choice.map_path == "kernel":
            in_kernel = dict(feature_map=fm, scale=scale)
        elif choice.map_path == "identity":  # features = (scale * q, k): num and den both
            # scale with q, so o = num / (den + eps / scale), where eps / scale stays a
            # normal fp32 number (the kernels' den is fp32)
            if normalize and scale > 0 and _F32_TINY <= eps / scale <= _F32_MAX:
                keps = eps / scale
            elif scale != 1.0:
                q = q * scale
        elif fm is not None:  # the map's PyTorch form
            q, k = _torch_map(fm, q * scale if scale != 1.0 else q, k, Dqk, Dk)
        elif scale != 1.0:
            q = q * scale
        if proj is None:
            out, kv, z = chunked_attention(
                q, k, v, normalize=normalize, eps=keps, initial_kv=kv0, initial_z=z0,
                return_state=return_state, check=False, cu_seqlens=cu_seqlens, **in_kernel,
            )
    elif kernel in ("taylor_parallel", "taylor_chunked"):
        from .kernels import taylor_attention

        out, kv, z = taylor_attention(
            q * scale if scale != 1.0 else q, k, v, normalize=normalize, eps=eps,
            initial_kv=kv0, initial_z=z0, return_state=return_state,
            form=kernel.removeprefix("taylor_"), check=False, cu_seqlens=cu_seqlens,
        )
    else:
        if scale != 1.0:
            q = q * scale
        if fm is not None:
            q, k = _torch_map(fm, q, k, Dqk, Dk)
        fn = quadratic_linear_attention if kernel == "reference" else chunked_linear_attention
        out, kv, z = fn(
            q, k, v, normalize=normalize, eps=eps, initial_kv=kv0, initial_z=z0,
            return_state=return_state,
        )
    if in_place:  # any kernel: the new state into the caller's tensors (or onto its object)
        return _update_in_place(initial_state, {"kv": kv, "z": z}, out, out_buf)
    if return_state:
        return out, LinearAttentionState(kv, z)
    return out


def unpad_attend(q, k, v, keep, attend, return_state=False):
    """FlashAttention's varlen recipe: the real tokens of each row (``keep [B, T]`` bool,
    True = real) packed into one sequence each, ``attend(q, k, v, cu_seqlens)`` on
    ``[1, h, total, d]`` tensors, its output put back in place (0 at padded positions).
    ``attend`` returns o, or ``(o, state)`` with ``return_state`` (passed through)."""
    B, H, T, _ = q.shape
    idx = keep.reshape(-1).nonzero().squeeze(1)  # real tokens, row by row, in order

    def pack(x):  # [B, h, T, d] -> [1, h, total, d]
        h, d = x.shape[1], x.shape[3]
        return x.transpose(1, 2).reshape(B * T, h, d).index_select(0, idx).unsqueeze(0) \
            .transpose(1, 2)

    cu = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu[1:] = torch.cumsum(keep.sum(1), 0)
    res = attend(pack(q), pack(k), pack(v), cu)
    o, state = res if return_state else (res, None)
    Dv = o.shape[-1]
    full = o.new_zeros(B * T, H, Dv).index_copy(0, idx, o[0].transpose(0, 1))
    o = full.view(B, T, H, Dv).transpose(1, 2)
    return (o, state) if return_state else o


def _validate_key_mask(mask, q) -> torch.Tensor:
    """``[B, T]`` bool or 0/1 integers on q's device -> a bool ``[B, 1, T, 1]`` keep-mask."""
    B, _, T, _ = q.shape
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a [B, T] bool tensor (True = a real key), got "
                        f"{type(mask).__name__}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"key_padding_mask must be [B, T] = [{B}, {T}], got {tuple(mask.shape)}")
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"key_padding_mask must be bool (or 0/1 integers), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {q.device}; move it "
                         f"with .to(q.device)")
    return (mask if mask.dtype == torch.bool else mask != 0)[:, None, :, None]


@torch.compiler.disable
def _padded_window(q, k, v, key_padding_mask, fm, normalize, eps, scale, initial_state,
                   return_state, backend, window, window_weight, window_scale):
    """A hybrid call with a key_padding_mask: each row's real tokens packed as one sequence.
    Eager under torch.compile (its row lengths are read on the host, a graph break anyway;
    Inductor with dynamic shapes failed on the packing: "Exponent must be non-negative")."""
    T = q.shape[2]
    keep = _validate_key_mask(key_padding_mask, q)[:, 0, :, 0]
    lengths = keep.sum(1).tolist()  # (one host synchronisation)
    if min(lengths) == T:  # nothing padded: the batched call
        return _linear_attention(q, k, v, fm, normalize, eps, scale, initial_state,
                                 return_state, backend, window=window,
                                 window_weight=window_weight, window_scale=window_scale)
    if min(lengths) == 0:
        empty = [b for b, n in enumerate(lengths) if n == 0]
        raise ValueError(f"key_padding_mask with window > 0: rows {empty[:8]} have no real "
                         f"token (all padded); drop them")

    def packed(qp, kp, vp, cu_p):
        return _linear_attention(qp, kp, vp, fm, normalize, eps, scale, initial_state,
                                 return_state, backend, cu_seqlens=cu_p, window=window,
                                 window_weight=window_weight, window_scale=window_scale)

    return unpad_attend(q, k, v, keep, packed, return_state)


def _noncausal(q, k, v, fm, normalize, eps, scale, kv0, z0, return_state, kernel, Dqk, Dk):
    """``causal=False``: every query reads every key; ``S = phi(k)^T v`` and ``z = sum phi(k)``
    over all T (plus the initial state), then ``phi(q) S / (phi(q) . z + eps)``."""
    if fm is not None:
        q, k = _torch_map(fm, q * scale if scale != 1.0 else q, k, Dqk, Dk)
    elif scale != 1.0:
        q = q * scale
    if kernel == "reference":
        out, kv, z = quadratic_linear_attention(q, k, v, normalize=normalize, eps=eps,
                                                initial_kv=kv0, initial_z=z0,
                                                return_state=return_state, causal=False)
    else:
        out, kv, z = _noncausal_sums(q, k, v, kv0, z0, normalize, eps)
    if return_state:
        return out, LinearAttentionState(kv, z)
    return out


@no_autocast
def _noncausal_sums(q, k, v, kv0, z0, normalize, eps):
    """(o, kv, z) of ``causal=False`` on features, in the compute dtype (z None unless
    normalising)."""
    cd = compute_dtype(q, k, v, kv0, z0)
    G = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(cd), k.to(cd), v.to(cd)
    kv = kf.transpose(-1, -2) @ vf  # [B, Hkv, Dk, Dv]
    z = kf.sum(2)
    if G > 1:
        kv, z = kv.repeat_interleave(G, dim=1), z.repeat_interleave(G, dim=1)
    if kv0 is not None:
        kv = kv + kv0.to(cd)
        if z0 is not None:
            z = z + z0.to(cd)
    out = qf @ kv
    if normalize:
        out = out / ((qf * z.unsqueeze(2)).sum(-1, keepdim=True) + eps)
    return out.to(q.dtype), kv, (z if normalize else None)


def _validate_window(window, weight, wscale, normalize, state, q, k, v, cu, cp_group, in_place):
    """The hybrid options, checked; returns the window as an int (0: no window)."""
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"window must be an int >= 0 (0: no softmax window), got {window!r}")
    window = int(window)
    windowed_state = state is not None and getattr(state, "window_k", None) is not None
    if state is not None and (getattr(state, "window_v", None) is not None) != windowed_state:
        raise ValueError("initial_state has only one of window_k / window_v: a windowed state "
                         "holds both (the window's keys and values), an unwindowed one neither")
    if window == 0:
        if weight is not None or wscale is not None:
            raise ValueError("window_weight and window_scale only apply with window > 0")
        if windowed_state and in_place:
            raise ValueError("the state holds a softmax window's keys (it came from a call with "
                             "window > 0): pass the same window to decode_step "
                             "(decode_step(q, k, v, state, window=W, ...))")
        if windowed_state:
            raise ValueError("initial_state holds a softmax window's keys (it came from a call "
                             "with window > 0); pass the same window to every call sharing it")
        return 0
    if not normalize:
        raise ValueError("window > 0 (the hybrid layer) shares one denominator between the "
                         "softmax and linear parts: it needs normalize=True")
    if cp_group is not None and (cu is not None or windowed_state):
        what = "cu_seqlens" if cu is not None else "an initial_state holding window keys"
        raise ValueError(f"window > 0 with cp_group is not supported with {what} yet: split "
                         f"one sequence (no cu_seqlens) with a plain initial_state, or call "
                         f"without cp_group")
    H = q.shape[1]
    if weight is not None:
        if isinstance(weight, torch.Tensor):
            if weight.shape != (H,) or not weight.is_floating_point() or weight.device != q.device:
                raise ValueError(f"window_weight as a tensor must be a float [H] = [{H}] on "
                                 f"{q.device}, got {tuple(weight.shape)} {weight.dtype} on "
                                 f"{weight.device}")
            # checked where it costs no host synchronisation (a GPU tensor would stall the
            # stream on every call) and outside torch.compile (a data-dependent branch); 0 and 1
            # are allowed here, as a layer's sigmoid saturates to them in fp32
            if weight.device.type == "cpu" and not torch.compiler.is_compiling() \
                    and not bool(((weight >= 0) & (weight <= 1)).all()):
                raise ValueError(f"window_weight must be in [0, 1] for every head, got "
                                 f"{weight.detach().tolist()}")
        elif isinstance(weight, numbers.Real) and not isinstance(weight, bool):
            if not 0.0 < float(weight) < 1.0:
                raise ValueError(f"window_weight must be in (0, 1), got {weight!r}")
        else:
            raise TypeError(f"window_weight must be None, a float in (0, 1) or a tensor [H], "
                            f"got {type(weight).__name__}")
    if wscale is not None and (isinstance(wscale, bool) or not isinstance(wscale, numbers.Real)
                               or not math.isfinite(wscale) or wscale <= 0):
        raise ValueError(f"window_scale must be a positive finite float, got {wscale!r}")
    if windowed_state:
        wk, wv = state.window_k, state.window_v
        if not isinstance(wk, torch.Tensor) or not isinstance(wv, torch.Tensor):
            raise TypeError(f"initial_state.window_k / window_v must be tensors, got "
                            f"{type(wk).__name__} / {type(wv).__name__}")
        B, Hkv, _, Dqk = k.shape
        if cu is not None:
            B = len(cu) - 1  # one window per packed sequence
        P = wk.shape[2] if isinstance(wk, torch.Tensor) and wk.dim() == 4 else -1
        want_k, want_v = (B, Hkv, P, Dqk), (B, Hkv, P, v.shape[-1])
        if not isinstance(wv, torch.Tensor) or tuple(wk.shape) != want_k \
                or tuple(wv.shape) != want_v or not 0 < P <= window:
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                   for t in (wk, wv)]
            raise ValueError(f"initial_state.window_k / window_v must be [B, Hkv, P, Dqk] / "
                             f"[B, Hkv, P, Dv] with 0 < P <= window = {window}, got {got}")
        if any(t.dtype != q.dtype or t.device != q.device for t in (wk, wv)):
            raise ValueError(f"initial_state.window_k / window_v must be {q.dtype} on "
                             f"{q.device} like q, got {wk.dtype} on {wk.device} / {wv.dtype} on "
                             f"{wv.device}")
    return window


def _hybrid(q, k, v, fm, eps, scale, state, kv0, z0, return_state, kernel, window, weight,
            wscale, Dqk, Dk, map_path=None, in_place=False, out_buf=None):
    """The hybrid layer (featattn/hybrid.py): the window's earlier keys and values from the
    state ahead of this call's, the features of both, then the chunked path or the oracle
    (or, for a few tokens against a state, the step kernel).  ``in_place`` (decode_step):
    the new state goes into ``state``'s own tensors where they keep their shapes, else onto
    the object; o into ``out_buf`` when given."""
    if kernel == "recurrent_step":
        out, new = _hybrid_step(q, k, v, fm, eps, scale, state, kv0, z0, window, weight, wscale,
                                Dqk, in_place, out_buf)
    else:
        res = _hybrid_calls(q, k, v, fm, eps, scale, state, kv0, z0, return_state or in_place,
                            kernel, window, weight, wscale, Dqk, Dk, map_path)
        out, new = res if (return_state or in_place) else (res, None)
    if in_place:
        return _update_in_place(state, {n: getattr(new, n) for n in
                                        ("kv", "z", "window_k", "window_v")}, out, out_buf)
    return (out, new) if return_state else out


def _update_in_place(state, new: dict, out, out_buf):
    """decode_step's ending: each new state tensor (name -> tensor) copied into the caller's
    own where that one has its shape and dtype and is contiguous, else set on the caller's
    state object (an expanded view, a window that grew); o into ``out_buf`` when given."""
    for name, t in new.items():
        old = getattr(state, name)
        if t is None or t is old:
            continue
        if old is not None and old.shape == t.shape and old.dtype == t.dtype \
                and old.is_contiguous():
            old.copy_(t)
        else:
            setattr(state, name, t)
    if out_buf is not None and out_buf is not out:
        out_buf.copy_(out)
        out = out_buf
    return out


def _hybrid_step(q, k, v, fm, eps, scale, state, kv0, z0, window, weight, wscale, Dqk,
                 in_place, out_buf):
    """A few hybrid tokens against a state in the step kernel (featattn/kernels/decode.py):
    ``(o, new state)``.  In place (decode_step) it writes ``state``'s own tensors where it can:
    kv / z when fp32 and contiguous, the window's keys and values once the window is full
    (it then keeps its length)."""
    from .kernels.decode import hybrid_step

    wk = state.window_k if state is not None else None
    wv = state.window_v if state is not None else None
    P, T = (0 if wk is None else wk.shape[2]), q.shape[2]
    E = max(0, P + T - window)
    if isinstance(weight, torch.Tensor):
        weight = weight.float().contiguous()
    k, v, q = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v, q))
    if P and (wk.stride(-1) != 1 or wv.stride(-1) != 1):  # (then not updated in place)
        wk, wv = wk.contiguous(), wv.contiguous()
    step_map, fq, fke = None, None, None
    if fm is not None and _unfusable_reason(fm, Dqk) is None:
        step_map = fm  # elementwise: applied in the kernel
    elif fm is not None:  # any other map: its PyTorch form on the new queries and the keys
        # that leave the window (C rows 0 .. E - 1 of C = [window keys; k])
        if E <= P:
            ev = wk[:, :, :E] if P else k[:, :, :0]
        else:
            ev = torch.cat([wk, k[:, :, :E - P]], 2) if P else k[:, :, :E]
        fq, fke = _torch_map(fm, q * scale if scale != 1.0 else q, ev, Dqk, fm.output_dim(Dqk))
        fq = fq if fq.stride(-1) == 1 else fq.contiguous()
        fke = None if not E else fke if fke.stride(-1) == 1 else fke.contiguous()
    kv_in = kv0 if _fp32_dense(kv0) else kv0.float().contiguous()
    z_in = z0 if _fp32_dense(z0) else z0.float().contiguous()
    args = (q, k, v, kv_in, z_in, wk if P else None, wv if P else None)
    kw = dict(window=window, weight=weight, window_scale=wscale, eps=eps, feature_map=step_map,
              scale=scale if fm is None or step_map is not None else 1.0, fq=fq, fk_evict=fke)
    if torch.compiler.is_compiling():  # one opaque node, new tensors out (decode_step copies)
        from .kernels.decode import hybrid_step_compiled

        o, kv, z, nwk, nwv = hybrid_step_compiled(*args, **kw)
        return o, LinearAttentionState(kv, z, nwk, nwv)
    direct = in_place and kv_in is kv0 and z_in is z0
    full = in_place and P == window and all(
        x.stride(-1) == 1 and 0 not in x.stride() for x in (wk, wv))
    o, kv, z, nwk, nwv = hybrid_step(
        *args, **kw, kv_out=kv0 if direct else None, z_out=z0 if direct else None,
        window_k_out=wk if full else None, window_v_out=wv if full else None, out=out_buf)
    return o, LinearAttentionState(kv, z, nwk, nwv)


def _hybrid_calls(q, k, v, fm, eps, scale, state, kv0, z0, return_state, kernel, window, weight,
                  wscale, Dqk, Dk, map_path=None):
    """:func:`_hybrid` for whole calls: the chunked paths or the oracle."""
    from .hybrid import chunked_hybrid_attention
    from .reference import quadratic_hybrid_attention

    if state is not None and state.window_k is not None:
        k = torch.cat([state.window_k, k], dim=2)
        v = torch.cat([state.window_v, v], dim=2)
    # A window longer than every key sees them all: the same answer as a window of N keys,
    # without blocks of W x 2W.  The PyTorch path takes the direct O(T N) form for a few
    # queries (decoding) or T <= 2W (dispatch.hybrid_direct); the Triton kernels ("chunked",
    # which the dispatcher gives calls of more than HYBRID_DIRECT_MAX_T queries) any T.
    N, T = k.shape[2], q.shape[2]
    window = min(window, N)
    direct = kernel == "reference" or (kernel != "chunked" and hybrid_direct(T, window))
    fn = quadratic_hybrid_attention if direct else chunked_hybrid_attention
    if not direct and kernel == "chunked":  # FEATATTN_HYBRID_LINEAR=triton (dispatch)
        res = _hybrid_triton(q, k, v, fm, scale, kv0, z0, window, weight, wscale, eps, map_path,
                             return_state)
    else:
        if fm is not None:
            fq, fk = _torch_map(fm, q * scale if scale != 1.0 else q, k, Dqk, Dk)
        else:
            fq, fk = (q * scale if scale != 1.0 else q), k
        res = fn(q, k, v, fq, fk, window=window, weight=weight, scale=wscale, eps=eps,
                 initial_kv=kv0, initial_z=z0, return_state=return_state)
    out, kv, z = res
    if not return_state:
        return out
    keep = min(window, k.shape[2])
    # copies, not views: decode_step writes a full window in place (the caller's k / v must
    # not change), and a view would keep the whole call's k / v alive with the state
    return out, LinearAttentionState(kv, z, k[:, :, -keep:].clone(), v[:, :, -keep:].clone())


def _hybrid_triton(q, k, v, fm, scale, kv0, z0, window, weight, wscale, eps, map_path,
                   return_state, cu_seqlens=None, max_len=0):
    """Both parts in Triton (featattn/kernels/window.py): the linear part in the chunked
    kernel with its keys shifted by the window, the window's softmax and the shared
    denominator in the window kernels.  The map runs where the dispatcher put it
    (``map_path``: in the chunked kernel, a Triton pass, the projection pass, or PyTorch).
    ``cu_seqlens`` (int32 on q's device) / ``max_len``: packed sequences, each alone.
    Returns ``(o, kv, z)``."""
    from .kernels import hybrid_attention

    H = q.shape[1]
    if isinstance(weight, torch.Tensor):
        f = weight.float().contiguous()
    else:
        f = torch.full((H,), float(weight), dtype=torch.float32, device=q.device)
    fmap, features = "", None
    proj = fm.triton_projection() if fm is not None else None
    if fm is None or map_path == "identity":
        if scale != 1.0:
            features = (q * scale, k)
    elif map_path in ("kernel", "triton_pass") and proj is not None:
        from .kernels.projected import projection_features  # the projection's Triton pass

        features = projection_features(q, k, proj, scale)
    elif map_path in ("kernel", "triton_pass"):  # the hybrid's own pass: no map backward
        from .kernels.maps import fused_key

        fmap = fused_key(fm)
    else:
        features = _torch_map(fm, q * scale if scale != 1.0 else q, k, q.shape[-1],
                              fm.output_dim(q.shape[-1]))
    return hybrid_attention(q, k, v, weight=f, window=window, window_scale=wscale, eps=eps,
                            features=features, feature_map=fmap,
                            map_pass=map_path == "triton_pass", scale=scale if fmap else 1.0,
                            initial_kv=kv0, initial_z=z0, return_state=return_state,
                            cu_seqlens=cu_seqlens, max_len=max_len, check=False)


def _hybrid_packed(q, k, v, fm, eps, scale, state, kv0, z0, return_state, kernel, window,
                   weight, wscale, Dqk, Dk, cu, map_path=None, cu_seqlens=None):
    """The hybrid layer on packed sequences: each sequence alone (the window never crosses a
    boundary), outputs concatenated, states stacked.  A stacked state needs every sequence's
    window to hold the same number of tokens, min(window, tokens seen).  In Triton (the
    dispatcher chose ``chunked``) one launch of each kernel takes every sequence, unless the
    state holds window keys (then one call per sequence)."""
    N = len(cu) - 1
    held = state.window_k.shape[2] if state is not None and state.window_k is not None else 0
    if return_state:
        keep = {min(window, held + cu[n + 1] - cu[n]) for n in range(N)}
        if len(keep) > 1:
            short = [n for n in range(N) if held + cu[n + 1] - cu[n] < window]
            raise ValueError(
                f"return_state with window={window} and packed sequences (cu_seqlens, or the "
                f"rows of a key_padding_mask) stacks one window of keys per sequence, so every "
                f"sequence must have seen >= {window} tokens (or all the same number); "
                f"sequences {short[:8]} are shorter. Pack only sequences of at least {window} "
                f"tokens, or call per sequence to keep their states")
    if kernel == "chunked" and not held:
        lens = [cu[n + 1] - cu[n] for n in range(N)]
        cu_t = cu_seqlens.to(device=q.device, dtype=torch.int32)
        out, kv, z = _hybrid_triton(
            q, k, v, fm, scale, kv0, z0, window, weight, wscale, eps, map_path, return_state,
            cu_seqlens=cu_t, max_len=max(lens))
        if not return_state:
            return out
        P = min(window, min(lens))  # (every sequence keeps as many: checked above)
        rows = torch.tensor([e - P + i for e in cu[1:] for i in range(P)], device=q.device)
        win = lambda x: x[0, :, rows].unflatten(1, (N, P)).transpose(0, 1).contiguous()  # noqa: E731
        return out, LinearAttentionState(kv, z, win(k), win(v))
    outs, states = [], []
    for n in range(N):
        sl = slice(cu[n], cu[n + 1])
        st = None
        if state is not None:
            rows = slice(n, n + 1)
            st = LinearAttentionState(
                None if kv0 is None else kv0[rows], None if z0 is None else z0[rows],
                None if not held else state.window_k[rows],
                None if not held else state.window_v[rows])
        res = _hybrid(q[:, :, sl], k[:, :, sl], v[:, :, sl], fm, eps, scale, st,
                      None if st is None else st.kv, None if st is None else st.z,
                      return_state, kernel, window, weight, wscale, Dqk, Dk, map_path)
        o, s_n = res if return_state else (res, None)
        outs.append(o)
        states.append(s_n)
    out = torch.cat(outs, 2)
    if not return_state:
        return out
    cat = lambda name: torch.cat([getattr(s_n, name) for s_n in states])  # noqa: E731
    return out, LinearAttentionState(cat("kv"), cat("z"), cat("window_k"), cat("window_v"))


def _context_parallel(q, k, v, fm, normalize, eps, scale, kv0, z0, initial_state, return_state,
                      backend, group, Dk, cu=None, cu_seqlens=None, window=0, window_weight=None,
                      window_scale=None):
    """This rank's slice of one sequence split across ``group`` (featattn/distributed.py); with
    ``cu`` (the whole row's boundaries, the same on every rank) of a packed row.  With a
    window (one sequence): the earlier ranks' states less the W keys before the slice, which
    come as the state's window (:func:`featattn.distributed.window_initial_state`)."""
    from . import distributed as D

    D.check_group(group)
    state_grad = torch.is_grad_enabled() and initial_state is not None and any(
        t is not None and t.requires_grad for t in (initial_state.kv, initial_state.z))
    facts = D.call_facts(q, k, v, fm, normalize, Dk, kv0 is not None,
                         needs_grad(q, k, v, None, fm), return_state, cu, state_grad, window)
    Ts = D.agree(group, q.device, what=facts, share={"T": q.shape[2]})["T"]
    if cu is None:
        kv, z = D.slice_state(k, v, fm, normalize)
        if not window:
            state = LinearAttentionState(*D.rank_initial_state(kv, z, kv0, z0, group, q.shape[1]))
        else:  # the W keys before the slice are the window's, not yet the linear part's
            kv_r, z_r, wk, wv = D.window_initial_state(kv, z, kv0, z0, k, v, group, q.shape[1],
                                                       Ts, window)
            state = LinearAttentionState(kv_r, z_r)
            if wk.shape[2]:
                hkv, hz = D.slice_state(wk, wv, fm, normalize)
                G = q.shape[1] // k.shape[1]
                state = LinearAttentionState(kv_r - D._expand(hkv, G), z_r - D._expand(hz, G),
                                             wk, wv)
        return _linear_attention(q, k, v, fm, normalize, eps, scale, state, return_state,
                                 backend, window=window, window_weight=window_weight,
                                 window_scale=window_scale)
    _validate_cu_seqlens(cu_seqlens, q, total=sum(Ts))
    plan = D.packed_plan(cu, Ts, D.dist.get_rank(group))
    tail = slice(plan.tail_start, q.shape[2])  # this rank's part of its last sequence
    kv, z = D.slice_state(k[:, :, tail], v[:, :, tail], fm, normalize)
    kv_r, z_r = D.packed_initial_states(kv, z, kv0, z0, group, q.shape[1], plan)
    local_cu = torch.tensor(plan.local_cu, dtype=cu_seqlens.dtype, device=q.device)
    return _linear_attention(q, k, v, fm, normalize, eps, scale,
                             LinearAttentionState(kv_r, z_r), return_state, backend,
                             cu_seqlens=local_cu)


def _per_sequence(q, k, v, fm, normalize, eps, scale, kv0, z0, return_state, backend, cu):
    """Packed sequences through a backend without a packed form: each sequence alone, the
    outputs concatenated and the states stacked (autograd flows through the slices)."""
    outs, kvs, zs = [], [], []
    for n in range(len(cu) - 1):
        sl = slice(cu[n], cu[n + 1])
        st = None if kv0 is None else LinearAttentionState(kv0[n:n + 1], None if z0 is None else z0[n:n + 1])
        res = _linear_attention(q[:, :, sl], k[:, :, sl], v[:, :, sl], fm, normalize, eps, scale,
                                st, return_state, backend)
        o, s = res if return_state else (res, None)
        outs.append(o)
        if s is not None:
            kvs.append(s.kv)
            zs.append(s.z)
    out = torch.cat(outs, 2)
    if return_state:
        return out, LinearAttentionState(torch.cat(kvs), torch.cat(zs) if normalize else None)
    return out


def _validate_cu_seqlens(cu_seqlens, q, total: Optional[int] = None) -> list:
    """The boundaries of packed sequences as a Python list (one host synchronisation), after
    checking what FlashAttention's varlen interface expects.  ``total``: the length the last
    entry must equal when it is not q's own T (the whole sequence of a cp_group)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of int32/int64 boundaries [N + 1], "
                        f"got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64 (cumulative sequence lengths), got "
                        f"{cu_seqlens.dtype}; e.g. torch.tensor([0, 5, 12], dtype=torch.int32)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}; move it "
                         f"with cu_seqlens.to(q.device)")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v hold the packed sequences in a batch of one "
                         f"([1, H, total_T, D]); got B = {q.shape[0]}: pack them into one row")
    cu = cu_seqlens.tolist()
    T = q.shape[2]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]} (cu_seqlens = {cu[:8]}...)")
    bad = next((i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (every sequence >= 1 token): "
                         f"cu_seqlens[{bad - 1}] = {cu[bad - 1]}, cu_seqlens[{bad}] = {cu[bad]}")
    if total is None and cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at the total length T = {T} (dim 2 of q), got "
                         f"{cu[-1]}")
    if total is not None and total >= 0 and cu[-1] != total:
        raise ValueError(f"with cp_group, cu_seqlens holds the boundaries of the whole packed "
                         f"row, so it must end at the sum of the ranks' T, {total}; got "
                         f"{cu[-1]}")
    return cu


def _validate_out(out, q, want):
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want \
            or out.dtype != q.dtype or out.device != q.device:
        got = (tuple(out.shape), out.dtype, str(out.device)) \
            if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be shaped like the result, [B, H, T, Dv] = {list(want)} "
                         f"in the call's layout, {q.dtype} on {q.device}; got {got}")
    if any(st == 0 and n > 1 for st, n in zip(out.stride(), out.shape)):
        raise ValueError(f"out has a zero stride (strides {tuple(out.stride())}: an expanded "
                         f"view, where several results would share one element); pass a tensor "
                         f"of its own, e.g. torch.empty({list(want)})")
    if out.stride(-1) != 1 and out.shape[-1] > 1:
        raise ValueError(f"out must have a unit last stride (each row's Dv values side by side, "
                         f"as the kernels write them), got strides {tuple(out.stride())}; pass "
                         f"e.g. torch.empty({list(want)})")


def _weight_grad(weight) -> bool:
    """Whether autograd will differentiate a call through its window weight."""
    return isinstance(weight, torch.Tensor) and weight.requires_grad and torch.is_grad_enabled()


def _fp32_dense(t) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def _step(q, k, v, fm, scale, normalize, eps, kv0, z0, return_state, kv_out=None, z_out=None,
          out=None):
    """The recurrent step kernel (the dispatcher checked it can run this call)."""
    from .kernels import recurrent_step

    if fm is None and scale != 1.0:
        q = q * scale
    taylor = type(fm) is TaylorFeatureMap
    if torch.compiler.is_compiling():  # one opaque node that updates the state in place
        return _step_compiled(q, k, v, fm, scale, normalize, eps, kv0, z0, taylor, kv_out,
                              z_out, out)
    return recurrent_step(
        q, k, v, normalize=normalize, eps=eps, initial_kv=kv0.float().contiguous(),
        initial_z=None if z0 is None else z0.float().contiguous(),
        feature_map=None if (fm is None or taylor) else fm, scale=scale if fm is not None else 1.0,
        taylor=taylor, kv_out=kv_out, z_out=z_out, out=out,
        store_state=return_state or kv_out is not None)


def _step_compiled(q, k, v, fm, scale, normalize, eps, kv0, z0, taylor, kv_out, z_out, out):
    """The step kernel under torch.compile, as the in-place custom op: the new state goes
    into ``kv_out`` / ``z_out`` (fresh copies of the initial state when not given)."""
    from .kernels.decode import recurrent_step_inplace

    B, H, T, _ = q.shape
    kv = kv_out if kv_out is not None else kv0.float().clone(memory_format=torch.contiguous_format)
    if kv_out is not None and kv_out is not kv0:
        kv.copy_(kv0)
    z = None
    if normalize:
        z = z_out if z_out is not None else z0.float().clone(memory_format=torch.contiguous_format)
        if z_out is not None and z_out is not z0:
            z.copy_(z0)
    if out is None:
        out = torch.empty(B, H, T, v.shape[-1], dtype=q.dtype, device=q.device)
    recurrent_step_inplace(q, k, v, kv, z, out, normalize=normalize, eps=eps,
                           feature_map=None if (fm is None or taylor) else fm,
                           scale=scale if fm is not None else 1.0, taylor=taylor)
    return out, kv, z


def _torch_map(fm, q, k, Dqk, Dk):
    """The map's PyTorch form on (scaled) q and on k, its outputs checked."""
    fq, fk = fm.forward_query(q), fm.forward_key(k)
    _check_features(fm, fq, fk, Dqk, Dk, q, k)
    return fq, fk


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearAttentionState,
    *,
    feature_map: Union[None, str, FeatureMap] = None,
    normalize: bool = True,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    layout: str = "bhtd",
    window: int = 0,
    window_weight: Union[None, float, torch.Tensor] = None,
    window_scale: Optional[float] = None,
) -> torch.Tensor:
    """A few new tokens against ``state``, which is updated **in place**: decoding.

    Equal to ``o, new = linear_attention(q, k, v, ..., initial_state=state,
    return_state=True)`` followed by ``state = new``, but on CUDA (T <= 16 tokens, an
    elementwise map with a Triton form, ``"taylor"``, or features) it is one kernel launch
    that reads raw q/k, applies the map in registers and overwrites ``state.kv`` / ``state.z``:
    no allocation when ``out`` is given and the state is fp32 and contiguous, no host
    synchronisation, so a step can be captured in a CUDA graph and replayed
    (docs/decoding.md).  Elsewhere (CPU, other maps) the same result is computed by the usual
    path and copied into the state's tensors.

    With ``window=W > 0`` (the hybrid layer; the state then carries the last W raw keys and
    values) it is likewise one launch on CUDA for T <= 16 tokens (any map: an elementwise
    one applied in the kernel, others on the new queries and the keys leaving the window in
    PyTorch; dims up to 128): the window's keys and values move along in their own tensors
    once the window is full, the state's tensors are replaced on the object while it is
    still filling (the first W tokens).

    Args:
        q: ``[B, H, T, Dqk]`` (``[B, T, H, Dqk]`` with ``layout="bthd"``); k, v as in
            :func:`linear_attention`.
        state: the :class:`LinearAttentionState` of the tokens so far (``kv [B, H, Dk, Dv]``,
            ``z [B, H, Dk]`` when normalising), e.g. from a prefill with ``return_state=True``
            or ``LinearAttentionState.zeros``.  Its tensors are overwritten (a tensor that
            cannot be written in place, such as an expanded view, is replaced on the object).
        out: optional buffer for o, shaped like the result, of q's dtype.
        feature_map, normalize, eps, scale, backend, layout, window, window_weight,
            window_scale: as in :func:`linear_attention` (the window that made the state).

    Returns:
        o: ``[B, H, T, Dv]`` (``[B, T, H, Dv]`` with ``layout="bthd"``); ``out`` itself when
        given.

    Raises:
        ValueError: as :func:`linear_attention`, and when autograd would have to
        differentiate the call (an in-place update cannot be; train with linear_attention
        and ``return_state=True``).
    """
    if not isinstance(state, LinearAttentionState):
        raise TypeError(f"state must be a featattn.LinearAttentionState (from a prefill with "
                        f"return_state=True, or LinearAttentionState.zeros), got "
                        f"{type(state).__name__}")
    out_bhtd = out
    if layout == "bthd":
        q, k, v = _to_bhtd(q, "q"), _to_bhtd(k, "k"), _to_bhtd(v, "v")
        out_bhtd = None if out is None else _to_bhtd(out, "out")
    elif layout != "bhtd":
        raise ValueError(f"layout must be 'bhtd' ([B, H, T, D]) or 'bthd' ([B, T, H, D]), "
                         f"got {layout!r}")
    fm = _named_map(feature_map) if isinstance(feature_map, str) else resolve_feature_map(feature_map)
    if needs_grad(q, k, v, state, fm) or _weight_grad(window_weight):
        raise ValueError(
            "decode_step updates the state in place, which autograd cannot differentiate, and "
            "an input requires a gradient; run it under torch.no_grad() (decoding), or use "
            "linear_attention(..., initial_state=state, return_state=True) to train")
    o = _linear_attention(q, k, v, fm, normalize, eps, scale, state, False, backend,
                          in_place=True, out_buf=out_bhtd, window=window,
                          window_weight=window_weight, window_scale=window_scale)
    if out is not None:
        return out
    return o.transpose(1, 2) if layout == "bthd" else o


_NAMED: dict = {}


def _named_map(name: str) -> FeatureMap:
    """The map registered as ``name``, one instance per registered class: building an
    nn.Module on every call cost host time.  Maps with parameters or state are built fresh
    (an instance must not be shared), as is any class whose constructor needs arguments."""
    from .feature_maps.registry import _REGISTRY

    cls = _REGISTRY.get(name)
    hit = _NAMED.get(name)
    if hit is not None and type(hit) is cls:
        return hit
    fm = resolve_feature_map(name)
    if not any(True for _ in fm.parameters()) and not any(True for _ in fm.buffers()):
        _NAMED[name] = fm
    return fm


# --------------------------------------------------------------------------- validation


def _validate_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{name} must be 4-D ([B, H, T, D]), got shape {tuple(t.shape)}; "
                "for [B, T, H, D] tensors pass x.transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), "
                f"got {t.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}; "
            "cast them to one dtype first"
        )
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}"
        )
    B, H, T, Dqk = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    Bv, Hv, Tv, Dv = v.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: q {B}, k {Bk}, v {Bv} (dim 0 of [B, H, T, D])")
    if not (T == Tk == Tv):
        raise ValueError(f"sequence lengths differ: q {T}, k {Tk}, v {Tv} (dim 2 of [B, H, T, D])")
    if T < 1:
        raise ValueError(f"sequence length T must be >= 1, got {T}")
    if Dk != Dqk:
        raise ValueError(f"q and k head dims differ: q {Dqk}, k {Dk} (dim 3); they must match")
    if Hkv != Hv:
        raise ValueError(f"k and v must have the same number of heads, got k {Hkv}, v {Hv}")
    if H < 1 or Hkv < 1:
        raise ValueError(
            f"q, k and v need at least one head (dim 1 of [B, H, T, D]), got q {H}, k/v {Hkv}"
        )
    if Dqk < 1 or Dv < 1:
        raise ValueError(
            f"head dims must be >= 1 (dim 3 of [B, H, T, D]), got q/k {Dqk}, v {Dv}"
        )
    if H % Hkv != 0:
        raise ValueError(
            f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hkv})"
        )
    return B, H, T, Dqk, Hkv, Dv


def _validate_eps(eps, dtype: Optional[torch.dtype] = None) -> float:
    """``eps`` as a float; with ``dtype`` (the inputs'), also > 0 once in the accumulation
    dtype (fp32, float64 for float64 inputs): 1e-50 passes ``> 0`` but is 0 in fp32, and a
    zero denominator then gives NaN.  The bound is the smallest *normal* number, because GPU
    kernels flush subnormals to zero.

    Under torch.compile(dynamic=True) a float attribute such as a layer's eps is traced as a
    symbolic float, on which ``math.isfinite`` and ``float()`` break the graph or specialise
    it: the checks then run in eager calls only (FeatureAttention checks its eps when
    built)."""
    if torch.compiler.is_compiling():
        return eps
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__} {eps!r}")
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite float > 0, got {eps!r} (the default is 1e-6)")
    if dtype is not None:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        tiny = torch.finfo(acc).tiny
        if eps < tiny:
            raise ValueError(
                f"eps={eps!r} is 0 once added in {acc} (the denominator's dtype for {dtype} "
                f"inputs; its smallest normal number is {tiny:.3g}), so it would not keep the "
                f"denominator away from 0; use eps >= {tiny:.3g} (the default is 1e-6)")
    return eps


_F32_TINY, _F32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max


def _validate_scale(scale, fm, Dqk) -> float:
    if scale is None:
        return float(fm.default_scale(Dqk)) if fm is not None else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale!r}")
    return scale


def _validate_state(state, normalize, B, H, Dk, Dv, device):
    if state is None:
        return None, None
    if not isinstance(state, LinearAttentionState):
        raise TypeError(
            f"initial_state must be a featattn.LinearAttentionState, got {type(state).__name__}"
        )
    kv, z = state.kv, state.z
    if not isinstance(kv, torch.Tensor) or tuple(kv.shape) != (B, H, Dk, Dv):
        got = tuple(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise ValueError(
            f"initial_state.kv must have shape [B, H, Dk, Dv] = {[B, H, Dk, Dv]} (Dk is the "
            f"expanded feature dim), got {got}"
        )
    if kv.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"initial_state.kv must be float32 (or float64), got {kv.dtype}")
    if kv.device != device:
        raise ValueError(f"initial_state is on {kv.device} but q is on {device}")
    if normalize and z is None:
        raise ValueError(
            "initial_state has no z (it came from a normalize=False call) but normalize=True; "
            "use the same normalize setting for every call that shares a state"
        )
    if not normalize and z is not None:
        raise ValueError(
            "initial_state carries z (it came from a normalize=True call) but normalize=False; "
            "use the same normalize setting for every call that shares a state"
        )
    if z is not None:
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != (B, H, Dk):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"initial_state.z must have shape [B, H, Dk] = {[B, H, Dk]}, got {got}")
        if z.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"initial_state.z must be float32 (or float64), got {z.dtype}")
        if z.device != device:
            raise ValueError(f"initial_state.z is on {z.device} but q is on {device}")
    return kv, z


def _check_features(fm, q, k, Dqk, Dk, q_in, k_in):
    """A feature map's outputs: tensors shaped like its inputs but for the last dim (Dk),
    in the inputs' dtype (a float64 result for fp32 inputs would silently change the
    output's dtype)."""
    what = f"feature map {fm.name!r} ({type(fm).__name__})"
    for name, f, x in (("q", q, q_in), ("k", k, k_in)):
        if not isinstance(f, torch.Tensor):
            raise TypeError(
                f"{what} must return one tensor for {name}, got {type(f).__name__}; "
                "return the features alone from forward()"
            )
        if tuple(f.shape[:-1]) != tuple(x.shape[:-1]):
            raise ValueError(
                f"{what} must keep every dim but the last: {name} {tuple(x.shape)} became "
                f"{tuple(f.shape)} (expected {tuple(x.shape[:-1]) + (Dk,)}); a map acts on "
                "each token's head vector alone"
            )
        if f.dtype != x.dtype:
            raise TypeError(
                f"{what} returned {f.dtype} {name} features for {x.dtype} inputs; return "
                f"the input dtype (e.g. compute in fp32, then .to(x.dtype))"
            )
    if q.shape[-1] != Dk or k.shape[-1] != Dk:
        raise ValueError(
            f"feature map {fm.name!r} ({type(fm).__name__}) declares output_dim({Dqk}) = {Dk} but "
            f"produced q features of size {q.shape[-1]} and k features of size {k.shape[-1]}; "
            "fix its output_dim"
        )
