"""Static suite (``python -m benchmarks --static``): every CUDA kernel instance of the built extension and every
Triton kernel x autotune config, compiled for sm_80 and sm_90 without a GPU, with registers, stack, local-memory
instructions (spills), shared memory, theoretical occupancy at the launch's block size, and the size of the
per-sample loop. Writes ``static-<yyyy-mm-dd>.json`` / ``.md`` into benchmarks/results/.

CUDA: read from ``deformable_detr/_C*.so`` (built by ``make setup``; setup.py's default arch list without a GPU is
8.0;9.0+PTX, so sm_80 and sm_90 SASS are both in it). Triton: ``triton.compile`` of an ``ASTSource``
with an explicit ``GPUTarget`` (what the autotuner would compile on that GPU for the model shape D = 32, pointers
16-byte aligned).
"""

from __future__ import annotations

import datetime as _dt
import re
import tempfile
from pathlib import Path

from benchmarks import bench_static_sass as sass_tools
from benchmarks import report

MSDA_THREADS = 256  # kThreads, csrc/ms_deform_attn/cuda/ms_deform_attn_launch.h
LSAP_MAX_THREADS = 256  # kMaxThreads, csrc/assignment/cuda/lsap_launch.h (the block size grows with the columns)
DTYPE_NAMES = {
    "float": "float32",
    "double": "float64",
    "c10::Half": "float16",
    "c10::BFloat16": "bfloat16",
}
# The per-sample loop, by kernel: the innermost loop holding an instruction of each group.
HOT_MARKERS = {
    "forward": (sass_tools.GLOBAL_LOADS,),
    "backward_atomics": (sass_tools.ATOMICS, sass_tools.SHUFFLES),
    "backward_no_atomics": (sass_tools.GLOBAL_LOADS, sass_tools.SHUFFLES),
    "gather_grad_value": (sass_tools.GLOBAL_LOADS,),
}
_KERNEL = re.compile(r"kernels::(\w+)_kernel(?:<([^>]*)>)?")


def extension_binary() -> Path | None:
    import deformable_detr

    found = sorted(Path(deformable_detr.__file__).parent.glob("_C*.so"))
    return found[0] if found else None


def parse_cuda_name(demangled: str) -> dict:
    """kernel / dtype / vec / atomics of a demangled MSDA kernel name (LSAP kernels: kernel name only)."""
    m = _KERNEL.search(demangled)
    if not m:
        head = demangled.split("(")[0].replace("void ", "")
        name = head.split("<")[0].split("::")[-1]
        args = head.split("<")[1].rstrip(">") if "<" in head else ""
        return {"kernel": name, "dtype": DTYPE_NAMES.get(args.strip(), args.strip()), "vec": None}
    kernel, args = m.group(1), [a.strip() for a in (m.group(2) or "").split(",") if a.strip()]
    row = {"kernel": kernel, "dtype": DTYPE_NAMES.get(args[0], args[0]) if args else "", "vec": None}
    if len(args) > 1:
        row["vec"] = int(args[1])
    if kernel == "backward":
        row["kernel"] = "backward_atomics" if args[2] == "true" else "backward_no_atomics"
    return row


def _static_row(base: dict, resources, code, arch: str, threads: int, markers) -> dict:
    row = dict(base)
    row.update(arch=arch, registers=resources.registers, stack=resources.stack, shared=resources.shared)
    row["threads"] = threads
    row.update(sass_tools.occupancy(sass_tools.ARCHS[arch], resources.registers, threads, resources.shared))
    if code is not None:
        row.update(sass_tools.instruction_summary(code))
        if markers:
            row.update(sass_tools.hot_loop(code, markers) or {})
    return row


def cuda_rows(binary: Path) -> list[dict]:
    rows = []
    resources = [r for r in sass_tools.resource_usage(str(binary)) if r.arch in sass_tools.ARCHS]
    for arch in sorted({r.arch for r in resources}):
        codes = sass_tools.sass(str(binary), arch)
        for r in (r for r in resources if r.arch == arch):
            base = {"backend": "cuda", **parse_cuda_name(r.demangled)}
            lsap = "lsap" in r.demangled
            threads = LSAP_MAX_THREADS if lsap else MSDA_THREADS
            rows.append(_static_row(base, r, codes.get(r.mangled), arch, threads, HOT_MARKERS.get(base["kernel"])))
    return sorted(rows, key=lambda r: (r["kernel"], r["dtype"], r["vec"] or 0, r["arch"]))


