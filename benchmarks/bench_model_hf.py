"""Deformable DETR R50 (6+6 layers, 300 queries, 4 levels), ours vs HF transformers'
``DeformableDetrForObjectDetection`` with the same weights, in one run.

Rows: inference on one 800x1066 image and a train step (forward, the model's own set criterion, backward,
AdamW step), for ours eager (as built), ours optimized (``optimize_for_inference``: folded BN, channels_last;
inference only), ours compiled (``torch.compile``, inductor), HF, HF with our kernel (``patch_transformers``).
Outputs of every inference row are compared with HF's (``max_err``). A profile of one inference call per eager
row splits self time into the MSDA op (ours, or HF's grid_sample path), convolution, matmul, element-wise and
the rest.

Times are medians of interleaved rounds; each row also carries the process CPU time (all threads), which a
shared machine disturbs less than wall time. HF transformers + timm are optional: without them the rows say so.

``python -m benchmarks.bench_model_hf [--threads 2] [--train-size 512x683] [--no-compile] [--no-train-compile]
[--out DIR]``
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import report

SUITE = "model-hf"
BASELINE = "hf"
INFER_SIZE = (800, 1066)
TRAIN_SIZE = (512, 683)
NUM_CLASSES = 91

# Profile buckets, by aten op name (self time of each op goes to the first bucket that names it).
_BUCKETS = {
    "msda": ("deformable_detr::", "grid_sampler", "grid_sample"),
    "conv": ("convolution", "mkldnn_convolution", "conv2d", "_convolution"),
    "matmul": ("addmm", "aten::mm", "bmm", "baddbmm", "matmul", "linear", "_addmm_activation"),
    "element-wise": (
        "add", "mul", "sub", "div", "copy_", "clamp", "fill_", "masked_fill", "sigmoid", "relu", "threshold",
        "where", "exp", "log", "sin", "cos", "pow", "neg", "rsqrt", "softmax", "native_layer_norm",
        "native_group_norm", "cumsum", "clone", "contiguous", "to", "_to_copy", "cat", "stack", "zeros", "empty",
        "ones", "full", "gelu", "max_pool", "upsample", "interpolate", "bitwise", "eq", "ne", "lt", "gt", "le",
        "ge", "logical", "maximum", "minimum", "abs", "sum", "mean", "topk", "gather", "index",
    ),
}  # fmt: skip


def _transformers():
    import timm  # noqa: F401
    import transformers

    return transformers


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights and frozen-BN statistics everywhere (HF zero-inits some heads), so every parameter shows
    in the outputs and BN folding has real statistics to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.2 if "sampling_offsets" in name else 0.02))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.5 + 0.75)


def build_pair(seed: int = 0):
    """(ours, hf): the HF R50 model with perturbed weights and ours loaded from its state dict (strict)."""
    transformers = _transformers()
    import deformable_detr.models as M

    torch.manual_seed(seed)
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet50", num_labels=NUM_CLASSES,
        auxiliary_loss=True,
    )  # fmt: skip
    hf = transformers.DeformableDetrForObjectDetection(config)
    _perturb(hf, seed)
    ours = M.build(M.DeformableDETRConfig(num_classes=NUM_CLASSES))
    report = M.load_checkpoint(ours, hf.state_dict())
    if not report.ok:
        raise RuntimeError(f"HF -> ours weight conversion: missing {report.missing_keys[:5]}, unexpected "
                           f"{report.unexpected_keys[:5]}")  # fmt: skip
    return ours, hf


def _hf_call(model, images, patched: bool, labels=None):
    from deformable_detr.integrations import patch_transformers, unpatch_transformers

    if patched:
        patch_transformers()
    else:
        unpatch_transformers()
    mask = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.long)
    return model(pixel_values=images, pixel_mask=mask, labels=labels)


def _timed(fns: dict[str, Callable[[], object]], reps: int, budget_s: float) -> dict[str, dict]:
    """Interleaved rounds (rotated order) of wall and process CPU time; one warm-up call each (the compile)."""
    samples: dict[str, list[tuple[float, float]]] = {}
    errors: dict[str, str] = {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            fn()
            samples[name] = []
            errors.pop(name, None)
            if time.perf_counter() - t0 > budget_s:
                reps = 1
        except Exception as exc:  # a failing variant is a result row, not a crash of the run
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    live = list(samples)
    start = time.perf_counter()
    for r in range(reps):
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
        for name in live[r % len(live) :] + live[: r % len(live)]:
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            samples[name].append((time.perf_counter() - w, time.process_time() - c))
    out = {name: {"error": err} for name, err in errors.items()}
    for name, s in samples.items():
        out[name] = {
            "time_ms": statistics.median(x[0] for x in s) * 1e3,
            "cpu_ms": statistics.median(x[1] for x in s) * 1e3,
            "samples": len(s),
        }
    return out


def profile_breakdown(fn: Callable[[], object]) -> dict[str, float]:
    """Share of profiled self CPU time per bucket (msda / conv / matmul / element-wise / other)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    totals = dict.fromkeys([*_BUCKETS, "other"], 0.0)
    for event in prof.key_averages():
        name = event.key
        bucket = next((b for b, keys in _BUCKETS.items() if any(k in name for k in keys)), "other")
        totals[bucket] += event.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return {k: v / total for k, v in totals.items()}


