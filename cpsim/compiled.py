"""The optional compiled build of the simulator's hot path (mypyc), and a check that it is current.

``CPSIM_MYPYC=1 pip install -e .`` compiles the modules in ``MODULES`` with mypyc: the same
source, type-checked and translated to C, about twice as fast (``benchmarks/README.md``). A plain
install is pure Python and behaves identically (the simulator's results are bit for bit the same).

A compiled module shadows its ``.py`` file, so an edit to the source has no effect until it is
rebuilt. The build records a hash of each source it compiled; ``stale_modules()`` lists the
compiled modules whose source changed since, and importing cpsim warns about them.
The ``cpsim-compiled`` command says which build is in use; ``--clean`` removes the compiled files
(a plain ``pip install -e .`` does not: they are build outputs in the source tree). Policies and
routers other than the ranking helpers stay interpreted, so new ones need no build.
This module uses only the standard library: ``setup.py`` reads ``MODULES`` from it."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import warnings
from pathlib import Path

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


def warn_if_stale() -> None:
    stale = stale_modules()
    if stale:
        warnings.warn(
            f"compiled modules older than their source: {', '.join(stale)}; the compiled code "
            f"runs, not your edits. Rebuild with `{ENV_VAR}=1 pip install -e .`, or go back "
            f"to pure Python with `cpsim-compiled --clean`",
            RuntimeWarning,
            stacklevel=2,
        )


def orphan_extensions(project: Path | None = None) -> list[Path]:
    """Module extensions of an earlier build for modules no longer in ``MODULES``: one
    would shadow its ``.py`` file with a module the shared library no longer has, and the
    import fails. The build deletes them; so does ``clean``. ``project``: the folder of the
    top-level packages (by default found by import)."""
    tops = sorted({module.partition(".")[0] for module in MODULES})
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    found = []
    for top in tops:
        root = project / top if project is not None else _package_dir(top)
        for path in sorted(root.rglob("*")):
            if not path.name.endswith(suffixes) or "__mypyc" in path.name:
                continue  # not an extension, or the shared library itself
            stem = path.name.partition(".")[0]  # core.cpython-311-x86_64-linux-gnu.so: core
            module = ".".join([*path.parent.relative_to(root.parent).parts, stem])
            if module not in MODULES:
                found.append(path)
    return found


def clean(here: Path | None = None) -> list[Path]:
    """Delete the compiled build's files from the source tree (an editable install's build):
    the modules' extensions (of this build or an earlier one), the shared library and the
    manifest (both in ``here``: by default the folder of this file)."""
    here = here or Path(__file__).parent
    files = [ext for module in MODULES for ext in _paths(module)[1]]
    files += orphan_extensions(here.parent)
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
        + (f"; stale: {stale}" if stale else "")
    )
