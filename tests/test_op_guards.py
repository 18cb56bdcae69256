"""Guards every op shares, on the CPU: an argument on another device (a meta
tensor among real ones runs only the fake kernel) is an error naming it, not an
uncomputed result; and no op has a derivative: where an input requires grad,
backward raises naming the op instead of returning gradients that miss it."""
from __future__ import annotations

import pytest
import torch

import pcg
from pcg.batch import BatchMeta


def _moe_case(T=5, E=4, k=2, H=16, I=8):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * I, H, generator=g) / 4
    w2 = torch.randn(E, H, I, generator=g) / 3
    weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(k)
    return hidden, w13, w2, weights, ids.int()


def test_meta_argument_among_cpu_ones_is_an_error():
    hidden, w13, w2, weights, ids = _moe_case()
    meta_nv = torch.tensor([3], dtype=torch.int32, device="meta")
    with pytest.raises(ValueError, match="pcg::fused_moe: argument 'num_valid' must be on cpu"):
        pcg.fused_moe(hidden, w13, w2, weights, ids, num_valid=meta_nv)
    with pytest.raises(ValueError, match="pcg::route: argument 'correction_bias' must be on cpu"):
        pcg.route(torch.randn(5, 8), 2, correction_bias=torch.zeros(8, device="meta"))
    q = torch.randn(6, 4, 8)
    meta = BatchMeta(6, [0, 6], None, 6).host_meta()
    with pytest.raises(ValueError, match="pcg::causal_attention_out: argument 'k' must be on cpu"):
        torch.ops.pcg.causal_attention_out(q, q.to("meta"), q, torch.empty_like(q), meta)
    ids6 = torch.arange(6)
    with pytest.raises(ValueError, match="pcg::stage_batch: argument 'static_pos' must be on cpu"):
        torch.ops.pcg.stage_batch(ids6, None, torch.zeros(8, dtype=torch.long),
                                  torch.zeros(8, dtype=torch.long, device="meta"),
                                  torch.zeros(4, dtype=torch.int32), [6])


def test_fake_route_checks_its_options():
    """On meta tensors (what torch.compile traces with) route's options fail
    at trace time, as the native kernels would at run time."""
    logits = torch.randn(5, 8, device="meta")
    for kw, arg in [({"scoring": "bogus"}, "scoring"), ({"num_groups": 3}, "num_groups"),
                    ({"num_groups": 2, "topk_groups": 3}, "topk_groups")]:
        with pytest.raises(Exception, match=f"pcg::route: argument '{arg}'"):
            pcg.route(logits, 2, **kw)
        with pytest.raises(ValueError, match=f"pcg::route: argument '{arg}'"):
            pcg.route(torch.randn(5, 8), 2, **kw)


def test_all_meta_still_traces():
    """All arguments on meta (torch.compile's fake tensors): shapes only, no error."""
    hidden, w13, w2, weights, ids = (t.to("meta") for t in _moe_case())
    assert pcg.fused_moe(hidden, w13, w2, weights, ids).shape == hidden.shape


@pytest.mark.parametrize("which", ["hidden", "topk_weights"])
def test_fused_moe_backward_raises(which):
    args = list(_moe_case())
    pos = {"hidden": 0, "topk_weights": 3}[which]
    args[pos] = args[pos].clone().requires_grad_()
    out = pcg.fused_moe(*args)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="pcg::fused_moe"):
        out.sum().backward()


def test_route_backward_raises():
    logits = torch.randn(5, 8, requires_grad=True)
    weights, ids = pcg.route(logits, 2)
    with pytest.raises(RuntimeError, match="pcg::route"):
        weights.sum().backward()


def test_no_grad_inputs_give_plain_outputs():
    out = pcg.fused_moe(*_moe_case())
    assert not out.requires_grad and out.grad_fn is None


def test_integer_arguments_are_not_truncated():
    with pytest.raises(TypeError, match="'w13_block' must be an int, got 8.5"):
        pcg.fused_moe(*_moe_case(), w13_block=8.5)
    with pytest.raises(TypeError, match="'config' must be an int"):
        pcg.fused_moe(*_moe_case(), config=[16.9, -1, -1])
    with pytest.raises(ValueError, match="pcg::fused_moe_config: argument 'H'"):
        torch.ops.pcg.fused_moe_config(4, 2, -16, 8, 5, torch.float32, False, False)