def _outputs(out) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(out, "logits"):  # HF ModelOutput (a dict subclass with other keys)
        return out.logits, out.pred_boxes
    return out["pred_logits"], out["pred_boxes"]


def _max_err(a, b) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(_outputs(a), _outputs(b)))


def inference_rows(ours, hf, *, compile: bool, reps: int, budget_s: float, profile: bool) -> list[dict]:
    from deformable_detr.models import optimize_for_inference

    images = torch.rand(1, 3, *INFER_SIZE, generator=torch.Generator().manual_seed(1))
    optimized = optimize_for_inference(copy.deepcopy(ours))
    fns = {
        "ours": lambda: ours(images),
        "ours-optimized": lambda: optimized(images),
        "hf": lambda: _hf_call(hf, images, False),
        "hf+our-kernel": lambda: _hf_call(hf, images, True),
    }
    if compile:
        compiled = optimize_for_inference(copy.deepcopy(ours), compile=True)
        fns["ours-compiled"] = lambda: compiled(images)
    ours.eval()
    hf.eval()
    with torch.no_grad():
        times = _timed(fns, reps, budget_s)
        reference = fns["hf"]()
        rows = []
        for name, res in times.items():
            row = _row(name, "inference", f"B=1 {INFER_SIZE[0]}x{INFER_SIZE[1]}", res)
            if "error" not in res:
                row["max_err"] = _max_err(fns[name](), reference)
                if profile and name != "ours-compiled":
                    row["profile"] = profile_breakdown(fns[name])
            rows.append(row)
    return rows


def _targets(batch: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centers = torch.rand(8, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(8, 2, generator=g) * 0.25 + 0.05
        targets.append(
            {"labels": torch.randint(0, NUM_CLASSES, (8,), generator=g), "boxes": torch.cat([centers, sizes], 1)}
        )
    return targets


def train_rows(ours, hf, *, compile: bool, size: tuple[int, int], reps: int, budget_s: float) -> list[dict]:
    import deformable_detr.models as M
    from deformable_detr.models import compile_model

    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    targets = _targets(1)
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    criterion = M.build_criterion(M.DeformableDETRConfig(num_classes=NUM_CLASSES))
    models = {"ours": ours, "hf": hf, "hf+our-kernel": copy.deepcopy(hf)}
    if compile:
        models["ours-compiled"] = copy.deepcopy(ours)
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-6) for k, m in models.items()
    }
    compiled = compile_model(models["ours-compiled"]) if compile else None

    def step(name):
        model, optimizer = models[name], optimizers[name]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        if name.startswith("hf"):
            loss = _hf_call(model, images, name == "hf+our-kernel", labels=hf_labels).loss
        else:
            outputs = (compiled if name == "ours-compiled" else model)(images)
            losses = criterion(outputs, targets)
            loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        loss.backward()
        optimizer.step()
        return loss

    times = _timed({name: (lambda n=name: step(n)) for name in models}, reps, budget_s)
    return [_row(name, "train", f"B=1 {size[0]}x{size[1]}", res) for name, res in times.items()]


