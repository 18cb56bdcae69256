"""pcg::fused_moe (the expert MLPs of an MoE layer) and its helper pcg::moe_align."""
from __future__ import annotations

import functools
import operator
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ._checks import same_device

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swigluoai")

#: The w13 row layout (``w13_block``) with which the CUTLASS path applies the
#: activation inside GEMM1 (csrc/moe/fused_moe.h: kFusedW13Block): what
#: :func:`pcg.wrap` gives transformers experts and pcg's built-in model uses
#: when ``I % 8 == 0`` (:class:`pcg.nn.MoE` takes it as ``w13_block``).
FUSED_W13_BLOCK = 8


def w13_block_for(I: int, block: int = FUSED_W13_BLOCK) -> int:
    """The w13 layout pcg gives intermediate size ``I``: ``block`` when it
    divides I, else 0 (gate rows, then up rows)."""
    return block if block > 0 and I % block == 0 else 0


def _check_w13_block(block: int, I: int, who: str = "pcg::fused_moe") -> None:
    if not (block == 0 or (block >= 8 and block & (block - 1) == 0 and I % block == 0)):
        raise ValueError(f"{who}: argument 'w13_block' must be 0 (gate rows, then up rows) or a "
                         f"power of two >= 8 that divides I = {I}, got {block}")


def interleave_w13(w13: torch.Tensor, block: int = FUSED_W13_BLOCK) -> torch.Tensor:
    """w13 [..., 2I, H] with gate rows 0..I-1 then up rows I..2I-1 -> the block
    layout of ``fused_moe(..., w13_block=block)``: ``block`` gate rows, then
    ``block`` up rows, alternating (gate row n at ``(n // block) * 2 * block +
    n % block``, up row n ``block`` rows later). fused_moe's b13 keeps the plain
    layout. Returns a new contiguous tensor; ``block == 0`` returns w13 itself."""
    return _regroup(w13, block, to_blocks=True)


def deinterleave_w13(w13: torch.Tensor, block: int = FUSED_W13_BLOCK) -> torch.Tensor:
    """The inverse of :func:`interleave_w13`."""
    return _regroup(w13, block, to_blocks=False)


