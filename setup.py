"""Build script: compiles the simulator's hot modules with mypyc when it can (``cpsim/compiled.py``
lists them and says why), else builds pure Python. ``CPSIM_MYPYC``: unset or ``auto`` (that),
``1`` (the compiled build is required: a failure stops the install), ``0`` (pure Python; an
earlier build's compiled files in the source tree are removed). Everything else about the
package is in ``pyproject.toml``."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = Path(__file__).resolve().parent
COMPILED = runpy.run_path(str(HERE / "cpsim" / "compiled.py"))
ENV_VAR = COMPILED["ENV_VAR"]


def _mode() -> str:
    flag = os.environ.get(ENV_VAR, "auto")
    if flag not in ("auto", "0", "1"):
        raise SystemExit(f"{ENV_VAR}={flag!r} is not allowed; use auto (the default), 0 or 1")
    return flag


def _fall_back(why: str) -> None:
    print(
        f"cpsim: the compiled build failed ({why}); installing pure Python, which gives the "
        f"same results at about half the speed. {ENV_VAR}=1 makes this an error.",
        file=sys.stderr,
    )


class BuildExtWithManifest(build_ext):
    """build_ext that also records which source each compiled module was built from, and,
    unless the compiled build is required, falls back to pure Python when compiling fails."""

    def run(self) -> None:
        if self.inplace:  # an editable install builds into the source tree
            for path in COMPILED["orphan_extensions"](HERE):
                path.unlink()
        try:
            super().run()
        except (CCompilerError, BaseError) as error:
            if MODE == "1":
                raise
            _fall_back(f"{type(error).__name__}: {error}")
            COMPILED["clean"](HERE if self.inplace else Path(self.build_lib))
            return
        hashes = {
            module: COMPILED["source_hash"](HERE / (module.replace(".", "/") + ".py"))
            for module in COMPILED["MODULES"]
        }
        root = HERE if self.inplace else Path(self.build_lib)
        (root / "cpsim" / COMPILED["MANIFEST"]).write_text(json.dumps(hashes, indent=1) + "\n")


def extensions() -> list:
    if MODE == "0":
        COMPILED["clean"](HERE)  # a pure build leaves no compiled module to shadow its source
        return []
    paths = [module.replace(".", "/") + ".py" for module in COMPILED["MODULES"]]
    try:
        from mypyc.build import mypycify

        # --no-site-packages: third-party types (numpy, pandas, simpy) are Any to the compiler,
        # in every environment. With their stubs found, mypyc trusts them and checks at run
        # time that, say, a pandas sum is an int, which a numpy.int64 is not.
        return mypycify(["--no-site-packages", *paths], opt_level="3", group_name="cpsim._native")
    except (Exception, SystemExit) as error:  # mypyc missing, or a type error in the source
        if MODE == "1":
            raise
        _fall_back(f"{type(error).__name__}: {error}")
        return []


MODE = _mode()
ext_modules = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtWithManifest} if ext_modules else {})
