"""Issue 16, item 4: setup.py validates the CUDA toolkit before building CUDA kernels (fake toolkits in temp dirs,
no compile), and the wheel carries py.typed and says which torch it needs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_module_():
    spec = importlib.util.spec_from_file_location("dd_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself only runs under __main__
    return module


def _toolkit(root: Path, nvcc_script: str, runtime_header: bool = True) -> Path:
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n" + nvcc_script)
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    if runtime_header:
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


RELEASE = 'echo "Cuda compilation tools, release {v}, V{v}.1"\n'


def _decide(module, tmp_path, env, torch_cuda="13.0"):
    return module.cuda_decision(env={"PATH": "/nonexistent", **env}, torch_cuda=torch_cuda,
                                default_prefix=str(tmp_path / "no-default"))  # fmt: skip


def test_broken_nvcc_on_path_falls_back_to_cpu_with_a_reason(setup_module_, tmp_path):
    """The reported case: an nvcc wrapper on PATH whose toolkit is gone (it exits 127)."""
    prefix = _toolkit(tmp_path / "usr", "echo 'nvcc: toolkit not found' >&2; exit 127\n", runtime_header=False)
    (prefix / "lib").mkdir()
    decision = _decide(setup_module_, tmp_path, {"PATH": str(prefix / "bin")})
    assert decision["cuda"] is False
    assert "exit 127" in decision["reason"] and "toolkit not found" in decision["reason"]


def test_toolkit_major_must_match_torch(setup_module_, tmp_path):
    home = _toolkit(tmp_path / "cuda", RELEASE.format(v="12.4"))
    decision = _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home)})
    assert decision["cuda"] is False and "12.4" in decision["reason"] and "13.0" in decision["reason"]
    assert _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home)}, torch_cuda="12.8")["cuda"] is True


def test_valid_toolkit_and_the_other_fallbacks(setup_module_, tmp_path):
    home = _toolkit(tmp_path / "cuda", RELEASE.format(v="13.0"))
    ok = _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home)})
    assert ok["cuda"] is True and ok["nvcc_version"] == "13.0" and ok["cuda_home"] == str(home)
    skip = _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home), "DEFORMABLE_DETR_SKIP_CUDA": "1"})
    assert skip == {**skip, "cuda": False, "reason": "DEFORMABLE_DETR_SKIP_CUDA=1"}
    cpu_torch = _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home)}, torch_cuda=None)
    assert cpu_torch["cuda"] is False and "CPU-only build" in cpu_torch["reason"]
    none = _decide(setup_module_, tmp_path, {})
    assert none["cuda"] is False and "no CUDA toolkit found" in none["reason"]
    headerless = _toolkit(tmp_path / "partial", RELEASE.format(v="13.0"), runtime_header=False)
    assert "cuda_runtime.h" in _decide(setup_module_, tmp_path, {"CUDA_HOME": str(headerless)})["reason"]


def test_force_cuda_turns_the_fallback_into_an_error(setup_module_, tmp_path):
    home = _toolkit(tmp_path / "cuda", "exit 127\n")
    with pytest.raises(SystemExit, match="FORCE_CUDA=1 but"):
        _decide(setup_module_, tmp_path, {"CUDA_HOME": str(home), "FORCE_CUDA": "1"})


def test_built_wheel_requires_its_torch_minor(setup_module_):
    assert setup_module_.torch_requirement("2.14.1+cu130") == "torch==2.14.*"
    assert setup_module_.torch_requirement("2.5.0") == "torch==2.5.*"


def test_wheel_has_py_typed_and_its_requirements(tmp_path):
    """A metadata-only wheel (no compile): py.typed is packaged, torch>=2.4 required."""
    env = {**os.environ, "DEFORMABLE_DETR_NO_EXT": "1"}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q",
           "-w", str(tmp_path), str(REPO)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("deformable_detr-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "deformable_detr/py.typed" in names
    assert "Requires-Dist: torch>=2.4" in metadata
    assert "Provides-Extra: train" in metadata and "pycocotools" in metadata


def test_one_build_description(setup_module_):
    """build_config.json holds sources and compiler flags for setup.py, CMake and the SIMT emulator;
    deformable_detr/__init__.py holds the version (pyproject.toml reads it)."""
    config = json.loads((REPO / "build_config.json").read_text())
    extra, link = setup_module_.compile_args(config, use_cuda=True, windows=False)
    assert extra["cxx"] == [*config["cxx_flags"], f"-std=c++{config['cxx_standard']}", "-fopenmp"]
    assert extra["nvcc"][: len(config["nvcc_flags"])] == config["nvcc_flags"] and link == ["-fopenmp"]
    assert "nvcc" not in setup_module_.compile_args(config, use_cuda=False, windows=False)[0]
    readers = {p: (REPO / p).read_text() for p in ("setup.py", "CMakeLists.txt", "tests/support/simt_emulator.py")}
    for path, text in readers.items():
        assert "build_config.json" in text, path
        for literal in ("-O3", "-O1", "c++20", "--use_fast_math", "WITH_CUDA", "SIMT=1"):
            assert literal not in text, (path, literal)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r"^version\s*=\s*\"", pyproject, re.M) and 'attr = "deformable_detr.__version__"' in pyproject
    init = (REPO / "deformable_detr" / "__init__.py").read_text()
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', init, re.M)


# --- which CUDA architectures, and saying so (issue 21 item 8: pip was silent for 7.5 minutes while a GPU-less
# machine compiled 4 architectures)


def test_arch_list_from_the_environment_first(setup_module_):
    env = {"TORCH_CUDA_ARCH_LIST": "9.0"}
    assert setup_module_.arch_decision(env, [(8, 0)]) == ("9.0", "from TORCH_CUDA_ARCH_LIST")
    assert setup_module_.arch_decision({"TORCH_CUDA_ARCH_LIST": " 8.0;9.0 "}, [])[0] == "8.0;9.0"


def test_arch_list_from_the_visible_gpus(setup_module_):
    """As torch derives it: unique, sorted, the newest + PTX, capped at the newest SASS this torch has."""
    archs, reason = setup_module_.arch_decision({}, [(9, 0), (8, 6), (9, 0)], ["sm_80", "sm_86", "sm_90"])
    assert archs == "8.6;9.0+PTX" and reason == "the visible GPUs' compute capabilities (8.6, 9.0)"
    archs, _ = setup_module_.arch_decision({"TORCH_CUDA_ARCH_LIST": "native"}, [(12, 1)], ["sm_90a", "sm_90", "sm_120"])
    assert archs == "12.0+PTX"
    assert setup_module_.arch_decision({"TORCH_CUDA_ARCH_LIST": ""}, [(10, 0)])[0] == "10.0+PTX"


def test_default_arch_list_without_a_gpu_is_justified(setup_module_):
    """No GPU, no list: the documented default, and no entry another entry's binary already covers (a cubin runs
    on every GPU of its major version with an equal or higher minor one), so each one pays for its compile."""
    archs, reason = setup_module_.arch_decision({}, [], ["sm_75", "sm_80", "sm_90"])
    assert archs == setup_module_.DEFAULT_ARCH_LIST == "8.0;9.0+PTX"
    assert reason.startswith("the default without a visible GPU")
    assert setup_module_.arch_decision({"TORCH_CUDA_ARCH_LIST": "native"}, [])[0] == "8.0;9.0+PTX"
    majors = [entry.split(".")[0] for entry in archs.split(";")]
    assert len(majors) == len(set(majors))
    readme = (REPO / "README.md").read_text()
    assert f"`{archs}`" in readme  # the Install table names the same default


def test_the_cuda_build_announces_its_architectures(setup_module_, monkeypatch, tmp_path, capsys):
    """_extensions() sets TORCH_CUDA_ARCH_LIST to what it reports, logs it to stderr and, stderr being captured
    (as pip does), also writes it to the terminal. Nothing is compiled here."""
    from torch.utils import cpp_extension

    home = str(tmp_path / "cuda")
    decision = {"cuda": True, "cuda_home": home, "nvcc_version": "13.0", "reason": "a usable toolkit (faked)"}
    monkeypatch.setattr(setup_module_, "cuda_decision", lambda: dict(decision))
    monkeypatch.setattr(setup_module_, "_visible_capabilities", lambda: [])
    terminal = tmp_path / "tty"
    monkeypatch.setattr(setup_module_, "TERMINAL", str(terminal))
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cpp_extension.CUDA_HOME)
    monkeypatch.setenv("CUDA_HOME", home)  # restored afterwards, like the list below
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    (ext,), _, _ = setup_module_._extensions()
    assert any(source.endswith(".cu") for source in ext.sources)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    line = "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX (the default without a visible GPU"
    assert line in capsys.readouterr().err
    assert line in terminal.read_text()
