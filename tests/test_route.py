"""pcg::route against an independent float64 reference, on CPU and (gpu marker) CUDA."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import pcg

GPU = pytest.mark.gpu

# ---------------------------------------------------------------- reference


def reference(logits, top_k, scoring="softmax", renormalize=True, correction_bias=None,
              num_groups=1, topk_groups=1, scale=1.0):
    """float64 routing; ties broken by a stable sort on -value (lower index first).
    Also returns what near_ties() needs: sorted candidate and group values."""
    x = logits.detach().cpu().double()
    T, E = x.shape
    scores = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    sel = scores
    if correction_bias is not None:
        sel = scores + correction_bias.detach().cpu().double()
    selectable = torch.ones(T, E, dtype=torch.bool)
    group_sorted = None
    if num_groups > 1:
        size = E // num_groups
        grouped = sel.reshape(T, num_groups, size)
        if size == 1:
            gscore = grouped[..., 0]
        else:
            gscore = torch.sort(grouped, -1, descending=True).values[..., :2].sum(-1)
        gvals, gorder = torch.sort(-gscore, dim=-1, stable=True)
        group_sorted = -gvals
        kept = torch.zeros(T, num_groups, dtype=torch.bool)
        kept.scatter_(1, gorder[:, :topk_groups], True)
        selectable = kept.repeat_interleave(size, dim=1)
    masked = sel.masked_fill(~selectable, -math.inf)
    vals, order = torch.sort(-masked, dim=-1, stable=True)
    ids = order[:, :top_k]
    w = scores.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    w = w * scale
    return w, ids, -vals, group_sorted, topk_groups


def near_ties(top_k, cand_sorted, group_sorted, topk_groups, rtol=1e-5):
    """Tokens whose choice hinges on values closer than float32 can resolve (but
    not exactly equal: exact ties have a defined answer and are checked)."""
    def close(v, n):
        v = v[:, : n + 1]
        if v.shape[1] < 2:
            return torch.zeros(v.shape[0], dtype=torch.bool)
        gap = v[:, :-1] - v[:, 1:]
        mag = v.abs()[:, :-1].clamp_min(1e-30)
        return ((gap > 0) & (gap <= rtol * mag)).any(-1)
    amb = close(cand_sorted, top_k)
    if group_sorted is not None:
        amb |= close(group_sorted, topk_groups)
    return amb


def check(out, logits, top_k, **kw):
    w, ids = out
    T = logits.shape[0]
    assert w.shape == (T, top_k) and ids.shape == (T, top_k)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.is_contiguous() and ids.is_contiguous()
    assert w.device == logits.device and ids.device == logits.device
    rw, rids, cand, groups, tg = reference(logits, top_k, **kw)
    ok = ~near_ties(top_k, cand, groups, tg)
    assert ok.sum() >= 0.95 * T, "too many near-tied tokens for a meaningful test"
    w, ids = w.cpu(), ids.cpu()
    torch.testing.assert_close(ids[ok].long(), rids[ok], rtol=0, atol=0)
    torch.testing.assert_close(w[ok].double(), rw[ok], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- cases

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(T, E, k, scoring="softmax", bias=False, groups=1, tg=1, renorm=True, scale=1.0,
          dtype=torch.float32, layout="contiguous"):
    return dict(T=T, E=E, k=k, scoring=scoring, bias=bias, groups=groups, tg=tg, renorm=renorm,
                scale=scale, dtype=dtype, layout=layout)


def _grid():
    cases = []
    # Main sweep: every T x E x scoring, rotating k, bias, dtype and layout.
    for n, (T, E, scoring) in enumerate(itertools.product(
            [0, 1, 3, 17, 128, 1000], [8, 60, 64, 128, 256], ["softmax", "sigmoid"])):
        cases.append(_case(T, E, 1 + n % 8, scoring, bias=n % 3 == 1, dtype=DTYPES[n % 3],
                           layout=["contiguous", "transposed", "sliced"][(n // 3) % 3],
                           renorm=n % 4 != 3, scale=2.5 if n % 5 == 0 else 1.0))
    cases += [_case(T, 1, 1, s) for T in (0, 3) for s in ("softmax", "sigmoid")]
    cases += [_case(17, 64, k, "sigmoid", bias=k % 2 == 0) for k in range(1, 9)]
    cases += [_case(17, 8, 8), _case(17, 60, 60, "sigmoid", renorm=False)]  # top_k == E
    # Grouped: DeepSeek-V3 (256 experts, 8 groups, keep 4, top 8, sigmoid + bias, x2.5).
    for dt, layout in zip(DTYPES, ["contiguous", "transposed", "sliced"]):
        cases.append(_case(1000, 256, 8, "sigmoid", bias=True, groups=8, tg=4, scale=2.5,
                           dtype=dt, layout=layout))
    cases += [
        _case(128, 64, 6, "softmax", groups=8, tg=3),
        _case(128, 64, 6, "sigmoid", bias=True, groups=8, tg=3, renorm=False),
        _case(17, 64, 24, "sigmoid", bias=True, groups=8, tg=3),  # top_k == all kept experts
        _case(17, 60, 4, "softmax", groups=60, tg=7),  # one expert per group
        _case(17, 128, 8, "sigmoid", groups=2, tg=1, dtype=torch.bfloat16),
        _case(3, 256, 8, "softmax", bias=True, groups=256, tg=256, dtype=torch.float16),
    ]
    return cases


def _id(c):
    parts = [f"T{c['T']}", f"E{c['E']}", f"k{c['k']}", c["scoring"], str(c["dtype"])[6:],
             c["layout"]]
    if c["bias"]:
        parts.append("bias")
    if c["groups"] > 1:
        parts.append(f"g{c['groups']}x{c['tg']}")
    if not c["renorm"]:
        parts.append("norenorm")
    if c["scale"] != 1:
        parts.append(f"s{c['scale']}")
    return "-".join(parts)


CASES = _grid()


def make_inputs(c, device, seed=0):
    g = torch.Generator().manual_seed(seed + 7919 * c["T"] + c["E"])
    T, E = c["T"], c["E"]
    if c["layout"] == "transposed":
        logits = torch.randn(E, T, generator=g).to(c["dtype"]).to(device).t()
    elif c["layout"] == "sliced":
        logits = torch.randn(T, 2 * E + 1, generator=g).to(c["dtype"]).to(device)[:, 1::2]
    else:
        logits = torch.randn(T, E, generator=g).to(c["dtype"]).to(device)
    assert logits.shape == (T, E)
    assert (c["layout"] == "contiguous") == logits.is_contiguous() or T <= 1
    kwargs = dict(scoring=c["scoring"], renormalize=c["renorm"], num_groups=c["groups"],
                  topk_groups=c["tg"], scale=c["scale"])
    if c["bias"]:
        kwargs["correction_bias"] = (0.1 * torch.randn(E, generator=g)).to(c["dtype"]).to(device)
    return logits, kwargs


@pytest.mark.parametrize("c", CASES, ids=_id)
def test_route_cpu(c):
    logits, kw = make_inputs(c, "cpu")
    check(pcg.route(logits, c["k"], **kw), logits, c["k"], **kw)


def test_wrapper_defaults_match_op():
    logits = torch.randn(5, 16)
    a = pcg.route(logits, 2)
    b = torch.ops.pcg.route(logits, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------- exact ties


def _ties(device):
    # softmax: repeated maxima -> lower index first
    w, ids = pcg.route(torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]], device=device), 3)
    assert ids.tolist() == [[1, 2, 4]]
    torch.testing.assert_close(w.cpu(), torch.full((1, 3), 1 / 3))
    # all equal -> 0..k-1, in order
    w, ids = pcg.route(torch.zeros(4, 64, device=device), 8, "sigmoid", renormalize=False)
    assert ids.tolist() == [list(range(8))] * 4
    torch.testing.assert_close(w.cpu(), torch.full((4, 8), 0.5))
    # sel ties while scores differ: expert 2 (score 0.5 + bias) ties expert 5
    # (score sigmoid(1), read back from the kernel itself so the tie is exact)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0]], device=device)
    s5 = pcg.route(logits, 6, "sigmoid", renormalize=False)[0][0, 0].item()
    bias = torch.zeros(6, device=device)
    bias[2] = s5 - 0.5  # exact (Sterbenz), so 0.5 + bias[2] == s5 in float32
    w, ids = pcg.route(logits, 2, "sigmoid", renormalize=False, correction_bias=bias)
    assert ids.tolist() == [[2, 5]]
    torch.testing.assert_close(w.cpu(), torch.tensor([[0.5, s5]]))
    # groups with equal scores: lower group index kept; experts of the kept groups
    logits = torch.tensor([[5.0, 1.0, 5.0, 1.0, 5.0, 1.0, 0.0, 0.0]], device=device)
    w, ids = pcg.route(logits, 3, "softmax", num_groups=4, topk_groups=2)
    assert ids.tolist() == [[0, 2, 1]]
    # bf16 logits from a small integer range: heavy exact ties vs the reference
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (256, 64), generator=g).to(torch.bfloat16).to(device)
    for kw in (dict(), dict(scoring="sigmoid", num_groups=8, topk_groups=3)):
        check(pcg.route(logits, 8, **kw), logits, 8, **kw)


def test_ties_cpu():
    _ties("cpu")


# ---------------------------------------------------------------- opcheck

OPCHECK_CASES = [
    ((torch.randn(6, 16), 2), dict()),
    ((torch.randn(16, 6).t(), 3), dict(scoring="sigmoid", renormalize=False, scale=2.0)),
    ((torch.randn(5, 64, dtype=torch.bfloat16), 8),
     dict(scoring="sigmoid", correction_bias=torch.randn(64), num_groups=8, topk_groups=4)),
    ((torch.randn(0, 8, dtype=torch.float16), 1), dict()),
]


def _to(x, device):
    return x.to(device) if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("n", range(len(OPCHECK_CASES)))
def test_opcheck_cpu(n):
    args, kwargs = OPCHECK_CASES[n]
    torch.library.opcheck(torch.ops.pcg.route.default, args, kwargs)


# ---------------------------------------------------------------- errors

BAD = [
    # (description, logits builder (E=8 unless noted), top_k, kwargs, argument named)
    ("1-D logits", lambda d: torch.randn(8, device=d), 1, {}, "router_logits"),
    ("3-D logits", lambda d: torch.randn(2, 2, 8, device=d), 1, {}, "router_logits"),
    ("int logits", lambda d: torch.ones(2, 8, dtype=torch.int32, device=d), 1, {}, "router_logits"),
    ("f64 logits", lambda d: torch.randn(2, 8, dtype=torch.float64, device=d), 1, {},
     "router_logits"),
    ("top_k 0", None, 0, {}, "top_k"),
    ("top_k > E", None, 9, {}, "top_k"),
    ("scoring", None, 2, dict(scoring="relu"), "scoring"),
    ("bias shape", None, 2, dict(correction_bias=lambda d: torch.zeros(9, device=d)),
     "correction_bias"),
    ("bias 2-D", None, 2, dict(correction_bias=lambda d: torch.zeros(1, 8, device=d)),
     "correction_bias"),
    ("bias int", None, 2,
     dict(correction_bias=lambda d: torch.zeros(8, dtype=torch.int64, device=d)),
     "correction_bias"),
    ("num_groups 0", None, 2, dict(num_groups=0), "num_groups"),
    ("num_groups not dividing", None, 2, dict(num_groups=3), "num_groups"),
    ("topk_groups 0", None, 2, dict(num_groups=4, topk_groups=0), "topk_groups"),
    ("topk_groups > groups", None, 2, dict(num_groups=4, topk_groups=5), "topk_groups"),
    ("top_k > kept experts", None, 5, dict(num_groups=4, topk_groups=2), "top_k"),
]


def _bad_call(device, builder, k, kwargs):
    logits = builder(device) if builder else torch.randn(3, 8, device=device)
    kw = {key: (v(device) if callable(v) else v) for key, v in kwargs.items()}
    return lambda: pcg.route(logits, k, **kw)


@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_errors_cpu(bad):
    _, builder, k, kwargs, arg = bad
    with pytest.raises((RuntimeError, ValueError), match=f"pcg::route: argument '{arg}'"):
        _bad_call("cpu", builder, k, kwargs)()


# ---------------------------------------------------------------- CUDA


@GPU
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_route_cuda(c):
    logits, kw = make_inputs(c, "cuda")
    out = pcg.route(logits, c["k"], **kw)
    check(out, logits, c["k"], **kw)
    # CPU and CUDA agree exactly on ids, to ~1e-6 on weights.
    cpu_kw = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    w_cpu, ids_cpu = pcg.route(logits.cpu(), c["k"], **cpu_kw)
    assert torch.equal(out[1].cpu(), ids_cpu)
    torch.testing.assert_close(out[0].cpu(), w_cpu, rtol=0, atol=1e-6)


@GPU
def test_ties_cuda():
    _ties("cuda")


@GPU
@pytest.mark.parametrize("E", [512, 1000, 1024])
def test_large_e_cuda(E):
    g = torch.Generator().manual_seed(E)
    logits = torch.randn(33, E, generator=g)
    bias = 0.1 * torch.randn(E, generator=g)
    for k, kw in ((1, {}), (E, dict(scoring="sigmoid")), (16, dict(correction_bias=bias)),
                  (8, dict(correction_bias=bias, num_groups=8, topk_groups=4))):
        cpu = pcg.route(logits, k, **kw)
        cuda_kw = {key: _to(v, "cuda") for key, v in kw.items()}
        out = pcg.route(logits.cuda(), k, **cuda_kw)
        assert torch.equal(out[1].cpu(), cpu[1])
        torch.testing.assert_close(out[0].cpu(), cpu[0], rtol=0, atol=1e-6)


@GPU
@pytest.mark.parametrize("E", [8, 64, 160, 257])
def test_nan_inf_zero_cuda(E):
    """NaN / +-inf logits, NaN and +-0 bias entries, rows all NaN, and k up to E
    (NaN candidates must be taken, after every number, in index order): the CUDA
    kernel's order keys give the CPU loop's ids exactly."""
    g = torch.Generator().manual_seed(E)
    logits = torch.randn(19, E, generator=g)
    logits[0, 1] = float("nan")
    logits[1, :] = float("nan")
    logits[2, 3 % E] = float("inf")
    logits[3, :: 3] = -float("inf")
    logits[4, :] = 0.0
    logits[4, ::2] = -0.0
    bias = 0.1 * torch.randn(E, generator=g)
    bias[E // 2] = float("nan")
    bias[E // 3] = -0.0
    cases = [(min(8, E), {}), (E, dict(scoring="sigmoid")), (min(6, E), dict(scoring="sigmoid", correction_bias=bias)),
             (E, dict(scoring="sigmoid", correction_bias=bias))]
    if E % 4 == 0:
        cases.append((min(8, E // 2), dict(scoring="sigmoid", correction_bias=bias, num_groups=4, topk_groups=2)))
    for k, kw in cases:
        cpu = pcg.route(logits, k, **kw)
        out = pcg.route(logits.cuda(), k, **{key: _to(v, "cuda") for key, v in kw.items()})
        assert torch.equal(out[1].cpu(), cpu[1]), (k, kw.keys())
        torch.testing.assert_close(out[0].cpu(), cpu[0], rtol=0, atol=1e-6, equal_nan=True)


@GPU
@pytest.mark.parametrize("n", range(len(OPCHECK_CASES)))
def test_opcheck_cuda(n):
    args, kwargs = OPCHECK_CASES[n]
    torch.library.opcheck(torch.ops.pcg.route.default, tuple(_to(a, "cuda") for a in args),
                          {k: _to(v, "cuda") for k, v in kwargs.items()})


@GPU
@pytest.mark.parametrize("bad", BAD, ids=[b[0] for b in BAD])
def test_errors_cuda(bad):
    _, builder, k, kwargs, arg = bad
    with pytest.raises((RuntimeError, ValueError), match=f"pcg::route: argument '{arg}'"):
        _bad_call("cuda", builder, k, kwargs)()


@GPU
def test_errors_cuda_only():
    with pytest.raises((RuntimeError, ValueError), match="argument 'router_logits'.*1024"):
        pcg.route(torch.randn(2, 2048, device="cuda"), 2)
    # bias on the wrong device, either way round
    with pytest.raises((RuntimeError, ValueError), match="argument 'correction_bias'"):
        pcg.route(torch.randn(2, 8, device="cuda"), 2, correction_bias=torch.zeros(8))
    with pytest.raises((RuntimeError, ValueError), match="argument 'correction_bias'"):
        pcg.route(torch.randn(2, 8), 2, correction_bias=torch.zeros(8, device="cuda"))


@GPU
def test_cuda_graph_replay():
    T, E, k = 64, 256, 8
    kw = dict(scoring="sigmoid", correction_bias=0.1 * torch.randn(E, device="cuda"),
              num_groups=8, topk_groups=4, scale=2.5)
    static = torch.randn(T, E, device="cuda")
    pcg.route(static, k, **kw)  # warm up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w_static, ids_static = pcg.route(static, k, **kw)
    for seed in range(3):
        gen = torch.Generator("cuda").manual_seed(seed)
        static.copy_(torch.randn(T, E, device="cuda", generator=gen))  # new data, same buffer
        graph.replay()
        w_eager, ids_eager = pcg.route(static, k, **kw)
        torch.cuda.synchronize()
        assert torch.equal(ids_static, ids_eager)
        assert torch.equal(w_static, w_eager)
