"""What a compiled kernel costs, read from the binary without a GPU: resource usage (``cuobjdump
--dump-resource-usage``), the SASS (``cuobjdump -sass``), its loops, and the theoretical occupancy.

Tools: ``cuobjdump`` from the CUDA toolkit (``$CUDA_HOME/bin``) or, when absent, the copy in Triton's wheel
(``triton/backends/nvidia/bin``); ``c++filt`` for the kernel names. Architecture constants and the occupancy rule
are sourced in benchmarks/NOTES.md ("Static facts").
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


# Per-SM limits of the two architectures (CUDA C++ Programming Guide, "Compute Capabilities", technical
# specifications table; CUDA 13.0 cuda_occupancy.h for the allocation rules; NOTES.md "Static facts").
@dataclass(frozen=True)
class Arch:
    name: str
    registers_per_sm: int = 65536
    register_granularity: int = 256  # registers allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split in 4; warps live in one quarter
    max_registers_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0  # bytes usable as shared memory (max carve-out)
    shared_granularity: int = 128
    shared_reserved_per_block: int = 1024


ARCHS = {
    "sm_80": Arch("sm_80", shared_per_sm=164 * 1024),
    "sm_90": Arch("sm_90", shared_per_sm=228 * 1024),
}


def _limits(arch: Arch, registers: int, threads: int, shared_bytes: int) -> dict[str, int]:
    """Blocks per SM allowed by each resource (the rules of cuda_occupancy.h: cudaOccMaxBlocksPerSMRegsLimit,
    cudaOccMaxBlocksPerSMSmemLimit, cudaOccMaxBlocksPerSMWarpsLimit)."""
    warps = -(-threads // 32)
    limits = {
        "blocks": arch.max_blocks_per_sm,
        "threads": arch.max_threads_per_sm // (warps * 32),
        "warps": arch.max_warps_per_sm // warps,
    }
    if registers > 0:
        per_warp = -(-registers * 32 // arch.register_granularity) * arch.register_granularity
        warps_per_quarter = arch.registers_per_sm // arch.sub_partitions // per_warp
        limits["registers"] = warps_per_quarter * arch.sub_partitions // warps
    if shared_bytes > 0:
        per_block = -(-(shared_bytes + arch.shared_reserved_per_block) // arch.shared_granularity)
        limits["shared"] = arch.shared_per_sm // (per_block * arch.shared_granularity)
    return limits


def occupancy(arch: Arch, registers: int, threads: int, shared_bytes: int = 0) -> dict:
    """Resident blocks and warps per SM for a kernel of ``registers`` per thread launched with ``threads`` per block,
    the limiting resource, and the register count that would fit one more block (when registers limit)."""
    warps = -(-threads // 32)
    limits = _limits(arch, registers, threads, shared_bytes)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: (limits[k], k != "registers"))
    next_regs = None
    if limiter == "registers" and blocks < min(v for k, v in limits.items() if k != "registers"):
        for regs in range(registers - 1, 15, -1):
            if _limits(arch, regs, threads, shared_bytes)["registers"] > blocks:
                next_regs = regs
                break
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": blocks * warps / arch.max_warps_per_sm,
        "limiter": limiter,
        "registers_for_next_block": next_regs,
    }


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool: the toolkit's, else the one in Triton's wheel, else None."""
    cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates = [Path(cuda_home) / "bin" / name]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except ImportError:
        pass
    for path in candidates:
        if path.exists():
            return str(path)
    return shutil.which(name)


def _run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


@dataclass
class Resources:
    arch: str
    mangled: str
    registers: int
    stack: int
    shared: int
    local: int
    demangled: str = ""