def _row(name: str, pass_name: str, shape: str, res: dict) -> dict:
    row = {"suite": SUITE, "name": "deformable-detr-r50", "backend": name, "pass": pass_name, "shape": shape,
           "dtype": "fp32"}  # fmt: skip
    if "error" in res:
        row["status"] = f"failed: {res['error']}"
    else:
        row.update(res, status="ok")
    return row


def run(
    *,
    compile: bool = True,
    train_compile: bool = True,
    train_size=TRAIN_SIZE,
    reps: int = 3,
    budget_s: float = 400.0,
    profile=True,
):
    """All rows; a single row saying why when transformers/timm are not importable."""
    try:
        _transformers()
    except Exception as exc:
        reason = f"not available: HF transformers + timm needed ({type(exc).__name__}: {exc})".splitlines()[0]
        return [{"suite": SUITE, "name": "deformable-detr-r50", "backend": BASELINE, "status": reason}]
    from deformable_detr.integrations import unpatch_transformers

    ours, hf = build_pair()
    try:
        rows = inference_rows(ours, hf, compile=compile, reps=reps, budget_s=budget_s, profile=profile)
        if train_size:
            rows += train_rows(ours, hf, compile=train_compile, size=train_size, reps=reps, budget_s=budget_s)
    finally:
        unpatch_transformers()
    for key in ("time_ms", "cpu_ms"):
        base = {r["pass"]: r[key] for r in rows if r.get("backend") == BASELINE and key in r}
        for r in rows:
            if key in r and r.get("pass") in base:
                r["speedup" if key == "time_ms" else "cpu_speedup"] = base[r["pass"]] / r[key]
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Deformable DETR R50: ours vs HF transformers — {env.get('device_name')}, {str(env.get('date'))[:10]}",
        "",
        *report.environment_lines(env),
        f"- transformers {env.get('transformers')}",
        "- same weights in both (HF's, perturbed, loaded into ours strict); `max err` = largest |difference| of "
        "pred_logits / pred_boxes against HF in this run",
        "- wall = median of interleaved rounds; CPU = median process CPU time (all threads; less disturbed by "
        "other load on a shared machine); × HF = HF time / row time (wall, CPU)",
        "",
        "| pass | shape | variant | wall ms | CPU ms | × HF (wall) | × HF (CPU) | max err | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.get("pass", ""), r.get("shape", ""), r.get("backend", "")]
        cells += [f"{r[k]:.0f}" if k in r else "" for k in ("time_ms", "cpu_ms")]
        cells += [f"{r[k]:.2f}×" if k in r else "" for k in ("speedup", "cpu_speedup")]
        cells += [f"{r['max_err']:.1e}" if "max_err" in r else "", r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    profiled = [r for r in rows if "profile" in r]
    if profiled:
        buckets = list(profiled[0]["profile"])
        lines += ["", "Profile of one inference call (share of self CPU time):", ""]
        lines += ["| variant | " + " | ".join(buckets) + " |", "|---|" + "---|" * len(buckets)]
        for r in profiled:
            lines.append(f"| {r['backend']} | " + " | ".join(f"{r['profile'][b]:.1%}" for b in buckets) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--train-size", default=f"{TRAIN_SIZE[0]}x{TRAIN_SIZE[1]}", help="HxW, or 'none'")
    parser.add_argument("--no-compile", action="store_true", help="no compiled rows")
    parser.add_argument("--no-train-compile", action="store_true", help="no compiled train-step row")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_size = None if args.train_size == "none" else tuple(int(v) for v in args.train_size.split("x"))
    env = report.environment("cpu")
    try:
        env["transformers"] = _transformers().__version__
    except Exception:
        env["transformers"] = None
    t0 = time.perf_counter()
    rows = run(
        compile=not args.no_compile,
        train_compile=not (args.no_compile or args.no_train_compile),
        train_size=train_size,
        reps=args.reps,
        profile=not args.no_profile,
    )
    env["wall_s"] = round(time.perf_counter() - t0, 1)
    stem = f"model-hf-{report.device_slug('cpu')}-{_dt.date.today().isoformat()}"
    text = markdown(env, rows)
    report.write_json_and_markdown(env, rows, text, args.out, stem)
    print(text)


if __name__ == "__main__":
    main()
