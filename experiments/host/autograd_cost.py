"""CPU time per forward + backward of the MSDA op on tiny inputs (the kernels cost nothing), four ways: the two ops
without autograd, a plain torch.autograd.Function, torch.ops with the torch.library.register_autograd wrapper, and
dd.ms_deform_attn. ``python -m experiments.host.autograd_cost``: 1 thread, 1000 calls per row, 3 rounds."""

from __future__ import annotations

import time

import torch

import deformable_detr as dd

OPS = torch.ops.deformable_detr


class _Plain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, shapes, starts, loc, weights):
        ctx.save_for_backward(value, shapes, starts, loc, weights)
        with torch._C._AutoDispatchBelowAutograd():
            return OPS.ms_deform_attn(value, shapes, starts, loc, weights)

    @staticmethod
    def backward(ctx, grad):
        value, shapes, starts, loc, weights = ctx.saved_tensors
        gv, gl, gw = OPS.ms_deform_attn_backward(grad.contiguous(), value, shapes, starts, loc, weights, None, False)
        return gv, None, None, gl, gw


def main() -> None:
    torch.set_num_threads(1)
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    value = torch.randn(1, 20, 2, 8, requires_grad=True)
    loc = torch.rand(1, 3, 2, 2, 2, 2, requires_grad=True)
    weights = torch.rand(1, 3, 2, 2, 2, requires_grad=True)

    def raw():
        with torch.no_grad():
            out = OPS.ms_deform_attn(value, shapes, starts, loc, weights)
            OPS.ms_deform_attn_backward(torch.ones_like(out), value, shapes, starts, loc, weights, None, False)

    def through(call):
        def run():
            out = call(value, shapes, starts, loc, weights)
            out.backward(torch.ones_like(out))

        return run

    rows = [
        ("raw fwd+bwd ops, no autograd", raw),
        ("torch.ops via register_autograd", through(OPS.ms_deform_attn)),
        ("plain autograd.Function", through(_Plain.apply)),
        ("dd.ms_deform_attn", through(dd.ms_deform_attn)),
    ]
    for _, fn in rows:
        for _ in range(200):
            fn()
    for round_ in range(3):
        for name, fn in rows:
            t = time.process_time()
            for _ in range(1000):
                fn()
            print(round_, name, round((time.process_time() - t) / 1000 * 1e6, 1), "us CPU")


if __name__ == "__main__":
    main()