_ARCH_LINE = re.compile(r"arch = (sm_\d+)")
_FUNC_LINE = re.compile(r"Function (\S+):")
_RES_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(binary: str) -> list[Resources]:
    """Every kernel of every SASS architecture in ``binary`` (a cubin, or a library with an embedded fatbin)."""
    text = _run(tool("cuobjdump"), "--dump-resource-usage", binary)
    arch = None
    current = None
    found: list[Resources] = []
    for line in text.splitlines():
        if m := _ARCH_LINE.search(line):
            arch = m.group(1)
        elif m := _FUNC_LINE.search(line):
            current = m.group(1)
        elif (m := _RES_LINE.search(line)) and current is not None:
            regs, stack, shared, local = (int(g) for g in m.groups())
            found.append(Resources(arch or "", current, regs, stack, shared, local))
            current = None
    names = demangle(sorted({r.mangled for r in found}))
    for r in found:
        r.demangled = names.get(r.mangled, r.mangled)
    return found


@dataclass
class Instruction:
    address: int
    text: str  # opcode and operands, predicate included

    @property
    def opcode(self) -> str:
        parts = self.text.split()
        if parts and parts[0].startswith("@"):
            parts = parts[1:]
        return parts[0] if parts else ""


@dataclass
class Sass:
    instructions: list[Instruction] = field(default_factory=list)

    def count(self, prefixes: tuple[str, ...], lo: int = 0, hi: int | None = None) -> int:
        hi = self.instructions[-1].address if hi is None and self.instructions else hi
        return sum(1 for i in self.instructions if lo <= i.address <= hi and i.opcode.startswith(prefixes))

    def loops(self) -> list[tuple[int, int]]:
        """(first, last) addresses of every loop: a branch back to an earlier address."""
        found = []
        for ins in self.instructions:
            if ins.opcode.startswith("BRA") and (
                m := re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|)\s*(0x[0-9a-f]+)", ins.text)
            ):
                target = int(m.group(1), 16)
                if target < ins.address:
                    found.append((target, ins.address))
        return found


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_FUNC = re.compile(r"Function : (\S+)")


def sass(binary: str, arch: str) -> dict[str, Sass]:
    """SASS of every kernel of ``arch`` in ``binary``, by mangled name."""
    args = [tool("cuobjdump"), "-sass", binary]
    if not binary.endswith(".cubin"):
        args[2:2] = ["-arch", arch]
    text = _run(*args)
    out: dict[str, Sass] = {}
    current = None
    for line in text.splitlines():
        if m := _SASS_FUNC.search(line):
            current = out.setdefault(m.group(1), Sass())
        elif current is not None and (m := _SASS_LINE.search(line)):
            current.instructions.append(Instruction(int(m.group(1), 16), m.group(2).strip()))
    return out


GLOBAL_LOADS = ("LDG",)
GLOBAL_STORES = ("STG",)
ATOMICS = ("RED", "ATOM")
LOCAL = ("LDL", "STL")
SHUFFLES = ("SHFL",)


def hot_loop(code: Sass, markers: tuple[tuple[str, ...], ...]) -> dict | None:
    """The innermost loop that contains an instruction of every group in ``markers`` (the per-sample loop of the
    MSDA kernels: the corner loads; in the backward the atomics and the group reduction's shuffles): its static
    size and the memory / shuffle instructions in it. Nested loops inside it (the channel-tile loop, the butterfly
    loop) are counted once, as they run for D = 32 except the butterfly (log2 G rounds). None when no loop fits."""
    best = None
    for lo, hi in code.loops():
        if any(code.count(group, lo, hi) == 0 for group in markers):
            continue
        if best is None or hi - lo < best[1] - best[0]:
            best = (lo, hi)
    if best is None:
        return None
    lo, hi = best
    return {
        "loop_instructions": code.count(("",), lo, hi),
        "loop_global_loads": code.count(GLOBAL_LOADS, lo, hi),
        "loop_global_stores": code.count(GLOBAL_STORES, lo, hi),
        "loop_atomics": code.count(ATOMICS, lo, hi),
        "loop_shuffles": code.count(SHUFFLES, lo, hi),
        "loop_local": code.count(LOCAL, lo, hi),
    }


def instruction_summary(code: Sass) -> dict:
    return {
        "instructions": len(code.instructions),
        "local_instructions": code.count(LOCAL),  # LDL/STL: spills or stack arrays
        "spill_stores": code.count(("STL",)),
    }
