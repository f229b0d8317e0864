"""Which build of torch scripts/setup.sh installs, and why (standard library only: it runs
before the virtual environment has anything in it).

PyPI's Linux wheel of torch is the CUDA build (several GB of NVIDIA libraries); the CPU
build of the same version lives on PyTorch's own index. So:

* Linux without an NVIDIA GPU: the CPU build, ``--index-url`` PyTorch's CPU index
  (``STARPO_TORCH_INDEX_URL`` replaces it, e.g. with a mirror);
* Linux with an NVIDIA GPU: PyPI's default wheel, the CUDA build;
* macOS and Windows: PyPI's default wheel, which is CPU-only there (macOS: CPU + MPS).

``STARPO_TORCH_BUILD=cpu|cuda`` overrides the detection (default ``auto``).

Usage: ``python3 scripts/torch_build.py [--shell]``: the plan in words, or (``--shell``)
as shell assignments for setup.sh: ``TORCH_BUILD``, ``TORCH_INDEX`` (empty: pip's
configured sources) and ``TORCH_REASON``; ``--reachable URL`` exits 0 when pip could read
the index at URL from here.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUILDS = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Plan:
    build: str          # "cpu" or "cuda" (what the wheel will be)
    index: str | None   # pip --index-url for torch; None: pip's configured sources (PyPI)
    reason: str


def nvidia_gpus(nvidia_smi: str | None = None, proc: Path = Path("/proc/driver/nvidia/gpus")
                ) -> list[str]:
    """Names of the NVIDIA GPUs this machine has: ``nvidia-smi -L``'s lines, else the
    driver's ``/proc`` entries (a GPU with a driver but no nvidia-smi); [] for none."""
    exe = nvidia_smi if nvidia_smi is not None else shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            gpus = [line.split(" (UUID")[0].strip() for line in out.stdout.splitlines()
                    if line.startswith("GPU ")]
            if gpus:
                return gpus
    try:
        return [f"GPU {p.name}" for p in sorted(proc.iterdir())]
    except OSError:
        return []


def decide(system: str, gpus: list[str], requested: str = "auto",
           index_override: str | None = None) -> Plan:
    """The build to install on ``system`` (``platform.system()``) given the NVIDIA GPUs
    found and ``STARPO_TORCH_BUILD`` (``requested``)."""
    if requested not in BUILDS:
        raise ValueError(f"STARPO_TORCH_BUILD={requested}: not one of {', '.join(BUILDS)}")
    if system != "Linux":
        if requested == "cuda" and system == "Darwin":
            raise ValueError("STARPO_TORCH_BUILD=cuda: there is no CUDA build of torch for "
                             "macOS")
        return Plan("cpu", None, f"on {system} PyPI's torch wheel is the CPU build "
                                 f"(no separate CPU index needed)")
    if requested == "cuda" or (requested == "auto" and gpus):
        if requested == "cuda":
            why = "STARPO_TORCH_BUILD=cuda"
        else:
            more = f" and {len(gpus) - 1} more" if len(gpus) > 1 else ""
            why = f"an NVIDIA GPU was found ({gpus[0]}{more})"
        return Plan("cuda", None, f"{why}: PyPI's default wheel, the CUDA build")
    why = ("STARPO_TORCH_BUILD=cpu" if requested == "cpu" else
           "no NVIDIA GPU was found (nvidia-smi lists none)")
    index = index_override or CPU_INDEX
    return Plan("cpu", index, f"{why}: the CPU build from {index} (PyPI's Linux wheel "
                              f"would bring the CUDA libraries, several GB)")


def reachable(index: str, timeout: float = 10.0) -> bool:
    """Whether pip could read ``index`` (its page for torch) from here."""
    url = index.rstrip("/") + "/torch/"
    if url.startswith("file:"):         # a local index: a folder per project
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path)).is_dir()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= getattr(resp, "status", 200) < 400
    except (OSError, ValueError):
        return False


def plan_from_environment() -> Plan:
    return decide(platform.system(), nvidia_gpus(),
                  os.environ.get("STARPO_TORCH_BUILD", "auto").strip() or "auto",
                  os.environ.get("STARPO_TORCH_INDEX_URL") or None)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--reachable"] and len(argv) == 2:
        return 0 if reachable(argv[1]) else 1
    try:
        plan = plan_from_environment()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if "--shell" in argv:
        print(f"TORCH_BUILD={shlex.quote(plan.build)}")
        print(f"TORCH_INDEX={shlex.quote(plan.index or '')}")
        print(f"TORCH_REASON={shlex.quote(plan.reason)}")
    else:
        print(f"{plan.build} build of torch: {plan.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
