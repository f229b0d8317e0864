"""scripts/torch_build.py, the decision scripts/setup.sh makes: which build of torch a
machine gets and why (the install itself is measured in the README, not here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "torch_build.py"


def _module():
    spec = importlib.util.spec_from_file_location("torch_build", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["torch_build"] = mod          # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


TB = _module()


def test_linux_without_a_gpu_gets_the_cpu_build_from_the_cpu_index():
    plan = TB.decide("Linux", [])
    assert plan.build == "cpu" and plan.index == "https://download.pytorch.org/whl/cpu"
    assert "no NVIDIA GPU" in plan.reason and plan.index in plan.reason
    # a mirror of the CPU index replaces it
    plan = TB.decide("Linux", [], index_override="https://mirror.example/whl/cpu")
    assert plan.index == "https://mirror.example/whl/cpu"


def test_linux_with_a_gpu_gets_pypis_cuda_build():
    plan = TB.decide("Linux", ["GPU 0: NVIDIA H200", "GPU 1: NVIDIA H200"])
    assert plan.build == "cuda" and plan.index is None
    assert "NVIDIA H200 and 1 more" in plan.reason


def test_the_choice_can_be_forced_either_way():
    assert TB.decide("Linux", ["GPU 0: NVIDIA H200"], "cpu").build == "cpu"
    assert TB.decide("Linux", ["GPU 0: NVIDIA H200"], "cpu").index == TB.CPU_INDEX
    forced = TB.decide("Linux", [], "cuda")
    assert forced.build == "cuda" and forced.index is None
    assert "STARPO_TORCH_BUILD=cuda" in forced.reason
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda"):
        TB.decide("Linux", [], "gpu")


def test_macos_and_windows_use_pypis_wheel_which_is_cpu_there():
    for system in ("Darwin", "Windows"):
        plan = TB.decide(system, [])
        assert plan.build == "cpu" and plan.index is None and system in plan.reason
    with pytest.raises(ValueError, match="no CUDA build of torch for macOS"):
        TB.decide("Darwin", [], "cuda")


def _fake_smi(tmp_path: Path, stdout: str, rc: int = 0) -> Path:
    exe = tmp_path / "nvidia-smi"
    # shell builtins only: the test runs it with an otherwise empty PATH
    exe.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {rc}\n")
    exe.chmod(0o755)
    return exe


def test_gpus_are_read_from_nvidia_smi_or_the_drivers_proc_entries(tmp_path):
    smi = _fake_smi(tmp_path, "GPU 0: NVIDIA H200 (UUID: GPU-1234)\n")
    none = tmp_path / "no-proc"
    assert TB.nvidia_gpus(str(smi), none) == ["GPU 0: NVIDIA H200"]
    # nvidia-smi present but failing (driver not loaded), no /proc entries: no GPU
    (tmp_path / "failing").mkdir()
    bad = _fake_smi(tmp_path / "failing", "NVIDIA-SMI has failed\n", rc=9)
    assert TB.nvidia_gpus(str(bad), none) == []
    # no nvidia-smi at all, but the driver lists a GPU
    proc = tmp_path / "proc"
    (proc / "0000:3b:00.0").mkdir(parents=True)
    assert TB.nvidia_gpus("", proc) == ["GPU 0000:3b:00.0"]
    assert TB.nvidia_gpus("", none) == []


def _shell(tmp_path: Path, env: dict) -> dict[str, str]:
    p = subprocess.run([sys.executable, str(SCRIPT), "--shell"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    # what setup.sh does with it: eval in bash, then read the three variables
    out = subprocess.run(["bash", "-c", 'eval "$1"; printf "%s\\n%s\\n%s" "$TORCH_BUILD" '
                                        '"$TORCH_INDEX" "$TORCH_REASON"', "_", p.stdout],
                         capture_output=True, text=True, timeout=60)
    build, index, reason = out.stdout.split("\n", 2)
    return {"build": build, "index": index, "reason": reason}


@pytest.mark.skipif(sys.platform != "linux", reason="the CPU index applies to Linux")
def test_the_shell_plan_follows_the_machine(tmp_path):
    """setup.sh's view: with a (fake) nvidia-smi on PATH the CUDA build, without the CPU
    build; the reason survives the shell's quoting (it has an apostrophe)."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("STARPO_TORCH_BUILD", "STARPO_TORCH_INDEX_URL")}
    bare = tmp_path / "bin"
    bare.mkdir()
    no_gpu = _shell(tmp_path, {**base, "PATH": str(bare)})
    if Path("/proc/driver/nvidia/gpus").is_dir():
        pytest.skip("this machine has an NVIDIA driver")
    assert no_gpu["build"] == "cpu" and no_gpu["index"] == TB.CPU_INDEX
    assert "PyPI's Linux wheel" in no_gpu["reason"]
    _fake_smi(bare, "GPU 0: NVIDIA H200 (UUID: GPU-1)\n")
    gpu = _shell(tmp_path, {**base, "PATH": str(bare)})
    assert gpu == {"build": "cuda", "index": "",
                   "reason": "an NVIDIA GPU was found (GPU 0: NVIDIA H200): PyPI's default "
                             "wheel, the CUDA build"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--shell"], capture_output=True,
                       text=True, timeout=60, env={**base, "STARPO_TORCH_BUILD": "gpu"})
    assert p.returncode == 2 and "STARPO_TORCH_BUILD=gpu" in p.stderr


def test_reachable_reads_the_index_page_of_torch(tmp_path):
    index = tmp_path / "index"
    assert not TB.reachable(index.as_uri())
    (index / "torch").mkdir(parents=True)
    assert TB.reachable(index.as_uri())
    assert not TB.reachable("http://127.0.0.1:9/whl/cpu", timeout=2)   # nothing listens
    assert not TB.reachable("not a url")