# ---- Triton -------------------------------------------------------------------------------------------------------
TRITON_D = 32  # the model's head dim: BLOCK_D = 32 for both kernels (ops/triton/ms_deform_attn.py)
_INT_ARGS = ("Q", "S", "M", "D", "L", "P", "K", "q_bucket")
_CONSTEXPR_ARGS = ("BLOCK_Q", "BLOCK_D", "ACC", "RAGGED", "DISCRETE")
_TABLE_ARGS = ("shapes_ptr", "level_start_ptr", "point_start_ptr")


def _triton_signature(fn, dtype: str) -> tuple[dict, dict]:
    """Signature and divisibility hints of one launch: data pointers ``dtype``, the fp32/fp64 accumulation
    buffers, int64 level tables; every pointer 16-byte aligned and D = 32 divisible by 16, as at run time."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in _CONSTEXPR_ARGS:
            signature[name] = "constexpr"
        elif name in _INT_ARGS:
            signature[name] = "i32"
            if name == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            if name in _TABLE_ARGS:
                signature[name] = "*i64"
            elif name in ("value_ptr", "out_ptr", "grad_out_ptr"):
                signature[name] = "*" + dtype
            else:
                signature[name] = "*" + acc
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def triton_rows(archs=("sm_80", "sm_90"), dtypes=("fp32", "bf16", "fp16", "fp64")) -> list[dict]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deformable_detr.ops.triton import ms_deform_attn as triton_op
    from deformable_detr.ops.triton._kernels import _msda_backward_kernel, _msda_forward_kernel

    names = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
    kernels = [
        ("forward", _msda_forward_kernel, triton_op._forward_autotuned.configs, triton_op._MAX_FORWARD_BLOCK_D),
        (
            "backward_atomics",
            _msda_backward_kernel,
            triton_op._backward_autotuned.configs,
            triton_op._MAX_BACKWARD_BLOCK_D,
        ),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kernel, fn, configs, max_block_d in kernels:
            block_d = min(triton.next_power_of_2(TRITON_D), max_block_d)
            for dtype in dtypes:
                signature, attrs = _triton_signature(fn, dtype)
                acc = tl.float64 if dtype == "fp64" else tl.float32
                for config in configs:
                    block_q, warps = config.kwargs["BLOCK_Q"], config.num_warps
                    # The uniform bilinear variant: the kernel the models run.
                    constexprs = {
                        "BLOCK_Q": block_q,
                        "BLOCK_D": block_d,
                        "ACC": acc,
                        "RAGGED": False,
                        "DISCRETE": False,
                    }
                    for arch in archs:
                        base = {"backend": "triton", "kernel": kernel, "dtype": names[dtype], "vec": None}
                        base["config"] = f"BLOCK_Q={block_q} BLOCK_D={block_d} warps={warps}"
                        try:
                            compiled = triton.compile(
                                ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", int(arch[3:]), 32),
                                options={"num_warps": warps, "num_stages": config.num_stages},
                            )
                        except Exception as exc:  # noqa: BLE001 - the reason is the result
                            rows.append({**base, "arch": arch, "status": f"not compiled: {type(exc).__name__}: {exc}"})
                            continue
                        cubin = Path(tmp) / f"{kernel}-{dtype}-{block_q}-{warps}-{arch}.cubin"
                        cubin.write_bytes(compiled.asm["cubin"])
                        (res,) = sass_tools.resource_usage(str(cubin))
                        code = next(iter(sass_tools.sass(str(cubin), arch).values()), None)
                        res.shared = max(res.shared, compiled.metadata.shared)
                        markers = HOT_MARKERS[kernel]
                        rows.append(_static_row(base, res, code, arch, warps * 32, markers))
    return rows


# ---- report -------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("backend", "backend", "{}"),
    ("kernel", "kernel", "{}"),
    ("dtype", "dtype", "{}"),
    ("vec", "VEC", "{}"),
    ("config", "Triton config", "{}"),
    ("arch", "arch", "{}"),
    ("registers", "regs", "{}"),
    ("stack", "stack B", "{}"),
    ("local_instructions", "LDL/STL", "{}"),
    ("shared", "smem B", "{}"),
    ("threads", "block", "{}"),
    ("blocks_per_sm", "blocks/SM", "{}"),
    ("occupancy", "occupancy", "{:.1%}"),
    ("limiter", "limit", "{}"),
    ("registers_for_next_block", "regs for +1 block", "{}"),
    ("instructions", "SASS instr", "{}"),
    ("loop_instructions", "hot loop instr", "{}"),
    ("loop_global_loads", "loop LDG", "{}"),
    ("loop_atomics", "loop RED/ATOM", "{}"),
    ("loop_shuffles", "loop SHFL", "{}"),
    ("loop_local", "loop LDL/STL", "{}"),
    ("status", "status", "{}"),
]

MARKDOWN_HEAD = """# Static facts of every kernel instance (no GPU needed)

