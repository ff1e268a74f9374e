"""Build the deformable_detr._C extension (MSDA + assignment ops).

Decisions, in order (the one taken and why is printed to stderr as ``[deformable_detr] ...`` lines and written to
``deformable_detr/_build_info.json``, which ``python -m deformable_detr --version`` shows; pip shows setup.py's
output only with ``pip install -v``):
- DEFORMABLE_DETR_SKIP_CUDA=1            -> CPU-only CppExtension.
- torch is a CPU-only build               -> CPU-only.
- a CUDA toolkit is found and validated   -> CUDAExtension (all csrc/**/cuda/*.cu are added).
- otherwise                               -> CPU-only, with a one-line reason; FORCE_CUDA=1 turns that into an error.
The toolkit is CUDA_HOME (or CUDA_PATH) if set; else /usr/local/cuda when it holds bin/nvcc; else the prefix of the
nvcc on PATH. Validation: ``<toolkit>/bin/nvcc --version`` runs, its CUDA major version equals torch.version.cuda's,
and ``<toolkit>/include/cuda_runtime.h`` exists (the nvcc on PATH may be a wrapper whose toolkit is gone).
Sources and compiler flags come from build_config.json (shared with CMakeLists.txt and the SIMT emulator); the
version is deformable_detr/__init__.py's __version__ (pyproject.toml reads it).
MAX_JOBS is honoured by torch.utils.cpp_extension itself. The CUDA architectures (arch_decision): TORCH_CUDA_ARCH_LIST,
else the visible GPUs', else DEFAULT_ARCH_LIST (no GPU visible); the list and its reason are printed before the
compile, also to the terminal when pip captures the build's output.
A wheel with the compiled extension requires the torch major.minor it was built against (the C++ ABI of torch
extensions is not stable across torch releases); a metadata-only install (DEFORMABLE_DETR_NO_EXT=1) any torch>=2.4.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Used only when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible (a build host, a cluster's login node), so
# every entry must earn its compile time (each architecture is one more full device compile, minutes):
# - 8.0: SASS for A100, which also runs natively on every later 8.x GPU (8.6: A10/A40/RTX 30xx, 8.9: L4/L40/RTX 40xx):
#   CUDA binaries run on any GPU of the same major version and an equal or higher minor one, and our kernels have no
#   8.6- or 8.9-specific code (torch's own wheels ship no sm_89 either);
# - 9.0: H100/H200, which has its own code path (vector float atomics in the backward, __CUDA_ARCH__ >= 900);
# - +PTX (of 9.0): later GPUs (Blackwell 10.x/12.x) JIT-compile it once at first load (the driver caches the result).
# Turing (7.5) is not in it: not built or tested by this project; TORCH_CUDA_ARCH_LIST=7.5 asks for it.
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
BASE_REQUIREMENTS = ["torchvision>=0.19", "numpy>=1.22", "scipy>=1.9", "tqdm>=4.60"]
ANY_TORCH = "torch>=2.4"


def _log(message):
    # stderr: the stream `python setup.py ...`, `pip install -v` and `python -m build` all show.
    print(f"[deformable_detr] {message}", file=sys.stderr, flush=True)


def _find_cuda_home(env=None, default_prefix="/usr/local/cuda"):
    env = os.environ if env is None else env
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH")
    if home:
        return home  # explicit: validated (and reported) as given
    if os.path.exists(os.path.join(default_prefix, "bin", "nvcc")):
        return default_prefix
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _nvcc_version(cuda_home):
    """``(version, None)`` such as ``("13.0", None)``, or ``(None, reason)`` when nvcc does not run."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None, f"{nvcc} does not exist"
    try:
        proc = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"{nvcc} --version failed ({type(err).__name__}: {err})"
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        detail = f": {last[0][:120]}" if last else ""
        return None, f"{nvcc} --version failed (exit {proc.returncode}{detail})"
    match = re.search(r"release (\d+)\.(\d+)", proc.stdout)
    if not match:
        return None, f"{nvcc} --version printed no 'release X.Y'"
    return f"{match.group(1)}.{match.group(2)}", None


