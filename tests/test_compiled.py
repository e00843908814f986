"""The optional mypyc build (cpsim/compiled.py): all or nothing, and a stale build is reported."""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest

import cpsim.compiled as compiled


def test_the_build_in_use_is_whole_and_an_edited_one_runs_from_source() -> None:
    # CI runs the suite twice: pure Python, then compiled (.ci/run). Both must hold this.
    assert compiled.compiled_modules() in ([], list(compiled.MODULES))
    # an edited build runs from source (the tests then test the edits, not the build)
    stale = compiled.stale_modules()
    assert compiled.build_in_use() == (
        "python (stale build bypassed)"
        if stale
        else "mypyc"
        if compiled.compiled_modules()
        else "python"
    )


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


def test_a_stale_build_runs_every_module_from_source_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = ("pkg.core", "pkg.replica")  # none imported yet
    monkeypatch.setattr(compiled, "MODULES", modules)
    monkeypatch.setattr(compiled, "_paths", lambda m: (tmp_path / f"{m}.py", []))
    monkeypatch.setattr(compiled, "stale_modules", lambda manifest=None: ["pkg.replica"])
    monkeypatch.setattr(compiled, "_bypassed", [])
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with pytest.warns(RuntimeWarning, match=r"pkg\.replica; all 2 modules .* run from source"):
        assert compiled.use_source_if_stale() == ["pkg.replica"]
    finder = sys.meta_path[0]
    assert isinstance(finder, compiled.SourceFirst)
    assert finder.sources == {m: tmp_path / f"{m}.py" for m in modules}  # all, not the stale one
    assert compiled.build_in_use() == "python (stale build bypassed)"


def test_a_stale_build_imported_too_early_is_reported_as_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compiled, "stale_modules", lambda manifest=None: ["cpsim.core"])
    monkeypatch.setattr(compiled, "_bypassed", [])
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    with pytest.warns(RuntimeWarning, match=r"cpsim\.core; .* the compiled code runs"):
        compiled.use_source_if_stale()  # this process imported the modules already
    assert not any(isinstance(f, compiled.SourceFirst) for f in sys.meta_path)


def test_the_source_first_finder_wins_over_an_extension_beside_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "stalepkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("WHERE = 'source'\n")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (package / f"mod{suffix}").write_bytes(b"not a shared library")  # found first by default
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    for name in ("stalepkg", "stalepkg.mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError):
        importlib.import_module("stalepkg.mod")  # the path finder picks the extension
    monkeypatch.delitem(sys.modules, "stalepkg.mod", raising=False)
    sys.meta_path.insert(0, compiled.SourceFirst({"stalepkg.mod": package / "mod.py"}))
    assert importlib.import_module("stalepkg.mod").WHERE == "source"


def test_a_stale_compiled_build_simulates_from_source(tmp_path: Path) -> None:
    """In the compiled build (CI's second pass): a manifest that matches no source makes a
    fresh process load every module of the build from its .py file, and simulate."""
    if not compiled.compiled_modules():
        pytest.skip("pure Python build: nothing compiled to bypass")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({m: "edited" for m in compiled.MODULES}))
    script = f"""
import runpy, sys, warnings
from pathlib import Path
check = runpy.run_path({str(Path(compiled.__file__))!r})  # before cpsim is imported
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert len(check["use_source_if_stale"](Path({str(manifest)!r}))) == {len(compiled.MODULES)}
assert "run from source" in str(caught[0].message)
import benchmarks.sim_speed as speed
from cpsim.workload import FixedLengths, PoissonArrivals, SyntheticWorkload
workload = SyntheticWorkload(
    PoissonArrivals(4.0), FixedLengths(200), FixedLengths(50), num_requests=300
)
result = speed._simulation(2, None, record_series=False).run(workload.requests(0))
assert (result.requests["status"] == "COMPLETED").all(), result.requests["status"].value_counts()
not_source = [m for m in {list(compiled.MODULES)!r} if not sys.modules[m].__file__.endswith(".py")]
assert not_source == [], not_source
"""
    project = Path(compiled.__file__).parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_pure_python_has_nothing_to_warn_about(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_paths", lambda m: (Path(f"{m}.py"), []))
    assert compiled.stale_modules() == []


def test_clean_removes_the_extensions_the_shared_library_and_the_manifest(
    tmp_path: Path,
) -> None:
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    here = tmp_path / "cpsim"
    here.mkdir()
    source, ext, orphan = here / "core.py", here / f"core{suffix}", here / f"old{suffix}"
    shared, manifest = here / f"_native__mypyc{suffix}", here / compiled.MANIFEST
    for path in (source, ext, orphan, shared, manifest):
        path.write_text("")
    assert sorted(compiled.clean(tmp_path)) == sorted([ext, orphan, shared, manifest])
    assert [p.name for p in here.iterdir()] == ["core.py"]  # the source stays
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
