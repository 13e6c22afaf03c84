"""prepare.py's start-up check of the installed MLX build: the NVIDIA machine that silently got the CPU build,
both builds at once, no backend at all. The GPU and the installed packages are faked; no GPU needed."""
import os

import pytest

import prepare
from conftest import ROOT

CPU, CUDA = ["mlx-cpu"], ["mlx-cuda-13"]


@pytest.mark.parametrize("nvidia_gpu, installed, fatal, fix", [
    (True, CPU, False, prepare.CUDA_INSTALL),            # `uv sync` or a plain `uv run` on an NVIDIA machine
    (True, CPU + CUDA, False, prepare.CUDA_INSTALL),     # the CPU build added back over the CUDA one
    (False, CPU + CUDA, False, prepare.CPU_INSTALL),
    (True, [], True, prepare.CUDA_INSTALL),              # `uv sync` without `--extra cuda` under UV_NO_GROUP=cpu
    (False, [], True, prepare.CPU_INSTALL),
])
def test_mlx_build_problem_names_the_fix(nvidia_gpu, installed, fatal, fix):
    got_fatal, line = prepare.mlx_build_problem(nvidia_gpu, installed, system="linux")
    assert got_fatal is fatal
    assert line.endswith(f"Fix: {fix}") and "\n" not in line


@pytest.mark.parametrize("nvidia_gpu, installed, fix", [(True, CUDA, prepare.CUDA_INSTALL), (False, CPU, prepare.CPU_INSTALL)])
def test_mlx_build_problem_library_deleted_by_other_build(nvidia_gpu, installed, fix):
    # uninstalling the CPU build after both were installed deletes the CUDA build's libmlx.so with it
    assert prepare.mlx_build_problem(nvidia_gpu, installed, library_present=False, system="linux") == (
        True, f"error: MLX's library (mlx/lib/libmlx.so) is not installed. Fix: {fix}")


def test_mlx_library_present_here():
    assert prepare.mlx_library_present()  # the test environment has a working MLX


@pytest.mark.parametrize("nvidia_gpu, installed, system", [
    (False, CPU, "linux"),    # CPU users and CI: silent
    (True, CUDA, "linux"),
    (False, CUDA, "linux"),   # a CUDA install without a visible driver: MLX's own error says more
    (False, [], "darwin"),    # macOS: plain mlx carries Metal
])
def test_mlx_build_problem_silent_when_build_fits(nvidia_gpu, installed, system):
    assert prepare.mlx_build_problem(nvidia_gpu, installed, system=system) is None


def test_nvidia_gpu_present_from_driver_file_or_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare.shutil, "which", lambda name: None)
    monkeypatch.setattr(prepare, "NVIDIA_GPU_MARKERS", (str(tmp_path / "version"),))
    assert not prepare.nvidia_gpu_present()
    (tmp_path / "version").write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05\n")
    assert prepare.nvidia_gpu_present()
    (tmp_path / "version").unlink()
    monkeypatch.setattr(prepare.shutil, "which", lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else None)
    assert prepare.nvidia_gpu_present()


def test_check_mlx_build_prints_one_line_and_exits_2_without_backend(monkeypatch, capsys):
    monkeypatch.setattr(prepare, "nvidia_gpu_present", lambda: True)
    monkeypatch.setattr(prepare, "mlx_library_present", lambda: True)
    monkeypatch.setattr(prepare, "_installed", lambda dist: dist == "mlx-cpu")
    prepare.check_mlx_build()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and prepare.CUDA_INSTALL in err
    monkeypatch.setattr(prepare, "_installed", lambda dist: False)
    with pytest.raises(SystemExit) as exit_info:
        prepare.check_mlx_build()
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_fix_command_matches_pyproject():
    # the printed fix relies on the CPU build living in default group `cpu` and CUDA in extra `cuda`
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert "cpu" in project["tool"]["uv"]["default-groups"]
    assert any(dep.startswith("mlx[cpu]") for dep in project["dependency-groups"]["cpu"])
    assert any(dep.startswith("mlx[cuda13]") for dep in project["project"]["optional-dependencies"]["cuda"])
    assert "UV_NO_GROUP=cpu" in prepare.CUDA_INSTALL and "--extra cuda" in prepare.CUDA_INSTALL
    assert "--reinstall-package mlx-cuda-13" in prepare.CUDA_INSTALL and "--reinstall-package mlx-cpu" in prepare.CPU_INSTALL
