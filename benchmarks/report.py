"""Benchmark reports: environment capture and the writers (JSON, markdown table, PNG bar chart of speed-ups).

A result row is a plain dict. Keys every suite should fill (missing ones render as blank):
``suite``, ``name`` (the case), ``backend``, ``shape`` (short text), ``dtype``, ``pass`` ("fwd" / "fwd+bwd" /
"train" ...), ``time_ms`` (median), ``speedup`` (vs the suite's baseline backend in the same case), ``status``
("ok", "not installed", "not available: <why>", "failed: <why>"). Optional: ``time_p25_ms``, ``time_p75_ms``,
``samples``, ``peak_mem_mib``, ``bytes``, ``gbps``, ``x_floor``, ``max_err`` (largest absolute output error),
``grad_norm_err`` (worst over the gradients of ‖g − g64‖₂ ÷ ‖g64‖₂, g64 the float64 reference gradient), ``throughput`` + ``unit``, ``note``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def slugify(text: str, max_len: int = 48) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "device"


def device_slug(device: torch.device | str) -> str:
    device = torch.device(device)
    name = device_name(device)
    return slugify(name if device.type == "cuda" else f"cpu-{name}")


def backend_line(device: torch.device | str) -> str:
    """Which MSDA backends this run measures, and how the compiled extension was built (or why it is missing)."""
    from deformable_detr import available_backends
    from deformable_detr._extension import build_summary

    return f"MSDA backends on {torch.device(device).type}: {', '.join(available_backends(device))}; {build_summary()}"


def environment(device: torch.device | str) -> dict:
    """What a reader needs to compare two result files: hardware, software versions, threads, commit, date."""
    device = torch.device(device)
    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_name": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        from deformable_detr._extension import extension_loaded, load_error

        env["extension_loaded"] = extension_loaded()
        env["extension_error"] = load_error()
    except Exception as exc:
        env["extension_loaded"] = False
        env["extension_error"] = str(exc)
    env["backends"] = backend_line(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


# --- report writers

_COLUMNS = [
    ("suite", "suite", "{}"),
    ("name", "case", "{}"),
    ("shape", "shape", "{}"),
    ("dtype", "dtype", "{}"),
    ("pass", "pass", "{}"),
    ("backend", "backend", "{}"),
    ("time_ms", "median ms", "{:.3f}"),
    ("iqr", "p25–p75 ms", "{}"),
    ("speedup", "speed-up", "{:.2f}×"),
    ("throughput", "throughput", "{:.2f}"),
    ("peak_mem_mib", "peak MiB", "{:.1f}"),
    ("gbps", "GB/s", "{:.0f}"),
    ("x_floor", "× floor", "{:.2f}"),
    ("max_err", "max err", "{:.1e}"),
    ("grad_norm_err", "grad norm err", "{:.1e}"),
    ("status", "status", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "time_ms" and value is None:
        # Some suites (the matcher) report time under another name; accept it rather than print nothing.
        value = row.get("median_ms")
    if key == "iqr" and row.get("time_p25_ms") is not None:
        return f"{row['time_p25_ms']:.3f}–{row['time_p75_ms']:.3f}"
    if value is None or value == "":
        return "n/a" if key == "peak_mem_mib" and row.get("status", "ok") == "ok" else ""
    if key == "throughput" and row.get("unit"):
        return f"{value:.2f} {row['unit']}"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict], columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    """A GitHub table; columns that are empty in every row are left out."""
    columns = list(columns or _COLUMNS)
    used = [c for c in columns if any(_cell(r, c[0], c[2]) not in ("", "n/a") for r in rows) or c[0] == "status"]
    lines = ["| " + " | ".join(c[1] for c in used) + " |", "|" + "|".join("---" for _ in used) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r, c[0], c[2]).replace("|", "/") for c in used) + " |")
    return "\n".join(lines)


def _names_ambiguous(rows: list[dict]) -> bool:
    shapes: dict = {}
    for r in rows:
        shapes.setdefault(r.get("name"), set()).add(r.get("shape"))
    return any(len(v) > 1 for v in shapes.values())


def environment_lines(env: dict) -> list[str]:
    """The markdown bullet lines every result file starts with: device, date + commit, versions."""
    return [
        f"- device: **{env.get('device_name')}** ({env.get('device')}), threads {env.get('threads')}",
        f"- date: {env.get('date')}, commit {str(env.get('git_commit'))[:12]}"
        + (" (dirty)" if env.get("git_dirty") else ""),
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, triton {env.get('triton')}, python {env.get('python')}",
        # Which kernels ran: a report from an unbuilt checkout must say that it measured the reference only.
        *([f"- {env['backends']}"] if env.get("backends") else []),
    ]


def markdown_report(env: dict, rows: list[dict], title: str = "deformable-detr benchmarks") -> str:
    head = [f"# {title}", "", *environment_lines(env)]
    if env.get("copy_gbps"):
        head.append(f"- measured copy bandwidth: {env['copy_gbps']:.0f} GB/s (the roof for the × floor column)")
    if env.get("mode"):
        head.append(f"- mode: {env['mode']}")
    head += [
        "",
        "Times are medians of interleaved rounds; speed-up is against the `pytorch` reference (MSDA, model) or "
        "the scipy loop (matcher) of the same case.",
        "",
    ]
    body = []
    # Within a suite section the suite column is redundant and the shape text is long: list shapes once above.
    for suite in dict.fromkeys(r.get("suite", "") for r in rows):
        group = [r for r in rows if r.get("suite", "") == suite]
        body += [f"## {suite}", ""]
        if _names_ambiguous(group):  # one case name over several shapes: the shape must stay in each row
            columns = [c for c in _COLUMNS if c[0] != "suite"]
        else:
            columns = [c for c in _COLUMNS if c[0] not in ("suite", "shape")]
            shapes = dict.fromkeys((r.get("name"), r.get("shape")) for r in group if r.get("shape"))
            body += [f"- `{name}`: {shape}" for name, shape in shapes] + [""]
        body += [markdown_table(group, columns), ""]
    return "\n".join(head + body)


def plot_speedups(rows: list[dict], path: Path, title: str) -> bool:
    """Horizontal bars of speed-up per (case, dtype, pass, backend); False when nothing to plot or no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    fig = speedup_figure(rows, title)
    if fig is None:
        return False
    # "tight" grows the saved canvas to whatever text sticks out, so no label is ever cut.
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def speedup_figure(rows: list[dict], title: str):
    """The figure of :func:`plot_speedups` (None when no row has a speed-up): value tags fit inside the axes and
    the 1x line is labelled as the baseline."""
    import matplotlib.pyplot as plt

    bars = [r for r in rows if r.get("speedup") and r.get("status", "ok") == "ok" and r.get("speedup") != 1.0]
    if not bars:
        return None
    ambiguous = {
        suite
        for suite in {r.get("suite") for r in bars}
        if _names_ambiguous([r for r in bars if r.get("suite") == suite])
    }
    labels = []
    for r in bars:
        keys = ("suite", "name", "shape", "dtype", "pass", "backend")
        if r.get("suite") not in ambiguous:
            keys = tuple(k for k in keys if k != "shape")  # the shape text is long; only where names repeat
        labels.append(" ".join(str(r.get(k)) for k in keys if r.get(k) not in (None, "")))
    values = [r["speedup"] for r in bars]
    # A baseline row's speed-up is exactly 1 (its time over itself).
    baselines = sorted({str(r.get("backend")) for r in rows if r.get("speedup") == 1.0}) or ["the"]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(bars) + 1.8))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, label=f"1× = {' / '.join(baselines)} baseline")
    low, high = min(min(values), 1.0), max(max(values), 1.0)
    if high / max(low, 1e-9) > 20:
        ax.set_xscale("log")
        # Room on the right for the "NN.N×" tags: about a third of a decade.
        ax.set_xlim(low / 1.5, high * 2.5)
    else:
        ax.set_xlim(0, high * 1.18)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.1f}×", va="center", fontsize=7)
    ax.legend(loc="best", fontsize=7)
    ax.set_xlabel("speed-up vs baseline (higher is better)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    return obj


def write_json_and_markdown(env: dict, rows: list[dict], markdown: str, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json`` (environment + rows) and ``<stem>.md`` (``markdown``); returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(_jsonable({"environment": env, "results": rows}), indent=1) + "\n")
    paths["md"].write_text(markdown + "\n")
    return paths


def write_results(env: dict, rows: list[dict], out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``<stem>.json`` (environment + rows), ``<stem>.md`` and ``<stem>.png``; returns the paths written."""
    title = f"{env.get('device_name')} — {str(env.get('date'))[:10]}"
    report = markdown_report(env, rows, title=f"deformable-detr benchmarks: {title}")
    paths = write_json_and_markdown(env, rows, report, out_dir, stem)
    paths["png"] = Path(out_dir) / f"{stem}.png"
    if not plot_speedups(rows, paths["png"], f"deformable-detr speed-ups: {title}"):
        del paths["png"]
    return paths