Predictions' raw material, not measurements: registers / stack / shared memory from `cuobjdump
--dump-resource-usage`, SASS from `cuobjdump -sass`. *occupancy*: resident warps / 64 at the launch's block size
(register, thread, block and shared-memory limits of the arch; rules and constants in benchmarks/NOTES.md, "Static
facts"). *LDL/STL*: local-memory instructions in the kernel (stack arrays or spills). *hot loop*: the innermost
loop that issues the per-sample corner loads (forward, gathers) or the grad_value atomics (backward): its SASS
instruction count per iteration and the memory / shuffle instructions in it (one iteration = one sample unless the
compiler unrolled the point loop; see NOTES.md). Triton: D = 32 (BLOCK_D = 32), each autotune config.
"""


def _write(env: dict, rows: list[dict], head: str, columns, out_dir: Path, stem: str, extra: str = "") -> dict:
    markdown = head + "\n" + report.markdown_table(rows, columns) + "\n" + extra
    return report.write_json_and_markdown(env, rows, markdown, out_dir, stem)


def main(out_dir: Path = report.RESULTS_DIR, triton: bool = True, counters: bool = True) -> dict[str, Path]:
    """Static table, emulator counters and roofline predictions: three json + md pairs in ``out_dir``."""
    date = _dt.date.today().isoformat()
    env = {"cuobjdump": sass_tools.tool("cuobjdump"), **report.environment("cpu")}
    binary = extension_binary()
    rows: list[dict] = []
    if binary is None:
        rows.append({"backend": "cuda", "kernel": "all", "status": "skipped: deformable_detr/_C*.so is not built"})
    else:
        env["cuda_binary"] = binary.name
        cuda = cuda_rows(binary)
        rows += cuda or [{"backend": "cuda", "kernel": "all", "status": "skipped: the extension has no CUDA kernels"}]
    if triton:
        rows += triton_rows()
    paths = {f"static_{k}": v for k, v in _write(env, rows, MARKDOWN_HEAD, COLUMNS, out_dir, f"static-{date}").items()}
    if counters:
        from benchmarks import bench_static_counters

        paths.update(write_counters_and_roofline(env, rows, bench_static_counters.all_rows(), out_dir, date))
    return paths


def write_counters_and_roofline(env: dict, static_rows: list[dict], counter_rows: list[dict], out_dir: Path, date: str):
    """The counters table and the roofline predictions formed from it and the static table."""
    from benchmarks import bench_static_counters, bench_static_roofline

    paths = {}
    head = "# Emulated memory counters (SIMT emulator, scaled shapes)\n\n" + bench_static_counters.__doc__
    written = _write(env, counter_rows, head, bench_static_counters.COLUMNS, out_dir, f"counters-{date}")
    paths.update({f"counters_{k}": v for k, v in written.items()})
    predictions, missing = bench_static_roofline.roofline_rows(static_rows, counter_rows)
    sanity = bench_static_roofline.sanity_check(static_rows)
    env = {**env, "sanity_check": sanity}
    head = "# Roofline predictions (not measurements)\n\n" + bench_static_roofline.__doc__
    extra = bench_static_roofline.sanity_markdown(sanity)
    if missing:
        extra += "\nNot predicted (instance or counters missing): " + "; ".join(missing) + "\n"
    written = _write(env, predictions, head, bench_static_roofline.COLUMNS, out_dir, f"roofline-{date}", extra)
    paths.update({f"roofline_{k}": v for k, v in written.items()})
    return paths


if __name__ == "__main__":
    for kind, path in main().items():
        print(f"{kind}: {path}")
