"""transformers routers as one pcg::route kernel (``pcg.wrap``'s default, ``router="pcg"``).

A transformers MoE router (``*TopKRouter``: logits = linear(x), softmax or
sigmoid scores, top-k, optional renormalisation, bias, expert groups and
scale) runs 4-8 small kernels per layer; pcg::route makes the same choice in
one. A router is switched only where pcg.route reproduces it, checked on probe
tokens when the model is wrapped: its logits exactly (the same linear), the
same experts per token (a different pick only between experts of equal score),
and the same weights to the rounding of the router's output dtype. The first
setting read from the router's attributes that passes is kept; a router no
setting reproduces keeps its own forward, and so does DeepSeek-V2's
group-limited greedy (a group scored by its best expert, where pcg.route's
groups use their best two).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import route as _route_op  # the documented wrapper of pcg::route (and its fake kernel)

PROBE_TOKENS = 256


@dataclass(frozen=True)
class RouterSpec:
    """How a router maps logits to (weights, ids), in pcg.route's terms."""
    fp32_logits: bool       # logits = linear in float32 (DeepSeek) or in the input dtype
    scoring: str            # "softmax" / "sigmoid"
    renormalize: bool
    num_groups: int
    topk_groups: int
    scale: float
    out_dtype: torch.dtype  # dtype of the router's weights output


def _top_k(m: nn.Module) -> Optional[int]:
    k = getattr(m, "top_k", None)
    return k if isinstance(k, int) and k >= 1 else None


def is_router(m: nn.Module) -> bool:
    """A transformers router: an ``[E, H]`` weight, an int ``top_k`` and
    ``Router`` in its class name."""
    w = getattr(m, "weight", None)
    return ("Router" in type(m).__name__ and isinstance(w, torch.Tensor) and w.dim() == 2
            and _top_k(m) is not None and _top_k(m) <= w.shape[0])


def _bias(m: nn.Module) -> Optional[torch.Tensor]:
    b = getattr(m, "bias", None)
    return b if isinstance(b, torch.Tensor) else None


def _logits(m: nn.Module, x: torch.Tensor, fp32: bool) -> torch.Tensor:
    x = x.reshape(-1, m.weight.shape[1])
    b = _bias(m)
    if fp32:
        return F.linear(x.float(), m.weight.float(), None if b is None else b.float())
    return F.linear(x, m.weight, b)


def _route(m: nn.Module, logits: torch.Tensor, spec: RouterSpec):
    bias = getattr(m, "e_score_correction_bias", None)
    return _route_op(logits, _top_k(m), spec.scoring, spec.renormalize,
                     bias if isinstance(bias, torch.Tensor) else None,
                     spec.num_groups, spec.topk_groups, spec.scale)


def _candidates(m: nn.Module, fp32_logits: bool, out_dtype: torch.dtype):
    E = m.weight.shape[0]
    groups = [(1, 1)]
    g = getattr(m, "num_group", getattr(m, "n_group", None))
    tg = getattr(m, "topk_group", None)
    if isinstance(g, int) and isinstance(tg, int) and 1 < g and E % g == 0 and 1 <= tg <= g:
        groups.insert(0, (g, tg))
    scale = getattr(m, "routed_scaling_factor", 1.0)
    scale = float(scale) if isinstance(scale, (int, float)) else 1.0
    norm = getattr(m, "norm_topk_prob", None)
    renorms = [bool(norm), not bool(norm)] if isinstance(norm, bool) else [True, False]
    scorings = ["sigmoid", "softmax"] if hasattr(m, "e_score_correction_bias") else ["softmax", "sigmoid"]
    for scoring, renorm, (ng, ntg) in itertools.product(scorings, renorms, groups):
        yield RouterSpec(fp32_logits, scoring, renorm, ng, ntg, scale, out_dtype)


