"""Run a module with the toy world's gold reward unimportable: ``python -m toyworld.loop.sealed gateway serve ...``.

The evaluate-loop starts the gateway and every training round through this, so nothing on
the serving or training path can read the gold reward: importing ``toyworld.gold``
there raises ImportError. Only the loop's own evaluation and the simulated user (an outside
client of the gateway) read it. Knows nothing else.
"""

from __future__ import annotations

import runpy
import sys

SEALED = ("toyworld.gold",)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m toyworld.loop.sealed MODULE [ARGS...]")
    for name in SEALED:
        sys.modules[name] = None  # type: ignore[assignment]  # None in sys.modules: "import name" raises ImportError
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
