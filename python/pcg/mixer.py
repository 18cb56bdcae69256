"""pcg::mixer: a hybrid model's token mixer that is not attention (linear or
lightning attention, gated delta rule, Mamba, short convolution), over the
packed batch of the running forward.

Such a layer carries state along the sequence, so it must not run over the
packed row (it would mix tokens across sequences). pcg runs it like
attention: as a split op, eagerly between graph replays, and one real
sequence at a time through the module's own forward (its own kernels, no
cache). Pad rows of the bucket are written as zeros.

x [N, H] -> out [N, H] where N is the padded token count of the bucket; only
the first ``batch.num_tokens`` rows are real.
"""
from __future__ import annotations

import torch

from . import registry as _reg
from .batch import BatchMeta
from .registry import MixerLayer

_lib = torch.library.Library("pcg", "IMPL")


def compute(x: torch.Tensor, out: torch.Tensor, layer: MixerLayer, batch: BatchMeta | None) -> None:
    if batch is None:
        batch = BatchMeta(x.shape[0], [0, x.shape[0]], None, x.shape[0])
    n, cu = batch.num_tokens, batch.cu_seqlens
    for a, b in zip(cu, cu[1:]):
        if b <= a:
            continue
        y = layer.forward(x[None, a:b], **layer.kwargs)
        if isinstance(y, (tuple, list)):
            layer.n_out = len(y)
            y = y[0]
        else:
            layer.n_out = 0
        if not isinstance(y, torch.Tensor) or tuple(y.shape) != (1, b - a, out.shape[1]):
            raise RuntimeError(f"pcg: mixer layer {layer.layer_id} ({layer.name}) returned "
                               f"{type(y).__name__} {tuple(getattr(y, 'shape', ()))} for a sequence "
                               f"of {b - a} tokens; expected [1, {b - a}, {out.shape[1]}]")
        out[a:b] = y[0]
    if n < out.shape[0]:
        out[n:].zero_()


def _check(x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"pcg::mixer: x must be [T, hidden]; got {tuple(x.shape)}")


def mixer_out(x: torch.Tensor, out: torch.Tensor, layer: int) -> None:
    _check(x)
    ctx = _reg.current()
    compute(x, out, ctx.registry.mixer(layer), ctx.batch)


def mixer(x: torch.Tensor, layer: int) -> torch.Tensor:
    _check(x)
    ctx = _reg.current()
    out = torch.empty_like(x)
    spec = ctx.registry.mixer(layer)
    if ctx.recorder is not None:
        # Inside a capture: end the segment here, run and record the split call.
        return ctx.recorder.split("pcg::mixer_out", [x, out, layer], out)
    compute(x, out, spec, ctx.batch)
    return out


for _key in ("CPU", "CUDA"):
    _lib.impl("mixer", mixer, _key)
    _lib.impl("mixer_out", mixer_out, _key)


@torch.library.register_fake("pcg::mixer")
def _mixer_fake(x, layer):
    return torch.empty_like(x)


@torch.library.register_fake("pcg::mixer_out")
def _mixer_out_fake(x, out, layer):
    return None
