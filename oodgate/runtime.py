"""Process-wide settings that make CPU results repeatable to the last digit."""

from __future__ import annotations

import sys

import torch


def configure_determinism() -> None:
    """Deterministic kernels on the CPU. On CUDA speed wins (cuDNN autotuning), and results may
    differ in the last digits between runs; reproducibility to the bit is a CPU guarantee.

    ``torch.use_deterministic_algorithms`` also sets the flag of TorchInductor (the compiler behind
    ``torch.compile``, which nothing here uses), and importing its config costs 2.5 s of every
    process's start-up (each ``dvc repro`` stage is a process). The kernel flag is set directly;
    the inductor flag too where the compiler is already loaded."""
    if torch.cuda.is_available():
        return
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # another torch: the public call, whatever it costs
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    set_flag(True, warn_only=True)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True
