"""The ``cpsim`` console script: ``cpsim serve [hydra overrides]`` runs the gateway."""

from __future__ import annotations

import runpy
import sys

COMMANDS = {"serve": "experiments.serve"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = sys.argv[1] if len(sys.argv) > 1 else None
        allowed = ", ".join(COMMANDS)
        sys.exit(f"usage: cpsim {{{allowed}}} [overrides ...]; got {given!r}")
    module = COMMANDS[sys.argv[1]]
    sys.argv = [f"cpsim {sys.argv[1]}", *sys.argv[2:]]
    # as `python -m module` does: Hydra finds conf/ relative to a __main__ module's file
    # (imported under its own name, it would look for a Python package named conf)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
