"""HF transformers families with multi-scale deformable attention, as shipped vs with ``patch_transformers()``:
same model, same weights, same input, in one run.

Rows:
- ``forward``: one image through each family's default-size model with random weights (nothing downloaded):
  RT-DETRv2 R50 and D-FINE (HGNetV2, decoder points [3, 6, 3] per level as in its configs) at 640x640,
  Mask2Former and OneFormer (Swin-T) at 512x512, DETA (R50, two-stage, 900 queries) at 640x640. Each row
  carries ``max_err`` (largest |difference| of the family's main MSDA-bearing output against HF in this run:
  detection logits, or the pixel decoder's last feature map for the segmentation families) and the profiler's
  share of self CPU time in MSDA (our op, or HF's grid_sample / gather path).
- ``op``: the attention alone at D-FINE's decoder shape (1 image, 300 queries, 8 heads x 32, levels 80x80, 40x40,
  20x20, points [3, 6, 3]): HF's ``multi_scale_deformable_attention_v2`` vs our op with ``points_per_level``,
  forward and forward+backward.

Times are medians of interleaved rounds (1 warm-up call each), with process CPU time (all threads), which a
shared machine disturbs less than wall time.

``python -m benchmarks.bench_families_hf [--threads 1] [--reps 2] [--families rt_detr_v2,d_fine,...] [--out DIR]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from pathlib import Path

import torch

from benchmarks import report, timing
from benchmarks.bench_model_hf import _timed, profile_breakdown

SUITE = "families-hf"
FAMILIES = ("mask2former", "rt_detr_v2", "deta", "d_fine", "oneformer")
D_FINE_POINTS = [3, 6, 3]


def _build(family: str):
    """(model, inputs, main output getter, image size) for one family at its default size, random weights."""
    import transformers as T

    torch.manual_seed(0)  # transformers initialises from the global generator
    if family == "rt_detr_v2":
        model, size = T.RTDetrV2ForObjectDetection(T.RTDetrV2Config()), 640
    elif family == "d_fine":
        model, size = T.DFineForObjectDetection(T.DFineConfig(decoder_n_points=D_FINE_POINTS)), 640
    elif family == "mask2former":
        model, size = T.Mask2FormerForUniversalSegmentation(T.Mask2FormerConfig()), 512
    elif family == "oneformer":
        model, size = T.OneFormerForUniversalSegmentation(T.OneFormerConfig(is_training=False)), 512
    elif family == "deta":
        from transformers.models.deprecated.deta import DetaConfig, DetaForObjectDetection

        model, size = DetaForObjectDetection(DetaConfig()), 640
    else:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # HF zero-inits the attention weights and several heads: make every path matter
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.05 if "sampling_offsets" in name else 0.01))
    inputs = {"pixel_values": torch.rand(1, 3, size, size, generator=g)}
    if family == "oneformer":
        inputs["task_inputs"] = torch.randint(0, model.config.text_encoder_vocab_size, (1, 77), generator=g)
    return model.eval(), inputs, size


def _main_output(family: str, model, inputs, forward) -> torch.Tensor:
    """Run ``forward``; return the detection logits, or the pixel decoder's last feature map (upstream of the
    masked-attention threshold) for the segmentation families."""
    if family in ("mask2former", "oneformer"):
        captured = {}
        handle = model.model.pixel_level_module.register_forward_hook(lambda m, a, out: captured.update(out=out))
        try:
            forward()
        finally:
            handle.remove()
        out = captured["out"]
        return out.decoder_last_hidden_state if family == "mask2former" else out.decoder_last_feature
    return forward().logits


def family_rows(family: str, *, reps: int, budget_s: float, profile: bool) -> list[dict]:
    from deformable_detr.integrations import patch_transformers, unpatch_transformers

    model, inputs, size = _build(family)

    def call(patched: bool):
        if patched:
            patch_transformers()
        else:
            unpatch_transformers()
        return model(**inputs)

    fns = {"hf": lambda: call(False), "hf+our-kernel": lambda: call(True)}
    rows, outputs = [], {}
    try:
        with torch.no_grad():
            times = _timed(fns, reps, budget_s)
            for name, res in times.items():
                row = _row(family, name, "forward", f"B=1 {size}x{size}", res)
                if "error" not in res:
                    # The profiled call doubles as the one whose output is compared (no extra forward).
                    def call_output(name=name):
                        outputs[name] = _main_output(family, model, inputs, fns[name])

                    if profile:
                        row["profile"] = profile_breakdown(call_output)
                    else:
                        call_output()
                rows.append(row)
            for row in rows:
                if row["backend"] in outputs and "hf" in outputs:
                    row["max_err"] = float((outputs[row["backend"]] - outputs["hf"]).abs().max())
    finally:
        unpatch_transformers()
    return rows


def op_rows(*, reps: int, budget_s: float) -> list[dict]:
    """The attention alone at D-FINE's decoder shape: HF's v2 function vs our op (points_per_level)."""
    from transformers.models.d_fine.modeling_d_fine import multi_scale_deformable_attention_v2

    from deformable_detr.integrations import deformable_attention_core_func_v2

    shapes, Q, M, D, points = [(80, 80), (40, 40), (20, 20)], 300, 8, 32, D_FINE_POINTS
    g = torch.Generator().manual_seed(3)
    S, K = sum(h * w for h, w in shapes), sum(points)
    value = torch.randn(1, S, M, D, generator=g)
    locations = torch.rand(1, Q, M, K, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(1, Q, M, K, generator=g).softmax(-1)
    functions = {"hf": multi_scale_deformable_attention_v2, "ours": deformable_attention_core_func_v2}
    shape = f"N=1 Q={Q} M={M} D={D} levels 80²+40²+20² points {points}"
    reference = multi_scale_deformable_attention_v2(value, shapes, locations, weights, points)
    rows = []
    for pass_name, backward in (("op-forward", False), ("op-forward+backward", True)):
        leaves = [t.clone().requires_grad_(backward) for t in (value, locations, weights)]

        def step(fn, leaves=leaves, backward=backward):
            out = fn(leaves[0], shapes, leaves[1], leaves[2], points, "default")
            if backward:
                out.sum().backward()
            return out

        times = _timed({name: (lambda f=f: step(f)) for name, f in functions.items()}, reps * 3, budget_s)
        for name, res in times.items():
            row = _row("d_fine-decoder-msda", name, pass_name, shape, res)
            if "error" not in res:
                with torch.no_grad():
                    row["max_err"] = float(
                        (functions[name](value, shapes, locations, weights, points) - reference).abs().max()
                    )
            rows.append(row)
    return rows


def _row(name: str, variant: str, pass_name: str, shape: str, res: dict) -> dict:
    return timing.result_row({"suite": SUITE, "name": name, "shape": shape, "dtype": "fp32"}, variant, pass_name, res)[
        0
    ]


def run(
    *, families=FAMILIES, reps: int = 2, budget_s: float = 300.0, profile: bool = True, op: bool = True, on_family=None
) -> list[dict]:
    """All rows; ``on_family(rows)`` (if given) is called after each family, so a long run keeps what it measured."""
    try:
        import transformers  # noqa: F401
    except Exception as exc:
        return [{"suite": SUITE, "name": "families", "backend": "hf", "status": f"not available: {exc}"}]
    rows = op_rows(reps=reps, budget_s=budget_s) if op else []
    for family in families:
        rows += family_rows(family, reps=reps, budget_s=budget_s, profile=profile)
        _speedups(rows)
        if on_family is not None:
            on_family(rows)
    _speedups(rows)
    return rows


def _speedups(rows: list[dict]) -> None:
    for key, out in (("time_ms", "speedup"), ("cpu_ms", "cpu_speedup")):
        base = {(r["name"], r["pass"]): r[key] for r in rows if r.get("backend") == "hf" and key in r}
        for r in rows:
            if key in r and (r["name"], r["pass"]) in base:
                r[out] = base[(r["name"], r["pass"])] / r[key]


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# HF transformers MSDA families: as shipped vs patch_transformers() — {env.get('device_name')}, "
        f"{str(env.get('date'))[:10]}",
        "",
        *report.environment_lines(env),
        f"- transformers {env.get('transformers')}; our op's backend: {env.get('msda_backend')}",
        *([f"- {env['note']}"] if env.get("note") else []),
        "- same model, weights and input for both variants; `max err` = largest |difference| of the main output "
        "(detection logits; pixel decoder's last feature map for Mask2Former / OneFormer) against HF in this run",
        "- wall = median of interleaved rounds; CPU = median process CPU time (all threads; less disturbed by "
        "other load on a shared machine); × HF = HF time / row time; MSDA = profiler's share of self CPU time",
        "",
        "| model | pass | shape | variant | wall ms | CPU ms | × HF (wall) | × HF (CPU) | MSDA share | max err | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.get("name", ""), r.get("pass", ""), r.get("shape", ""), r.get("backend", "")]
        cells += [f"{r[k]:.1f}" if k in r else "" for k in ("time_ms", "cpu_ms")]
        cells += [f"{r[k]:.2f}×" if k in r else "" for k in ("speedup", "cpu_speedup")]
        cells.append(f"{r['profile']['msda']:.1%}" if "profile" in r else "")
        cells += [f"{r['max_err']:.1e}" if "max_err" in r else "", r.get("status", "")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-op", action="store_true", help="no rows of the attention alone")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = report.environment("cpu")
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = None
    from deformable_detr.ops.ms_deform_attn import _resolve_backend

    env["msda_backend"] = _resolve_backend(None, torch.device("cpu"))
    t0 = time.perf_counter()
    stem = f"families-hf-{report.device_slug('cpu')}-{_dt.date.today().isoformat()}"

    def save(rows):
        env["wall_s"] = round(time.perf_counter() - t0, 1)
        report.write_json_and_markdown(env, rows, markdown(env, rows), args.out, stem)

    families = tuple(f for f in args.families.split(",") if f)
    rows = run(families=families, reps=args.reps, profile=not args.no_profile, op=not args.no_op, on_family=save)
    save(rows)
    print(markdown(env, rows))


if __name__ == "__main__":
    main()
