"""Prefect flows: each module composes the tasks in ``tasks/``; no ML logic here.

A flow module run as a program (``python -m flows.pipeline``) is imported after this package, so the
program's first step happens here, before the module's imports load NumPy and torch: the numerics
its ``--params`` and ``--set`` name are pinned (``oodgate.base.numerics``: the same bits on any x86-64
CPU are decided when torch loads), and the pipeline's and the monitor's temporary Prefect server
starts booting while the rest imports (3.5 s of imports overlap its start). Imported any other way
(a test, a Dask worker, a deployment's run) this does nothing.
"""

import sys

from flows.server import start_temporary_prefect_server
from oodgate.base import numerics
from oodgate.base.config import ConfigError, load_config, program_params
from oodgate.base.project import PROJECT_ROOT

# program -> where its --params is taken from without --root (None: the working directory)
PINNED_PROGRAMS = {"pipeline": None, "monitor": PROJECT_ROOT, "deploy": PROJECT_ROOT}
FLOW_PROGRAMS = ("pipeline", "monitor")  # programs that run a flow on a temporary Prefect server


def program() -> str | None:
    """``pipeline`` when this process runs ``python -m flows.pipeline ...``, and so on; else None.
    (While ``-m`` looks its module up, which imports this package first, ``sys.argv[0]`` is ``-m``.)"""
    if sys.argv[:1] != ["-m"]:
        return None
    argv = sys.orig_argv
    for i, arg in enumerate(argv[1:], 1):
        if arg.startswith("-m"):
            module = arg[2:] or (argv[i + 1] if i + 1 < len(argv) else "")
            package, _, name = module.partition(".")
            return name if package == "flows" else None
    return None


def begin_program() -> None:
    """Pin the numerics of the program's params, and start the temporary server of a flow program
    whose params load (a config that does not is refused by the program, with no server started)."""
    name = program()
    if name not in PINNED_PROGRAMS:
        return
    args, default_root = sys.argv[1:], PINNED_PROGRAMS[name]
    numerics.apply_from_argv(args, default_root)
    if name not in FLOW_PROGRAMS or "-h" in args or "--help" in args:
        return
    try:
        load_config(*program_params(args, default_root))  # parsed once: the program reads it again
    except ConfigError:
        return
    start_temporary_prefect_server()


begin_program()
