"""ctest: the CMake-built library loads into a plain torch with torch.ops.load_library and its op runs."""

import sys

import torch

torch.ops.load_library(sys.argv[1])
value = torch.arange(4.0).view(1, 4, 1, 1)
out = torch.ops.deformable_detr.ms_deform_attn(
    value, torch.tensor([[2, 2]]), torch.tensor([0]), torch.full((1, 1, 1, 1, 1, 2), 0.5), torch.ones(1, 1, 1, 1, 1)
)
assert abs(out.item() - 1.5) < 1e-6, out
print("OK: torch.ops.load_library + ms_deform_attn =", out.item())
