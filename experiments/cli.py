"""The ``cpsim`` console script: ``cpsim serve [hydra overrides]`` runs the gateway."""

from __future__ import annotations

import sys

COMMANDS = {"serve": "experiments.serve"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        given = sys.argv[1] if len(sys.argv) > 1 else None
        allowed = ", ".join(COMMANDS)
        sys.exit(f"usage: cpsim {{{allowed}}} [overrides ...]; got {given!r}")
    module = __import__(COMMANDS[sys.argv[1]], fromlist=["main"])
    sys.argv = [f"cpsim {sys.argv[1]}", *sys.argv[2:]]
    module.main()


if __name__ == "__main__":
    main()
