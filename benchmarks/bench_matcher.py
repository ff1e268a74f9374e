"""Matcher suite: the batched exact LSAP solver vs a scipy loop, and the full Hungarian matcher vs the per-layer
scipy matcher of the DETR originals.

Solver cases: B in {2, 16, 208} problems of 300 x {20, 100, 300, 600} float32 costs, plus the acceptance case
"7x16" (7 decoder layers x 16 images, 300 x 20). Baseline "scipy-loop": the costs copied to the host, then
``scipy.optimize.linear_sum_assignment`` per problem, what every DETR trainer does. Every case also checks that the
batched solver's indices equal scipy's (``identical``).

Matcher case: 7 layers x 16 images, 300 queries, 91 classes, 10..30 targets per image (seeded): our
``HungarianMatcher.match_many`` (one solver launch) vs the originals' matcher run once per layer (cost matrix on
the device, ``.cpu()``, scipy per image).

``python -m benchmarks.bench_matcher [--quick] [--device cpu|cuda]`` prints the table; ``run`` returns the rows.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa

from benchmarks import timing
from deformable_detr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deformable_detr.models.matcher import HungarianMatcher
from deformable_detr.ops.assignment import batched_linear_sum_assignment

SUITE = "matcher"
SHAPES = [(300, 20), (300, 100), (300, 300), (300, 600)]
BATCHES = [2, 16, 208]
QUICK_SHAPES = [(300, 20), (300, 100)]
QUICK_BATCHES = [2, 16]


def scipy_loop(cost: torch.Tensor) -> np.ndarray:
    c = cost.cpu().numpy()
    out = np.full(c.shape[:2], -1, dtype=np.int64)
    for b in range(c.shape[0]):
        rows, cols = scipy_lsa(c[b])
        out[b, rows] = cols
    return out


def _lap_loop(solve):
    """A per-problem loop over a CPU LAPJV ``solve(c) -> (cost, row_to_col)``, same output layout as scipy_loop."""

    def loop(cost: torch.Tensor) -> np.ndarray:
        c = cost.cpu().numpy().astype(np.float64)
        out = np.full(c.shape[:2], -1, dtype=np.int64)
        for b in range(c.shape[0]):
            out[b] = solve(c[b])
        return out

    return loop


def _lap_solve(c: np.ndarray) -> np.ndarray:
    import lap

    return lap.lapjv(c, extend_cost=True)[1]  # rows x cols; extend_cost pads the rectangular problem itself


def _lapjv_solve(c: np.ndarray) -> np.ndarray:
    import lapjv

    n, m = c.shape  # square only: zero-cost dummy columns change no real column's optimal assignment
    row_to_col = lapjv.lapjv(np.pad(c, ((0, 0), (0, n - m))))[0]
    return np.where(row_to_col < m, row_to_col, -1)


def lapjv_peers() -> dict[str, tuple[object | None, str]]:
    """CPU LAPJV peers: backend -> (loop over problems or None, reason). Optional dev tools from `make peers`."""
    out = {}
    for backend, module, solve in (("lap.lapjv-loop", "lap", _lap_solve), ("lapjv-loop", "lapjv", _lapjv_solve)):
        try:
            __import__(module)
        except ImportError:
            out[backend] = (None, "not installed: run make peers")
        else:
            out[backend] = (_lap_loop(solve), "ok")
    return out


def assignment_cost(cost: torch.Tensor, row_to_col: np.ndarray) -> float:
    """Total cost of a [B, N] row-to-column assignment (-1: unassigned row)."""
    c = cost.cpu().double().numpy()
    b, r = np.nonzero(row_to_col >= 0)
    return float(c[b, r, row_to_col[b, r]].sum())


def _peer():
    """torch-linear-assignment's batched solver when installed (the best public GPU solver), else None."""
    try:
        from torch_linear_assignment import batch_linear_assignment
    except Exception:
        return None
    return batch_linear_assignment


def solver_rows(device: torch.device, quick: bool) -> list[dict]:
    cases = [("7x16", 112, 300, 20)]
    for B in QUICK_BATCHES if quick else BATCHES:
        for N, M in QUICK_SHAPES if quick else SHAPES:
            cases.append((f"B={B}", B, N, M))
    peer = _peer()
    rows = []
    gen = torch.Generator().manual_seed(0)
    for name, B, N, M in cases:
        cost = torch.rand(B, N, M, generator=gen).to(device)
        identical = bool((batched_linear_sum_assignment(cost).cpu().numpy() == scipy_loop(cost)).all())
        fns = {"scipy-loop": lambda c=cost: scipy_loop(c), "batched": lambda c=cost: batched_linear_sum_assignment(c)}
        if peer is not None and device.type == "cuda":
            fns["torch_linear_assignment"] = lambda c=cost: peer(c)
        lap_same = {}
        for backend, (loop, _) in lapjv_peers().items():
            if loop is not None:
                fns[backend] = lambda c=cost, f=loop: f(c)
                lap_same[backend] = bool((loop(cost) == scipy_loop(cost)).all())
        # The big CPU cases take seconds per call on 2 cores: fewer rounds, same interleaving.
        heavy = device.type == "cpu" and B * N * M > 5e6
        times = timing.time_interleaved(fns, device, warmup=1, reps=3 if heavy else 11, budget_s=10 if quick else 30)
        base = times["scipy-loop"].get("time_ms")
        for backend, t in times.items():
            row = {
                "suite": SUITE,
                "name": f"solver {name}",
                "backend": backend,
                "shape": f"{B}x{N}x{M}",
                "dtype": "float32",
                "pass": "solve",
                "threads": torch.get_num_threads(),
            }
            if "error" in t:
                row["status"] = f"failed: {t['error']}"
            else:
                row.update(time_ms=t["time_ms"], speedup=base / t["time_ms"] if base else None, status="ok")
                row["samples"] = t["samples"]
            if backend == "batched":
                row["identical"] = identical
            if backend in lap_same:
                row["identical"] = lap_same[backend]
            rows.append(row)
        for backend, (loop, reason) in lapjv_peers().items():
            if loop is None:
                rows.append({"suite": SUITE, "name": f"solver {name}", "backend": backend,
                             "shape": f"{B}x{N}x{M}", "status": reason})  # fmt: skip
        if peer is None and device.type == "cuda":
            rows.append({"suite": SUITE, "name": f"solver {name}", "backend": "torch_linear_assignment",
                         "shape": f"{B}x{N}x{M}", "status": "not installed"})  # fmt: skip
    return rows


