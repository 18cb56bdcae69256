"""bench/tune_moe.py's table logic (CPU): merging timed choices into rows, the
stream path's pair limit, CUTLASS rows with GEMM kernel variants, and that the
checked-in table is exactly what the generator writes (hand edits would be
lost at the next tune)."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


@pytest.fixture(scope="module")
def tune():
    path = os.path.join(ROOT, "bench", "tune_moe.py")
    spec = importlib.util.spec_from_file_location("_pcg_tune_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


NAMES = {0: "g16", 4: "d16", 1: "g32", 5: "d32"}


def _t_max(row: str) -> int:
    return int(re.match(r"\{(\d+),", row).group(1))


def test_merge_rows_midpoints_and_labels(tune):
    results = [(1, (16, 0, 4), 10.0, 10.0), (2, (16, 0, 4), 11.0, 11.0),
               (16, (32, 1, 5), 20.0, 25.0), (256, (-1, -1, -1), 30.0, 90.0)]
    rows = tune.merge_rows(results, NAMES, 8)
    assert len(rows) == 3
    # a row reaches the geometric midpoint to the next choice; the last row is open-ended
    assert [_t_max(r) for r in rows] == [5, 64, 256]
    assert "g16 + d16" in rows[0] and "cutlass_sm90" in rows[2]
    assert rows[2].startswith("{256, -1, -1, -1}")


@pytest.mark.parametrize("k,last_stream_t,next_t,want", [
    (4, 32, 48, 32),   # midpoint 39 would pass the 128-pair limit (T <= 32 at k = 4)
    (8, 8, 16, 11),    # midpoint 11 is within the limit (T <= 16)
    (2, 48, 64, 55),   # midpoint 55 is within the limit (T <= 64)
])
def test_stream_row_stops_at_the_pair_limit(tune, k, last_stream_t, next_t, want):
    results = [(1, (-2, -1, -1), 1.0, 2.0), (last_stream_t, (-2, -1, -1), 1.0, 2.0),
               (next_t, (16, 0, 4), 1.0, 1.0)]
    rows = tune.merge_rows(results, NAMES, k)
    assert _t_max(rows[0]) == want
    assert want * k <= tune.STREAM_MAX_PAIRS


VARIANTS = {0: "coop_128x256x64", 1: "pingpong_64x256x64", 2: "coop_256x128x64"}


def test_cutlass_variant_rows(tune):
    """[-1, g1, g2] rows: CUTLASS with GEMM kernel variants (-1: the default) are
    their own choices, labelled by variant; the default stays {.., -1, -1, -1}."""
    results = [(16, (16, 0, 4), 10.0, 10.0),
               (256, (-1, -1, -1), 20.0, 40.0),
               (1024, (-1, -1, 1), 30.0, 90.0), (2048, (-1, -1, 1), 50.0, 190.0),
               (8192, (-1, 2, -1), 70.0, 400.0)]
    rows = tune.merge_rows(results, NAMES, 8, VARIANTS)
    assert [_t_max(r) for r in rows] == [64, 512, 4096, 8192]
    assert rows[1].startswith("{512, -1, -1, -1},  // cutlass_sm90;")
    assert rows[2].startswith("{4096, -1, -1, 1},  // cutlass_sm90 default + pingpong_64x256x64;")
    assert rows[3].startswith("{8192, -1, 2, -1},  // cutlass_sm90 coop_256x128x64 + default;")
    # Without the names (an old caller) the ids still show.
    assert "variant 1" in tune.merge_rows(results, NAMES, 8)[2]


def test_cutlass_variant_rows_round_trip(tune):
    rows = ["{11, -2, -1, -1},  // stream; us (heuristic): T1 1.0/2.0",
            "{110, 16, 0, 4},  // g16 + d16; us (heuristic): T16 1.0/1.0",
            "{4096, -1, -1, -1},  // cutlass_sm90; us (heuristic): T128 1.0/2.0",
            "{16384, -1, 3, 1},  // cutlass_sm90 a + b; us (heuristic): T8192 1.0/2.0"]
    shapes = {(128, 8, 2048, 768): ("qwen3: E_local=128 top_k=8 H=2048 I=768", rows)}
    text = tune.render_table(shapes, "// source")
    assert tune.parse_table(text) == shapes
    assert "{-1, g1, g2} CUTLASS sm_90a" in text


def test_cutlass_variant_search_order(tune):
    """Every GEMM1 variant with GEMM2's default, then every GEMM2 variant with the
    fastest GEMM1 one, then the runners-up of GEMM1 (failed ones excluded) with
    the fastest GEMM2 one; the default is never named by its id."""
    us = {(-1, -1, -1): 10.0, (-1, 1, -1): 12.0, (-1, 2, -1): 9.0, (-1, 3, -1): float("inf"),
          (-1, 2, 1): 8.0, (-1, 2, 2): 9.5, (-1, 2, 3): 11.0, (-1, -1, 1): 7.0, (-1, 1, 1): 9.0}
    got = list(tune.cutlass_variant_candidates([-1, 1, 2, 3], us.__getitem__))
    assert got == [(-1, -1, -1), (-1, 1, -1), (-1, 2, -1), (-1, 3, -1),
                   (-1, 2, 1), (-1, 2, 2), (-1, 2, 3), (-1, -1, 1), (-1, 1, 1)]
    assert list(tune.cutlass_variant_candidates([-1], us.__getitem__)) == [(-1, -1, -1)]
    # GEMM1 limited to the variants that fuse the activation (no swap-AB): 3 only on GEMM2.
    got = list(tune.cutlass_variant_candidates([-1, 1, 2, 3], us.__getitem__, [-1, 1, 2]))
    assert got == [(-1, -1, -1), (-1, 1, -1), (-1, 2, -1), (-1, 2, 1), (-1, 2, 2), (-1, 2, 3),
                   (-1, -1, 1), (-1, 1, 1)]
    # GEMM2's default stays the best: no third stage (those pairs were timed
    # first); the fourth runs the GEMM1 runner-up 1 as GEMM2 too.
    us2 = dict(us)
    us2.update({(-1, 2, 1): 9.5, (-1, 2, 2): 9.6, (-1, 2, 3): 9.7})
    got = list(tune.cutlass_variant_candidates([-1, 1, 2, 3], us2.__getitem__))
    assert got == [(-1, -1, -1), (-1, 1, -1), (-1, 2, -1), (-1, 3, -1),
                   (-1, 2, 1), (-1, 2, 2), (-1, 2, 3), (-1, 1, 1)]


def test_cutlass_variant_search_times_same_variant_pairs(tune):
    """GEMM1's default first with GEMM2's default (DeepSeek-V2-Lite T = 8192,
    session 28): stage two pairs only the default GEMM1 with each GEMM2, so the
    GEMM1 runners-up (8, then 10) also run as both GEMMs, (v, v), where they can
    run GEMM2 (8, a gather kernel, cannot); nothing is yielded twice."""
    us = {(-1, -1, -1): 10.0, (-1, 8, -1): 10.5, (-1, 10, -1): 10.6, (-1, 1, -1): 11.0,
          (-1, -1, 1): 11.2, (-1, -1, 10): 10.8}
    got = list(tune.cutlass_variant_candidates([-1, 1, 10], us.__getitem__, [-1, 1, 8, 10]))
    assert got == [(-1, -1, -1), (-1, 1, -1), (-1, 8, -1), (-1, 10, -1),
                   (-1, -1, 1), (-1, -1, 10), (-1, 10, 10)]
    assert len(got) == len(set(got))


def test_finalists_and_confirmed_pick(tune):
    """The fastest FINALISTS configs plus today's choice; the pick in alternation
    must beat today's by min_gain in every round, else today's is kept."""
    valid = {(i, 0, 0): float(10 + i) for i in range(7)}
    base = (6, 0, 0)
    f = tune.finalists(valid, base)
    assert f == [(i, 0, 0) for i in range(tune.FINALISTS)] + [base]
    assert tune.finalists(valid, (1, 0, 0)) == [(i, 0, 0) for i in range(tune.FINALISTS)]
    assert tune.finalists(valid, (9, 9, 9)) == [(i, 0, 0) for i in range(tune.FINALISTS)]
    a, b, c = (-1, 10, 10), (-1, 10, 1), (-1, -1, -1)
    # c wins both rounds by 8% over today's b: taken.
    assert tune.confirmed_pick([a, b, c], [[9.8, 10.0, 9.2], [9.9, 10.0, 9.2]], b, 0.02) == c
    # c's mean is best, but it wins one round only: today's b stays.
    assert tune.confirmed_pick([a, b, c], [[9.9, 10.0, 8.0], [9.9, 10.0, 9.9]], b, 0.02) == b
    # a gain under min_gain keeps today's.
    assert tune.confirmed_pick([a, b], [[9.9, 10.0], [9.9, 10.0]], b, 0.02) == b
    # today's choice not among the candidates: the fastest on average.
    assert tune.confirmed_pick([a, c], [[9.0, 9.5], [9.4, 8.0]], b, 0.02) == c


def test_checked_in_table_is_the_generators_output(tune):
    path = os.path.join(ROOT, "csrc", "moe", "fused_moe_tuning.h")
    with open(path) as f:
        text = f.read()
    lines = text.splitlines()
    start = 1  # after "// GENERATED ..."
    end = next(i for i, ln in enumerate(lines) if ln.startswith("// Regenerate on a GPU"))
    source = "\n".join(lines[start:end])
    shapes = tune.parse_table(text)
    assert len(shapes) >= 4
    assert tune.render_table(shapes, source) == text


def test_table_rows_are_sorted_and_stream_rows_within_the_limit(tune):
    path = os.path.join(ROOT, "csrc", "moe", "fused_moe_tuning.h")
    with open(path) as f:
        shapes = tune.parse_table(f.read())
    for (E, k, H, I), (_, rows) in shapes.items():
        t = [_t_max(r) for r in rows]
        assert t == sorted(t) and len(set(t)) == len(t), (E, k, H, I)
        for r in rows:
            if r.startswith(f"{{{_t_max(r)}, -2,"):
                assert _t_max(r) * k <= tune.STREAM_MAX_PAIRS, (E, k, H, I, r)


def test_neighbour_pass_takes_only_confirmed_correct_neighbours(tune):
    """Each T's choice is timed in alternation against its neighbours' choices:
    a neighbour faster by --min-gain in two rounds is taken; a slower one, one
    winning one round of two, one computing another result and one the call
    cannot take (ValueError) are not."""
    import argparse

    import torch

    A, B, C, D = (-1, 1, 4), (-1, 4, 6), (-2, -1, -1), (-1, 5, 5)
    # us of each config per T (lower is faster)
    speed = {8: {C: 10.0, A: 12.0}, 16: {A: 100.0, B: 95.0}, 32: {B: 80.0, A: 79.8, D: 70.0},
             48: {D: 60.0, B: 50.0}, 64: {B: 50.0, D: 40.0}}
    wrong = {(48, B)}  # B computes another result at T = 48

    class FakeBench:
        @staticmethod
        def make_inputs(T, E, k, H, seed, device):
            return (torch.full((T, H), 1.0), None, None)

    def op(x, w13, w2, ids, wts, config):
        T = x.shape[0]
        if tuple(config) == C and T > 8:
            raise ValueError("stream: too many pairs")
        return x * (2.0 if (T, tuple(config)) in wrong else 1.0)

    calls = {}

    def paired(sets, a, b, reps):
        T = sets[0][0].shape[0]
        n = calls[(T, a)] = calls.get((T, a), 0) + 1
        if T == 64 and a == D and n == 2:  # D wins the first round at T = 64, not the second
            return speed[T][b], speed[T][b]
        return speed[T][a], speed[T][b]

    results = [(8, C, 10.0, 12.0), (16, A, 100.0, 120.0), (32, B, 80.0, 120.0), (48, D, 60.0, 120.0),
               (64, B, 50.0, 120.0)]
    args = argparse.Namespace(sets=1, iters=10, budget_ms=1.0, min_gain=0.005)
    logged = []
    tune.neighbour_pass("s", results, args, paired, op, None, None, 8, 2, 4, FakeBench, "cpu",
                        logged.append, str)
    # T = 8: A slower -> not taken; T = 16: C cannot run there, B 5% faster ->
    # taken; T = 32: A only 0.25% faster (below min_gain) -> not, D 12.5% faster
    # -> taken; T = 48: B computes another result -> not; T = 64: D wins one of
    # two rounds -> not
    assert [r[1] for r in results] == [C, B, D, D, B]
    assert results[1][2] == 95.0 and results[2][2] == 70.0
    assert any("WRONG RESULT" in line for line in logged)
    assert sum(line.endswith(": taken") for line in logged) == 2
    assert any("(1 of 2 rounds won): not confirmed" in line for line in logged)
