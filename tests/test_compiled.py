"""The optional mypyc build (cpsim/compiled.py): all or nothing, and a stale build is reported."""

from __future__ import annotations

import importlib.machinery
import json
from pathlib import Path

import pytest

import cpsim.compiled as compiled


def test_the_build_in_use_is_whole_and_current() -> None:
    # CI runs the suite twice: pure Python, then compiled (.ci/run). Both must hold this.
    assert compiled.compiled_modules() in ([], list(compiled.MODULES))
    assert compiled.stale_modules() == []


def test_an_edited_source_makes_its_compiled_module_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = {}
    for module in ("pkg.fresh", "pkg.edited"):
        source = tmp_path / f"{module}.py"
        source.write_text("x = 1\n")
        sources[module] = source
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({m: compiled.source_hash(p) for m, p in sources.items()}))
    sources["pkg.edited"].write_text("x = 2\n")
    monkeypatch.setattr(compiled, "MODULES", tuple(sources))
    monkeypatch.setattr(compiled, "_paths", lambda m: (sources[m], [sources[m].with_suffix(".so")]))
    assert compiled.stale_modules(manifest) == ["pkg.edited"]
    manifest.unlink()  # no record of the build: every compiled module is suspect
    assert compiled.stale_modules(manifest) == ["pkg.fresh", "pkg.edited"]


def test_a_stale_build_warns_with_the_module_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "stale_modules", lambda: ["cpsim.core"])
    with pytest.warns(RuntimeWarning, match=r"cpsim\.core.*CPSIM_MYPYC=1 pip install -e \."):
        compiled.warn_if_stale()


def test_pure_python_has_nothing_to_warn_about(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_paths", lambda m: (Path(f"{m}.py"), []))
    assert compiled.stale_modules() == []


def test_clean_removes_the_extensions_the_shared_library_and_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    source, ext = tmp_path / "core.py", tmp_path / f"core{suffix}"
    shared, manifest = tmp_path / f"_native__mypyc{suffix}", tmp_path / compiled.MANIFEST
    for path in (source, ext, shared, manifest):
        path.write_text("")
    monkeypatch.setattr(compiled, "MODULES", ("pkg.core",))
    monkeypatch.setattr(compiled, "_paths", lambda m: (source, [ext] if ext.exists() else []))
    assert sorted(compiled.clean(tmp_path)) == sorted([ext, shared, manifest])
    assert [p.name for p in tmp_path.iterdir()] == ["core.py"]  # the source stays
    assert compiled.clean(tmp_path) == []


def test_the_command_reports_the_build_in_use(capsys: pytest.CaptureFixture[str]) -> None:
    compiled.main([])
    n = len(compiled.compiled_modules())
    assert capsys.readouterr().out == f"compiled: {n} of {len(compiled.MODULES)} modules\n"


def test_extensions_of_modules_no_longer_compiled_are_orphans(tmp_path: Path) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    kept = [tmp_path / f"cpsim/core{suffix}", tmp_path / f"cpsim/_native__mypyc{suffix}"]
    orphan = tmp_path / f"cpsim/workload/workload{suffix}"  # compiled by an earlier build
    for path in [*kept, orphan]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    assert compiled.orphan_extensions(tmp_path) == [orphan]
    assert "cpsim.workload.workload" not in compiled.MODULES