def cuda_decision(env=None, torch_cuda="unset", default_prefix="/usr/local/cuda"):
    """Whether to build the CUDA kernels: a dict with ``cuda`` (bool), ``reason`` (one line), ``cuda_home`` and
    ``nvcc_version``. Raises SystemExit when FORCE_CUDA=1 asks for CUDA that cannot be built."""
    env = os.environ if env is None else env
    if torch_cuda == "unset":
        import torch

        torch_cuda = torch.version.cuda
    decision = {"cuda": False, "cuda_home": None, "nvcc_version": None}
    if _flag("DEFORMABLE_DETR_SKIP_CUDA", env):
        return {**decision, "reason": "DEFORMABLE_DETR_SKIP_CUDA=1"}
    reason = None
    cuda_home = _find_cuda_home(env, default_prefix)
    version = None
    if torch_cuda is None:
        reason = "this torch is a CPU-only build (torch.version.cuda is None)"
    elif cuda_home is None:
        reason = "no CUDA toolkit found (CUDA_HOME unset, no /usr/local/cuda/bin/nvcc, no nvcc on PATH)"
    else:
        version, reason = _nvcc_version(cuda_home)
        if version and version.split(".")[0] != str(torch_cuda).split(".")[0]:
            reason = (
                f"the CUDA toolkit at {cuda_home} is {version}, torch was built with CUDA {torch_cuda} "
                "(major versions must agree; set CUDA_HOME to a matching toolkit)"
            )
        elif version and not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
            reason = (
                f"{cuda_home}/include/cuda_runtime.h is missing (not a complete CUDA toolkit; "
                "set CUDA_HOME to the toolkit's prefix)"
            )
    decision.update(cuda_home=cuda_home, nvcc_version=version)
    if reason is None:
        return {
            **decision,
            "cuda": True,
            "reason": f"CUDA toolkit {version} at {cuda_home} matches torch's {torch_cuda}",
        }
    if _flag("FORCE_CUDA", env):
        raise SystemExit(f"[deformable_detr] FORCE_CUDA=1 but the CUDA kernels cannot be built: {reason}")
    return {**decision, "reason": reason}


def _flag(name, env=None):
    env = os.environ if env is None else env
    return env.get(name, "0").lower() in ("1", "true", "yes", "on")


def arch_decision(env, visible, torch_archs=()):
    """``(arch_list, reason)``: the CUDA architectures to compile and why, from the environment ``env`` and the
    compute capabilities ``visible`` of the visible GPUs (``[(9, 0), ...]``). In order:

    - ``TORCH_CUDA_ARCH_LIST`` set (and not ``native``): as given;
    - GPUs visible: theirs (as torch itself derives them: each capability capped at the newest SASS this torch was
      built for, ``torch_archs`` such as ``["sm_80", "sm_90"]``; sorted, the newest + PTX);
    - neither: :data:`DEFAULT_ARCH_LIST` (see there why each entry)."""
    requested = (env.get("TORCH_CUDA_ARCH_LIST") or "").strip()
    if requested and requested != "native":
        return requested, "from TORCH_CUDA_ARCH_LIST"
    capabilities = sorted({(int(major), int(minor)) for major, minor in visible})
    if capabilities:
        built = [
            (int(m.group(1)[:-1]), int(m.group(1)[-1])) for m in map(re.compile(r"sm_(\d\d+)$").match, torch_archs) if m
        ]
        newest = max(built, default=None)
        archs = []
        for capability in capabilities:
            capped = min(capability, newest) if newest else capability
            arch = f"{capped[0]}.{capped[1]}"
            if arch not in archs:
                archs.append(arch)
        seen = ", ".join(f"{a}.{b}" for a, b in capabilities)
        return ";".join(archs) + "+PTX", f"the visible GPUs' compute capabilities ({seen})"
    return DEFAULT_ARCH_LIST, (
        "the default without a visible GPU: sm_80 runs on every 8.x GPU, sm_90 has Hopper's own code path, "
        "PTX covers newer GPUs"
    )


def _visible_capabilities():
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def _torch_sm_archs():
    import torch

    try:
        return torch.cuda.get_arch_list()
    except Exception:  # a torch without CUDA support answers nothing useful here
        return []


