"""Build script: pure Python by default; ``CPSIM_MYPYC=1`` also compiles the simulator's hot
modules with mypyc (``cpsim/compiled.py`` lists them and says why). Everything else about the
package is in ``pyproject.toml``."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
COMPILED = runpy.run_path(str(HERE / "cpsim" / "compiled.py"))


class BuildExtWithManifest(build_ext):
    """build_ext that also records which source each compiled module was built from."""

    def run(self) -> None:
        if self.inplace:  # an editable install builds into the source tree
            for path in COMPILED["orphan_extensions"](HERE):
                path.unlink()
        super().run()
        hashes = {
            module: COMPILED["source_hash"](HERE / (module.replace(".", "/") + ".py"))
            for module in COMPILED["MODULES"]
        }
        root = HERE if self.inplace else Path(self.build_lib)
        (root / "cpsim" / COMPILED["MANIFEST"]).write_text(json.dumps(hashes, indent=1) + "\n")


def extensions() -> list:
    flag = os.environ.get(COMPILED["ENV_VAR"], "0")
    if flag not in ("0", "1"):
        raise SystemExit(f"{COMPILED['ENV_VAR']}={flag!r} is not allowed; use 0 or 1")
    if flag == "0":
        return []
    from mypyc.build import mypycify

    paths = [module.replace(".", "/") + ".py" for module in COMPILED["MODULES"]]
    # --no-site-packages: third-party types (numpy, pandas, simpy) are Any to the compiler, in
    # every environment. With their stubs found, mypyc trusts them and checks at run time that,
    # say, a pandas sum is an int, which a numpy.int64 is not.
    return mypycify(["--no-site-packages", *paths], opt_level="3", group_name="cpsim._native")


ext_modules = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtWithManifest} if ext_modules else {})