def _selection_scores(m: nn.Module, logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    s = logits.float()
    s = torch.softmax(s, -1) if spec.scoring == "softmax" else torch.sigmoid(s)
    bias = getattr(m, "e_score_correction_bias", None)
    return s + bias.float() if isinstance(bias, torch.Tensor) else s


def _matches(m: nn.Module, logits: torch.Tensor, ref_w: torch.Tensor, ref_ids: torch.Tensor,
             spec: RouterSpec) -> bool:
    w, ids = _route(m, logits, spec)
    ids = ids.long()
    ref_ids = ref_ids.long()
    sel = _selection_scores(m, logits, spec)
    same = (ids.sort(-1).values == ref_ids.sort(-1).values).all(-1)
    # A different pick is allowed only between experts of equal score.
    tied = (sel.gather(1, ids).sort(-1).values == sel.gather(1, ref_ids).sort(-1).values).all(-1)
    if not bool((same | tied).all()):
        return False
    if not bool(same.any()):
        return False
    # Weights of rows with the same experts, matched by expert id.
    rows = same.nonzero().flatten()
    oi, oref = ids[rows].argsort(-1), ref_ids[rows].argsort(-1)
    got = w[rows].gather(1, oi).to(spec.out_dtype).float()
    want = ref_w[rows].float().gather(1, oref)
    rtol = 1e-5 if spec.out_dtype == torch.float32 else 2e-2
    return bool(torch.allclose(got, want, rtol=rtol, atol=1e-6))


@torch.inference_mode()
def find_spec(m: nn.Module, generator: torch.Generator) -> Optional[RouterSpec]:
    """The setting under which pcg.route reproduces router ``m`` on probe
    tokens, or None."""
    w = m.weight
    if w.device.type not in ("cpu", "cuda") or w.shape[0] > 1024 or not w.dtype.is_floating_point:
        return None
    # DeepSeek-V2's group-limited greedy scores a group by its best expert; pcg.route's
    # groups (DeepSeek-V3) by their best two: not the same rule, whatever a probe shows.
    if getattr(m, "topk_method", None) == "group_limited_greedy":
        return None
    x = torch.randn(PROBE_TOKENS, w.shape[1], generator=generator).to(w.device, w.dtype)
    try:
        out = m.forward(x)
    except Exception:  # noqa: BLE001 - a router we cannot call plainly keeps its forward
        return None
    if not (isinstance(out, tuple) and len(out) == 3):
        return None
    ref_logits, ref_w, ref_ids = out
    k = _top_k(m)
    if not (isinstance(ref_ids, torch.Tensor) and ref_ids.shape == (PROBE_TOKENS, k)
            and isinstance(ref_w, torch.Tensor) and ref_w.shape == (PROBE_TOKENS, k)
            and isinstance(ref_logits, torch.Tensor) and ref_logits.shape == (PROBE_TOKENS, w.shape[0])):
        return None
    # Whatever a probe trips on (a setting pcg.route rejects, tensors on other
    # devices) rules that setting out; none left: the router keeps its forward.
    for fp32 in (False, True):
        try:
            logits = _logits(m, x, fp32)
            if logits.dtype != ref_logits.dtype or not torch.equal(logits, ref_logits):
                continue
        except Exception:  # noqa: BLE001
            continue
        for spec in _candidates(m, fp32, ref_w.dtype):
            try:
                if _matches(m, logits, ref_w, ref_ids, spec):
                    return spec
            except Exception:  # noqa: BLE001
                continue
    return None


class RouteForward:
    """The router's instance forward on pcg.route: (logits, weights, ids) as
    the router returns them (weights in its output dtype, ids int64). A class,
    not a closure, so that a wrapped model stays picklable."""

    def __init__(self, module: nn.Module, spec: RouterSpec) -> None:
        self.module = module
        self.spec = spec

    def __call__(self, hidden_states: torch.Tensor) -> tuple:
        logits = _logits(self.module, hidden_states, self.spec.fp32_logits)
        w, ids = _route(self.module, logits, self.spec)
        return logits, w.to(self.spec.out_dtype), ids.long()


def switch_routers(model: nn.Module, replace_forward: Any, restore_forward: Any) -> dict:
    """Switch every router of ``model`` that pcg.route reproduces (with
    ``replace_forward(module, forward)``); returns {module name: "pcg.route"
    or why it keeps its own forward}."""
    g = torch.Generator().manual_seed(0)
    result = {}
    for name, m in model.named_modules():
        if not is_router(m):
            continue
        if "_pcg_orig_forward" in m.__dict__:  # wrapped before: probe the router's own forward
            restore_forward(m)
        spec = find_spec(m, g)
        if spec is None:
            result[name] = "own forward (pcg.route does not reproduce it)"
            continue
        replace_forward(m, RouteForward(m, spec))
        result[name] = "pcg.route"
    return result
