"""MoE routing: pcg::route (top-k expert selection)."""
from __future__ import annotations

import torch

from ._checks import same_device

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.register_fake("pcg::route")
def _route_fake(router_logits, top_k, scoring="softmax", renormalize=True,
                correction_bias=None, num_groups=1, topk_groups=1, scale=1.0):
    # Devices, shapes and the option strings; the native launchers validate everything.
    same_device("route", router_logits=router_logits, correction_bias=correction_bias)
    torch._check(scoring in ("softmax", "sigmoid"),
                 lambda: f'pcg::route: argument \'scoring\' must be "softmax" or "sigmoid", '
                         f'got "{scoring}"')
    torch._check(router_logits.dim() == 2,
                 lambda: f"pcg::route: argument 'router_logits' must be 2-D [num_tokens, "
                         f"num_experts], got shape {tuple(router_logits.shape)}")
    torch._check(router_logits.dtype in _FLOATS,
                 lambda: f"pcg::route: argument 'router_logits' must have dtype float32, "
                         f"bfloat16 or float16, got {router_logits.dtype}")
    num_experts = router_logits.shape[1]
    torch._check(num_groups >= 1 and num_experts % num_groups == 0,
                 lambda: f"pcg::route: argument 'num_groups' must be >= 1 and divide num_experts "
                         f"({num_experts}), got {num_groups}")
    torch._check(1 <= topk_groups <= num_groups,
                 lambda: f"pcg::route: argument 'topk_groups' must be in [1, num_groups] = "
                         f"[1, {num_groups}], got {topk_groups}")
    torch._check(top_k >= 1, lambda: f"pcg::route: argument 'top_k' must be >= 1, got {top_k}")
    torch._check(top_k <= num_experts,
                 lambda: f"pcg::route: argument 'top_k' must be <= num_experts "
                         f"({num_experts}), got {top_k}")
    shape = (router_logits.shape[0], top_k)
    dev = router_logits.device
    return (router_logits.new_empty(shape, dtype=torch.float32, device=dev),
            router_logits.new_empty(shape, dtype=torch.int32, device=dev))


def route(
    router_logits: torch.Tensor,
    top_k: int,
    scoring: str = "softmax",
    renormalize: bool = True,
    correction_bias: torch.Tensor | None = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick ``top_k`` experts per token from router logits.

    Steps (all math in float32, whatever the input dtype):

    1. ``scores = softmax(logits, -1)`` (``scoring="softmax"``) or ``sigmoid(logits)``
       (``scoring="sigmoid"``).
    2. ``sel = scores + correction_bias`` (bias optional; used for selection only).
    3. If ``num_groups > 1`` (DeepSeek-V3 grouped routing): experts are split into
       ``num_groups`` equal consecutive groups, a group scores the sum of its two
       largest ``sel`` values (the largest alone for one-expert groups), and only
       experts of the best ``topk_groups`` groups stay selectable.
    4. The ``top_k`` selectable experts with the largest ``sel`` are chosen, best
       first; exact ties go to the lower expert (or group) index.
    5. ``weights = scores`` (uncorrected) at the chosen experts; if ``renormalize``,
       divided by their sum (+1e-20); then multiplied by ``scale``.

    CPU and CUDA kernels pick identical ids and agree on weights to ~1e-6.

    Args:
        router_logits: ``[T, E]`` float32, bfloat16 or float16, any strides, ``T >= 0``.
            On CUDA, ``E <= 1024``.
        top_k: experts per token, ``1 <= top_k <= E`` (and
            ``top_k <= topk_groups * E // num_groups``).
        scoring: ``"softmax"`` or ``"sigmoid"``.
        renormalize: rescale the ``top_k`` weights to sum to 1 (before ``scale``).
        correction_bias: optional ``[E]`` float32/bfloat16/float16 on the logits' device.
        num_groups: expert groups, ``>= 1`` and dividing ``E``.
        topk_groups: groups kept, ``1 <= topk_groups <= num_groups``.
        scale: factor applied to the final weights (routed scaling factor).

    Returns:
        ``(weights, ids)``: ``weights`` ``[T, top_k]`` float32 and ``ids``
        ``[T, top_k]`` int32, contiguous, on ``router_logits.device``.

    Raises:
        ValueError / RuntimeError naming the offending argument on invalid input.
    """
    return torch.ops.pcg.route(router_logits, top_k, scoring, renormalize, correction_bias,
                               num_groups, topk_groups, scale)