# Where _announce also writes when stderr is captured (a test points it at a file).
TERMINAL = "/dev/tty"


def _announce(message):
    """``_log`` the message, and also to the terminal when stderr is captured: pip hides a build's output without
    ``-v``, and this message precedes the long silent step, the CUDA compile."""
    _log(message)
    if sys.stderr.isatty():
        return
    try:
        with open(TERMINAL, "w") as tty:
            tty.write(f"[deformable_detr] {message}\n")
    except OSError:  # no controlling terminal (CI, a pipe, Windows): the log line above is all there is
        pass


def build_config():
    """build_config.json: sources and compiler flags, the one description setup.py, CMake and the emulator read."""
    with open(os.path.join(ROOT, "build_config.json")) as f:
        return json.load(f)


def compile_args(config, use_cuda, windows=os.name == "nt"):
    """``(extra_compile_args, extra_link_args)`` of the extension for this build."""
    std = config["cxx_standard"]
    if windows:
        extra = {"cxx": [*config["msvc_flags"], f"/std:c++{std}", "/openmp"]}
        link = []
    else:
        extra = {"cxx": [*config["cxx_flags"], f"-std=c++{std}", "-fopenmp"]}
        link = ["-fopenmp"]
    if use_cuda:
        extra["nvcc"] = [*config["nvcc_flags"], f"-std=c++{std}"]
    return extra, link


def torch_requirement(torch_version):
    """The torch a built wheel needs: the same major.minor (``torch==2.14.*``)."""
    major, minor = torch_version.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def _extensions():
    import torch

    decision = cuda_decision()
    use_cuda, cuda_home = decision["cuda"], decision["cuda_home"]
    if use_cuda:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if use_cuda:
        cpp_extension.CUDA_HOME = cuda_home

    config = build_config()
    csrc = config["source_root"]
    sources = sorted(glob.glob(os.path.join(csrc, "**", "*.cpp"), recursive=True))
    include_dirs = [os.path.join(ROOT, csrc)]
    extra, link = compile_args(config, use_cuda)
    if use_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += sorted(glob.glob(os.path.join(csrc, "**", "*.cu"), recursive=True))
        arch_list, arch_reason = arch_decision(os.environ, _visible_capabilities(), _torch_sm_archs())
        # torch.utils.cpp_extension reads the list from the environment; set, it is exactly what is reported.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        decision.update(arch_list=arch_list, arch_reason=arch_reason)
        _log(f"building CPU + CUDA kernels: {decision['reason']}")
        _announce(
            f"compiling CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list} ({arch_reason}): minutes per architecture "
            "without output; set TORCH_CUDA_ARCH_LIST to your GPUs' (e.g. 9.0) to build fewer, "
            "DEFORMABLE_DETR_SKIP_CUDA=1 for CPU kernels only"
        )
    else:
        ext_cls = cpp_extension.CppExtension
        _log(f"building CPU-only kernels: {decision['reason']}")
    _log(
        f"MAX_JOBS={os.environ.get('MAX_JOBS', '<auto>')}; the wheel will require {torch_requirement(torch.__version__)}"
    )
    decision.update(torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    ext = ext_cls(
        "deformable_detr._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args=extra,
        extra_link_args=link,
    )
    base = cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)

    class BuildExtension(base):
        def run(self):
            super().run()
            # The decision travels with the built extension (in place or in the wheel): --version shows it.
            out_dir = os.path.dirname(self.get_ext_fullpath("deformable_detr._C"))
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(decision, f, indent=1)

    return [ext], BuildExtension, torch_requirement(torch.__version__)


def _setup():
    # DEFORMABLE_DETR_NO_EXT=1: metadata/editable install only; `make build` compiles in place (incrementally).
    ext_modules, build_ext, torch_req = ([], None, ANY_TORCH) if _flag("DEFORMABLE_DETR_NO_EXT") else _extensions()
    setup(
        packages=find_packages(include=["deformable_detr", "deformable_detr.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": build_ext} if build_ext else {},
        install_requires=[torch_req, *BASE_REQUIREMENTS],
        include_package_data=True,
    )


if __name__ == "__main__":
    _setup()