def _regroup(w: torch.Tensor, block: int, to_blocks: bool) -> torch.Tensor:
    if block == 0:
        return w
    who = "pcg.interleave_w13" if to_blocks else "pcg.deinterleave_w13"
    if w.dim() < 2 or w.shape[-2] % 2:
        raise ValueError(f"{who}: argument 'w13' must be [..., 2I, H], got shape {tuple(w.shape)}")
    lead, two_i, H = w.shape[:-2], w.shape[-2], w.shape[-1]
    _check_w13_block(block, two_i // 2, who)
    nb = two_i // 2 // block
    if to_blocks:  # [2, nb, B] -> [nb, 2, B]
        v = w.reshape(*lead, 2, nb, block, H).transpose(-4, -3)
    else:          # [nb, 2, B] -> [2, nb, B]
        v = w.reshape(*lead, nb, 2, block, H).transpose(-4, -3)
    return v.reshape(w.shape).contiguous()


def _check(cond: bool, arg: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"pcg::fused_moe: argument '{arg}' {msg}")


@torch.library.register_fake("pcg::fused_moe")
def _fused_moe_fake(hidden, w13, w2, topk_weights, topk_ids, expert_map=None, num_valid=None,
                    b13=None, b2=None, activation="silu", alpha=1.702, limit=7.0, config=None,
                    w13_block=0):
    same_device("fused_moe", hidden=hidden, w13=w13, w2=w2, topk_weights=topk_weights,
                topk_ids=topk_ids, expert_map=expert_map, num_valid=num_valid, b13=b13, b2=b2)
    _check(topk_weights.dtype == torch.float32, "topk_weights",
           f"must have dtype float32, got {topk_weights.dtype}")
    _check(topk_ids.dtype == torch.int32, "topk_ids", f"must have dtype int32, got {topk_ids.dtype}")
    _check(hidden.dim() == 2, "hidden", f"must be 2-D [T, H], got shape {tuple(hidden.shape)}")
    _check(w13.dim() == 3, "w13", f"must be 3-D [E, 2I, H], got shape {tuple(w13.shape)}")
    _check(w2.dim() == 3, "w2", f"must be 3-D [E, H, I], got shape {tuple(w2.shape)}")
    _check(topk_ids.dim() == 2, "topk_ids", f"must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
    _check(topk_weights.dim() == 2, "topk_weights",
           f"must be 2-D [T, k], got shape {tuple(topk_weights.shape)}")
    T, H = hidden.shape
    torch._check(w13.shape[2] == H, lambda: "pcg::fused_moe: argument 'w13' dim 2 must be H")
    torch._check(w2.shape[1] == H, lambda: "pcg::fused_moe: argument 'w2' dim 1 must be H")
    torch._check(w2.shape[0] == w13.shape[0],
                 lambda: "pcg::fused_moe: argument 'w2' dim 0 must be E_local = w13.size(0)")
    torch._check(2 * w2.shape[2] == w13.shape[1],
                 lambda: "pcg::fused_moe: argument 'w2' dim 2 must be I = w13.size(1) / 2")
    torch._check(topk_ids.shape[0] == T,
                 lambda: "pcg::fused_moe: argument 'topk_ids' dim 0 must be T")
    torch._check(topk_weights.shape[0] == T and topk_weights.shape[1] == topk_ids.shape[1],
                 lambda: "pcg::fused_moe: argument 'topk_weights' must have topk_ids' shape")
    _check(activation in _ACTIVATIONS, "activation",
           f"must be one of {_ACTIVATIONS}, got {activation!r}")
    # The tile ids are checked by the real kernels (they own the tile list).
    _check(config is None or len(config) == 3, "config",
           f"must be [block_m, tile1, tile2] (3 ints), got {config!r}")
    I = w2.shape[2]
    if isinstance(I, int):  # a symbolic I: the real kernel checks
        _check_w13_block(w13_block, I)
    return hidden.new_empty((T, H))


@torch.library.register_fake("pcg::moe_align")
def _moe_align_fake(topk_ids, expert_map, num_valid, num_local_experts, block_m, sorted_pairs,
                    block_expert, num_blocks):
    same_device("moe_align", topk_ids=topk_ids, expert_map=expert_map, num_valid=num_valid,
                sorted_pairs=sorted_pairs, block_expert=block_expert, num_blocks=num_blocks)
    return None


def moe_align_max_blocks(num_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Worst-case number of blocks moe_align can use: (P + min(E, P)*(block_m-1)) // block_m."""
    if num_pairs <= 0 or num_local_experts <= 0:
        return 0
    return (num_pairs + min(num_local_experts, num_pairs) * (block_m - 1)) // block_m


class MoeTile(NamedTuple):
    """One tensor-core tile of pcg::fused_moe (csrc/moe/fused_moe_tiles.h).

    ``gated`` tiles are GEMM1's (gate and up columns, activation in the
    epilogue), the others GEMM2's. A tile runs only with ``block_m == block_m``
    (its BM). ``smem``: shared memory per block in bytes.
    """
    id: int
    name: str
    block_m: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int
    gated: bool
    smem: int


def _records(info: List[int], names: List[str]):
    """(name, fields) of the native list ops' answer: ``info`` holds len(names)
    records of equal length, flattened."""
    n = len(info) // max(len(names), 1)
    return [(name, info[i * n:(i + 1) * n]) for i, name in enumerate(names)]


def fused_moe_tiles() -> List[MoeTile]:
    """Every tile id of pcg::fused_moe's bf16/fp16 kernels, read from the native
    library (``torch.ops.pcg.fused_moe_tiles``), so Python and C++ agree."""
    return [MoeTile(tid, name, bm, bn, bk, wm, wn, st, bool(gated), smem)
            for name, (tid, bm, bn, bk, wm, wn, st, gated, smem)
            in _records(*torch.ops.pcg.fused_moe_tiles())]


class CutlassVariant(NamedTuple):
    """One kernel variant of the CUTLASS path's grouped GEMMs
    (csrc/moe/grouped_gemm_variants.h): config ``[-1, g1, g2]`` runs GEMM1 with
    variant ``g1`` and GEMM2 with ``g2`` (-1: variant 0, the default).
    ``pingpong``: one tile per consumer warpgroup (else cooperative: both on
    one tile); ``tile_m`` x ``tile_n`` x ``tile_k``: token rows x output columns
    x K; ``cluster_m`` > 1: CTAs along M share each B tile (TMA multicast);
    ``swap_ab``: the kernel computes D^T = W . A^T (the weights are wgmma's A
    operand, so the token tile can be as small as 8-32 rows; as GEMM1 with w13
    in the block layout its epilogue pairs a thread's gate and up rows);
    ``direct_store``: the plain epilogue stores D from registers rather than
    through CUTLASS's TMA store (no per-expert D descriptor to rewrite at every
    tile); ``gather_a``: GEMM1 only (never ``g2``): the kernel reads each token's
    hidden row while loading A (cp.async in an auxiliary producer warp, the
    weights by TMA), so the path skips the permute copy of the hidden rows;
    ``resident``: the kernel's TMA descriptors span the whole sorted rows and
    weights, so an expert switch rewrites none (every gather kernel is one)."""
    id: int
    name: str
    pingpong: bool
    tile_m: int
    tile_n: int
    tile_k: int
    cluster_m: int
    swap_ab: bool
    direct_store: bool
    gather_a: bool
    resident: bool


def fused_moe_cutlass_variants() -> List[CutlassVariant]:
    """Every GEMM kernel variant id of pcg::fused_moe's CUTLASS path, read from the
    native library (``torch.ops.pcg.fused_moe_cutlass_variants``). The list is
    the same in every build; whether this one runs the path: ``fused_moe_paths``."""
    return [CutlassVariant(vid, name, bool(pingpong), tm, tn, tk, cm, bool(swap), bool(direct),
                           bool(gather), bool(resident))
            for name, (vid, pingpong, tm, tn, tk, cm, swap, direct, gather, resident)
            in _records(*torch.ops.pcg.fused_moe_cutlass_variants())]


def fused_moe_config(num_local_experts: int, top_k: int, hidden_size: int,
                     intermediate_size: int, num_tokens: int,
                     dtype: torch.dtype = torch.bfloat16, *, cutlass: bool = False,
                     stream: bool = False) -> Tuple[int, int, int]:
    """The ``[block_m, tile1, tile2]`` that pcg::fused_moe uses for these shapes
    (``torch.ops.pcg.fused_moe_config``): the tuning table's choice; for shapes
    the table does not hold, the CUTLASS path once experts average 16 rows, the
    stream path up to 128 (token, k) pairs, the CUTLASS path for large experts
    (H * I >= 6 Mi) from one row per expert (each only when the flag below says
    the call can take it), else the heuristic tiles. ``num_local_experts`` is
    ``w13.size(0)``. Tile ids are -1 for float32 (its kernel has only block_m).

    ``cutlass`` / ``stream``: whether the call can take the CUTLASS sm_90a path
    (``(-1, g1, g2)``, g1 / g2 its GEMM kernel variants or -1 for the default
    (``fused_moe_cutlass_variants()``): a build with it, an sm_90 GPU, bf16/fp16, H and I
    multiples of 8, 16-byte aligned tensors) and the weight-streaming path
    (``(-2, -1, -1)``); pcg::fused_moe decides this per call. Without them the
    answer is the mma.sync kernels' config."""
    c = torch.ops.pcg.fused_moe_config(num_local_experts, top_k, hidden_size,
                                       intermediate_size, num_tokens, dtype, cutlass, stream)
    return (c[0], c[1], c[2])


@functools.lru_cache(maxsize=None)
def fused_moe_paths(device: Union[str, torch.device] = "cuda") -> Tuple[bool, bool]:
    """``(cutlass, stream)``: whether pcg::fused_moe can take the CUTLASS sm_90a
    path and the weight-streaming path on ``device`` for well-shaped bf16 calls
    (H and I multiples of 8, aligned tensors), as ``fused_moe_config``'s flags.
    Found by one tiny forced call per path (a ValueError means no: build,
    device); cached per device. Always ``(False, False)`` off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return (False, False)
    E, k, H, I = 2, 1, 16, 8
    args = (torch.zeros(1, H, dtype=torch.bfloat16, device=device),
            torch.zeros(E, 2 * I, H, dtype=torch.bfloat16, device=device),
            torch.zeros(E, H, I, dtype=torch.bfloat16, device=device),
            torch.ones(1, k, device=device), torch.zeros(1, k, dtype=torch.int32, device=device))
    ok = []
    for config in ([-1, -1, -1], [-2, -1, -1]):
        try:
            fused_moe(*args, config=config)
            ok.append(True)
        except ValueError:
            ok.append(False)
    return (ok[0], ok[1])


def fused_moe_candidates(block_m: Optional[int] = None,
                         max_smem: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """Every valid bf16/fp16 ``(block_m, tile1, tile2)`` (optionally for one
    block_m, and only tiles needing at most ``max_smem`` bytes of shared
    memory), in tile-id order."""
    tiles = [t for t in fused_moe_tiles() if max_smem is None or t.smem <= max_smem]
    out = []
    for bm in (16, 32, 64, 128):
        if block_m is not None and bm != block_m:
            continue
        for t1 in tiles:
            if not (t1.gated and t1.block_m == bm):
                continue
            for t2 in tiles:
                if not t2.gated and t2.block_m == bm:
                    out.append((bm, t1.id, t2.id))
    return out


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              expert_map: Optional[torch.Tensor] = None, num_valid: Optional[torch.Tensor] = None,
              b13: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None,
              activation: str = "silu", alpha: float = 1.702, limit: float = 7.0,
              config: Optional[Sequence[int]] = None, w13_block: int = 0) -> torch.Tensor:
    """Fused expert MLPs of an MoE layer over routed (token, k) pairs.

    ``out[t] = sum_j topk_weights[t, j] * (w2[e] @ act(w13[e] @ hidden[t] + b13[e]) + b2[e])``
    with ``e = expert_map[topk_ids[t, j]]`` (``topk_ids[t, j]`` without a map).

    Args:
        hidden: [T, H] float32, float16 or bfloat16 (CPU: all three, computed in fp32).
        w13: [E_local, 2I, H], hidden's dtype: gate rows 0..I-1, then up rows I..2I-1
            (``w13_block=0``), or the block layout of ``w13_block`` (:func:`interleave_w13`).
        w2: [E_local, H, I], hidden's dtype.
        topk_weights: [T, k] float32 router weights.
        topk_ids: [T, k] int32 global expert ids.
        expert_map: optional [E_global] int32, global id -> local expert index or -1 (expert
            on another rank). Without it, ids are local and E_global = E_local.
        num_valid: optional int32 tensor of one element on hidden's device: rows
            t >= num_valid are exact zeros and touch no expert (clamped to [0, T]).
        b13: optional [E_local, 2I] bias of w13; b2: optional [E_local, H] bias of w2.
        activation: "silu" (silu(gate) * up), "gelu" (exact erf gelu(gate) * up),
            "gelu_tanh" (tanh-approximate gelu(gate) * up, Gemma's gelu_pytorch_tanh) or
            "swigluoai" (gpt-oss: gate = min(gate, limit), up = clamp(up, -limit, limit),
            (up + 1) * gate * sigmoid(alpha * gate)).
        alpha, limit: parameters of "swigluoai".
        config: optional ``[block_m, tile1, tile2]`` forcing the kernel configuration
            (for tuning and tests; the default is ``fused_moe_config(...)`` of the shapes
            and of the paths this call can take: the checked-in tuning table, else a
            heuristic). block_m is 16, 32, 64 or 128
            (rows per GEMM block); tile1 / tile2 are ids from ``fused_moe_tiles()`` of a
            GEMM1 (gated) / GEMM2 tile whose ``block_m`` equals block_m, or -1 for
            block_m's default tile. float32 takes only block_m (tile ids must be -1).
            Two configs select other implementations (bf16/fp16 only): ``[-1, g1, g2]``
            the CUTLASS sm_90a grouped-GEMM path (large T; an sm_90 GPU and a build with
            it), GEMM1 on kernel variant g1 and GEMM2 on g2 (ids of
            ``fused_moe_cutlass_variants()``, -1: the default variant 0), and
            ``[-2, -1, -1]`` the weight-streaming path (a few tokens: T * k <= 128
            pairs; two kernels that read each hit expert's weights once). Both need H and
            I multiples of 8 and 16-byte aligned hidden / w13 / w2; a forced path the call
            cannot take is a ValueError. The CPU kernel validates config and otherwise
            ignores it; on CUDA a tile needing more shared memory than the device has is
            an error. Results differ between configs only by fp32 summation order (and,
            on the CUTLASS path, two extra roundings to the dtype).
        w13_block: w13's row layout: 0 (gate rows, then up rows) or B, a power of two >= 8
            dividing I (blocks of B gate rows and B up rows alternate). Every path and
            config takes either, with the same result; with B = ``FUSED_W13_BLOCK`` (8) the
            CUTLASS path applies the activation in GEMM1's epilogue (one kernel and one
            [slots, 2I] buffer less), with any variant. b13 keeps the plain layout.

    Pairs whose id is outside [0, E_global), or maps to -1 / outside [0, E_local),
    contribute nothing. Products accumulate in fp32; the intermediate
    act(...) is rounded to hidden's dtype before the second product (as an
    unfused implementation would); the k contributions of a token are summed in
    fp32 in a fixed order (deterministic). Inputs may be non-contiguous.
    The CUDA kernel does no host synchronisation and captures in CUDA graphs.

    Returns:
        [T, H] contiguous tensor in hidden's dtype.
    """
    return torch.ops.pcg.fused_moe(hidden, w13, w2, topk_weights, topk_ids, expert_map,
                                   num_valid, b13, b2, activation, alpha, limit,
                                   None if config is None else [_as_int("config", c) for c in config],
                                   _as_int("w13_block", w13_block))


def _as_int(arg: str, v) -> int:
    """An integer argument (int, numpy or 0-d torch integer); 8.5 is an error, not 8."""
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"pcg::fused_moe: argument '{arg}' must be an int, got {v!r}") from None


__all__ = ["FUSED_W13_BLOCK", "CutlassVariant", "MoeTile", "deinterleave_w13", "fused_moe",
           "fused_moe_candidates", "fused_moe_config", "fused_moe_cutlass_variants",
           "fused_moe_paths", "fused_moe_tiles", "interleave_w13", "moe_align_max_blocks",
           "w13_block_for"]