def reference_matcher(outputs: dict, targets: list[dict], cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, alpha=0.25):
    """Deformable DETR's matcher as published: one cost matrix on the device, then .cpu() and scipy per image."""
    B, Q = outputs["pred_logits"].shape[:2]
    prob = outputs["pred_logits"].flatten(0, 1).sigmoid()
    out_bbox = outputs["pred_boxes"].flatten(0, 1)
    tgt_ids = torch.cat([t["labels"] for t in targets])
    tgt_bbox = torch.cat([t["boxes"] for t in targets])
    neg = (1 - alpha) * (prob**2.0) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** 2.0) * (-(prob + 1e-8).log())
    c_class = pos[:, tgt_ids] - neg[:, tgt_ids]
    c_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)
    c_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))
    C = (cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou).view(B, Q, -1).cpu()
    sizes = [len(t["boxes"]) for t in targets]
    indices = [scipy_lsa(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def matcher_inputs(device: torch.device, layers=7, B=16, Q=300, num_classes=91, seed=0):
    gen = torch.Generator().manual_seed(seed)
    outputs_list = []
    for _ in range(layers):
        boxes = torch.cat(
            [torch.rand(B, Q, 2, generator=gen) * 0.8 + 0.1, torch.rand(B, Q, 2, generator=gen) * 0.3 + 0.02], -1
        )
        outputs_list.append({"pred_logits": torch.randn(B, Q, num_classes, generator=gen).to(device),
                             "pred_boxes": boxes.to(device)})  # fmt: skip
    targets = []
    for n in torch.randint(10, 31, (B,), generator=gen).tolist():
        boxes = torch.cat(
            [torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.3 + 0.02], -1
        )
        targets.append(
            {"labels": torch.randint(0, num_classes, (n,), generator=gen).to(device), "boxes": boxes.to(device)}
        )
    return outputs_list, targets


def matcher_rows(device: torch.device, quick: bool) -> list[dict]:
    outputs_list, targets = matcher_inputs(device)
    matcher = HungarianMatcher()
    ours = matcher.match_many(outputs_list, targets)
    ref = [reference_matcher(out, targets) for out in outputs_list]
    identical = all(
        torch.equal(a.cpu(), c) and torch.equal(b.cpu(), d)
        for layer_ours, layer_ref in zip(ours, ref)
        for (a, b), (c, d) in zip(layer_ours, layer_ref)
    )

    def ours_fn():
        result = matcher.match_many(outputs_list, targets)
        timing.synchronize(device)  # the caller gets device tensors; count the work they stand for
        return result

    fns = {
        "scipy-per-layer": lambda: [reference_matcher(out, targets) for out in outputs_list],
        "batched-matcher": ours_fn,
    }
    times = timing.time_interleaved(fns, device, warmup=1, reps=7 if quick else 15, budget_s=10 if quick else 30)
    base = times["scipy-per-layer"].get("time_ms")
    rows = []
    for backend, t in times.items():
        row = {"suite": SUITE, "name": "matcher 7 layers x 16 img", "backend": backend, "shape": "7x16x300, ~20 tgt",
               "dtype": "float32", "pass": "match", "threads": torch.get_num_threads()}  # fmt: skip
        if "error" in t:
            row["status"] = f"failed: {t['error']}"
        else:
            row.update(time_ms=t["time_ms"], speedup=base / t["time_ms"] if base else None, status="ok")
        if backend == "batched-matcher":
            row["identical"] = identical
        rows.append(row)
    return rows


def run(device="cpu", quick: bool = False) -> list[dict]:
    device = torch.device(device)
    return solver_rows(device, quick) + matcher_rows(device, quick)


def _print_table(rows: list[dict]) -> None:
    header = f"{'case':28} {'backend':24} {'shape':18} {'ms':>10} {'speed-up':>9} {'identical':>9}  status"
    print(header)
    print("-" * len(header))
    for r in rows:
        ms = f"{r['time_ms']:.3f}" if r.get("time_ms") is not None else ""
        sp = f"{r['speedup']:.2f}x" if r.get("speedup") is not None else ""
        ident = str(r.get("identical", ""))
        print(f"{r['name']:28} {r['backend']:24} {r.get('shape', ''):18} {ms:>10} {sp:>9} {ident:>9}  {r['status']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _print_table(run(args.device, args.quick))
