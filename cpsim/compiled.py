"""The compiled build of the simulator's hot path (mypyc), and what happens when it is stale.

``pip install -e .`` compiles the modules in ``MODULES`` with mypyc when it can (a C compiler
is found): the same source, type-checked and translated to C, about twice as fast
(``benchmarks/README.md``). Where it cannot, the install goes on as pure Python, which behaves
identically (the simulator's results are bit for bit the same). ``CPSIM_MYPYC=1`` makes the
compiled build required (a failure stops the install); ``CPSIM_MYPYC=0`` builds pure Python and
removes an earlier build's compiled files.

A compiled module would shadow its ``.py`` file, so an edit to the source would have no effect.
The build records a hash of each source it compiled; when a source differs from its record,
importing cpsim runs all of ``MODULES`` from source instead (``use_source_if_stale``: all, since
compiled modules call each other's compiled code directly), with a warning that names the
edited modules, until the next install compiles them again. The ``cpsim-compiled`` command says
which build is in use; ``--clean`` removes the compiled files. Policies and routers other than
the ranking helpers stay interpreted, so new ones need no build.
This module uses only the standard library: ``setup.py`` reads ``MODULES`` from it."""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ENV_VAR = "CPSIM_MYPYC"
MANIFEST = "_compiled_sources.json"  # written next to this file by the compiled build
MODULES = (
    "backends.sim.block_manager",
    "backends.sim.cluster",
    "backends.sim.decode_set",
    "backends.sim.process",
    "backends.sim.replica",
    "backends.sim.request",
    "backends.sim.scheduling",
    "backends.sim.step",
    "backends.sim.wakeup",
    "cpsim.core",
    "cpsim.instances",
    "cpsim.metrics",
    "cpsim.outliers",
    "cpsim.profiles",
    "cpsim.requests",
    "cpsim.views",
    "cpsim.workload.emit",
    "policies.routing.ranking",
)


