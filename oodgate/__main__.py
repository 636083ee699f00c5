"""``python -m oodgate``: the numerics of ``--params``/``--set`` are pinned before the command line
(and with it torch and NumPy) loads, so that every result is computed with the kernels its params
name (:mod:`oodgate.base.numerics`)."""

import sys

from oodgate.base import numerics


def main() -> int:
    numerics.apply_from_argv(sys.argv[1:])
    from oodgate.running.cli import main as cli  # after the pin: loading it loads torch

    return cli()


sys.exit(main())