def source_hash(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _package_dir(top: str) -> Path:
    spec = importlib.util.find_spec(top)
    assert spec is not None and spec.submodule_search_locations is not None
    return Path(next(iter(spec.submodule_search_locations)))


def _paths(module: str) -> tuple[Path, list[Path]]:
    """A module's source file and the compiled extensions beside it, found on disk (a compiled
    module's own ``__file__`` points into the shared library's folder, so it is not used)."""
    top, _, rest = module.partition(".")
    base = _package_dir(top) / rest.replace(".", "/")
    return base.with_suffix(".py"), [
        base.with_name(base.name + suffix)
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if base.with_name(base.name + suffix).exists()
    ]


def compiled_modules() -> list[str]:
    """The modules of ``MODULES`` that import from a compiled extension (empty: pure Python)."""
    return [module for module in MODULES if _paths(module)[1]]


def stale_modules(manifest: Path | None = None) -> list[str]:
    """Compiled modules whose ``.py`` source differs from the one they were compiled from
    (``manifest``: the build's record of its sources; by default the one beside this file)."""
    built: dict[str, str] | None = None
    stale = []
    for module in MODULES:
        source, extensions = _paths(module)
        if not extensions:
            continue  # pure Python: nothing to be stale
        if built is None:
            manifest = manifest or Path(__file__).with_name(MANIFEST)
            built = json.loads(manifest.read_text()) if manifest.exists() else {}
        if not source.exists() or built.get(module) != source_hash(source):
            stale.append(module)
    return stale


class SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the given modules from their ``.py`` files, ahead of any compiled extension
    beside them (the path finder would pick the extension)."""

    def __init__(self, sources: dict[str, Path]) -> None:
        self.sources = sources

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


_bypassed: list[str] = []  # the stale modules that made this process run MODULES from source


def use_source_if_stale(manifest: Path | None = None) -> list[str]:
    """When a compiled module's source was edited since the build, import every module of
    ``MODULES`` from source, and warn; returns the stale modules. Called first thing by
    ``cpsim/__init__.py`` (``backends`` and ``policies`` import cpsim first), so no module of
    the build is loaded yet."""
    stale = stale_modules(manifest)
    if not stale or _bypassed:
        return stale
    loaded = [module for module in MODULES if module in sys.modules]
    if loaded:  # too late to bypass: the compiled code runs
        warnings.warn(
            f"compiled modules older than their source: {', '.join(stale)}; {loaded[0]} was "
            f"imported before cpsim, so the compiled code runs, not your edits. Reinstall "
            f"(`pip install -e .`) to compile them again",
            RuntimeWarning,
            stacklevel=2,
        )
        return stale
    sys.meta_path.insert(0, SourceFirst({module: _paths(module)[0] for module in MODULES}))
    _bypassed.extend(stale)
    warnings.warn(
        f"compiled modules older than their source: {', '.join(stale)}; all {len(MODULES)} "
        f"modules of the compiled build run from source, so your edits take effect, at about "
        f"half the speed. Reinstall (`pip install -e .`) to compile them again, or "
        f"`cpsim-compiled --clean` to stay with pure Python",
        RuntimeWarning,
        stacklevel=2,
    )
    return stale


def build_in_use() -> str:
    """What runs: ``mypyc`` (every module of ``MODULES`` compiled; stale only if imported
    before cpsim, which warns), ``python`` (none compiled), ``python (stale build bypassed)``
    or ``partial`` (some compiled: a broken build)."""
    if _bypassed:
        return "python (stale build bypassed)"
    compiled = len(compiled_modules())
    return "python" if compiled == 0 else "mypyc" if compiled == len(MODULES) else "partial"


def _extension_files(project: Path) -> list[tuple[Path, str]]:
    """Each compiled module's extension under ``project``'s top-level packages, with the
    module it would import as (the shared library aside)."""
    tops = sorted({module.partition(".")[0] for module in MODULES})
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for top in tops:
        root = project / top
        for path in sorted(root.rglob("*")):
            if not path.name.endswith(suffixes) or "__mypyc" in path.name:
                continue  # not an extension, or the shared library itself
            stem = path.name.partition(".")[0]  # core.cpython-311-x86_64-linux-gnu.so: core
            found.append((path, ".".join([*path.parent.relative_to(project).parts, stem])))
    return found


def _project() -> Path:
    return _package_dir("cpsim").parent


def orphan_extensions(project: Path | None = None) -> list[Path]:
    """Module extensions of an earlier build for modules no longer in ``MODULES``: one
    would shadow its ``.py`` file with a module the shared library no longer has, and the
    import fails. The build deletes them; so does ``clean``. ``project``: the folder of the
    top-level packages (by default found by import)."""
    return [
        path for path, module in _extension_files(project or _project()) if module not in MODULES
    ]


def clean(project: Path | None = None) -> list[Path]:
    """Delete the compiled build's files from the source tree (an editable install's build):
    every module extension (of this build or an earlier one), the shared library and the
    manifest. ``project``: the folder of the top-level packages (by default found by import)."""
    project = project or _project()
    here = project / "cpsim"
    files = [path for path, _ in _extension_files(project)]
    files += [p for s in importlib.machinery.EXTENSION_SUFFIXES for p in here.glob(f"*__mypyc{s}")]
    files += [p for p in [here / MANIFEST] if p.exists()]
    for path in files:
        path.unlink()
    return files


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="cpsim-compiled", description="Status (or removal) of the compiled build."
    )
    parser.add_argument("--clean", action="store_true", help="delete the compiled files")
    args = parser.parse_args(argv)
    if args.clean:
        removed = clean()
        print(f"removed {len(removed)} compiled file(s); the simulator runs as pure Python")
        return
    compiled, stale = compiled_modules(), stale_modules()
    print(
        f"compiled: {len(compiled)} of {len(MODULES)} modules"
        + (f"; stale, so all run from source: {stale}" if stale else "")
    )
