"""Numerics: which kernels compute, so that the same inputs give the same bits on any x86-64 CPU.

A floating-point sum depends on the order of its terms, and the libraries under PyTorch and NumPy
choose their kernels, and so that order, by the CPU they find:

- MKL (every matrix product: linear layers, convolutions' GEMMs) by vendor and instruction set;
- oneDNN (the convolutions) by instruction set;
- ATen (every other operator, Sleef's vectorised exp/log) by instruction set (AVX2 or AVX-512 width);
- NumPy's dispatched loops (exp, log and sums in the metrics) likewise;
- every threaded reduction by the number of threads.

Left alone, the same training gives other weights on an AVX-512 Intel CPU than on an AVX2 AMD one,
and the gate can decide differently. ``numerics.mode: portable`` (the default) pins all of them in
the environment before torch and NumPy load (:func:`environment`)::

    MKL_CBWR=AVX2,STRICT           MKL's conditional numerical reproducibility: its AVX2 code on any
                                   vendor's CPU, independent of memory alignment
    ONEDNN_MAX_CPU_ISA=AVX2        oneDNN's kernels at AVX2
    ATEN_CPU_CAPABILITY=avx2       ATen's vectorised kernels at AVX2 width
    NPY_ENABLE_CPU_FEATURES=X86_V3 NumPy's dispatched loops at AVX2 (x86-64-v3)
    OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n and torch.set_num_threads(n):
                                   ``numerics.threads``, not the machine's core count

NumPy's matrix products go to OpenBLAS, which picks its kernel by CPU too: no result goes through
them (the gate's resampled metrics sum with NumPy's own loops), so OpenBLAS is left as it is.
So a result is the same to the last bit on every x86-64 CPU with AVX2 and FMA (Intel since Haswell,
AMD since Zen), with the pinned software (``constraints.txt``). ``numerics.mode: native`` leaves the
choice to the machine: its fastest kernels and torch's default thread count, results repeatable on
the same CPU model and thread count only. On other architectures (ARM) only the thread count is
pinned: results repeat on the same CPU, and differ from x86-64's. On CUDA, ``portable`` turns on
deterministic algorithms (cuDNN's deterministic kernels, no autotuning, cuBLAS's fixed workspace):
the same results run to run on the same GPU model and software, not across GPU models.

This module imports nothing heavy: entry points call :func:`apply` before torch or NumPy load, and
every step calls :func:`activate`, which refuses to compute if the process loaded torch under other
numerics than the config asks for (settings read at load time cannot be changed afterwards).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, cast

from oodgate.base.config import Config, ConfigError, load_yaml, program_params  # load_yaml expands no alias
from oodgate.base.files import write_json

MODES = ("portable", "native")
DEFAULT_THREADS = 2
MARKER = "OODGATE_NUMERICS"  # "<mode>/<threads>": what this process (and its children) computes with
# MKL's branch codes (mkl_cbwr.h): what mkl_serv_cbwr_get reports once MKL runs
_MKL_BRANCHES = {0: "off", 1: "off", 2: "auto", 3: "COMPATIBLE", 10: "AVX2", 12: "AVX512", 14: "AVX512_E1"}
_MKL_COMPATIBLE = 3
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class NumericsError(RuntimeError):
    """This process computes under other numerics than the config asks for, or cannot honour them."""


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is absent)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def has_avx2() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def environment(mode: str, threads: int | None) -> dict[str, str]:
    """The variables :func:`apply` sets for ``mode`` (portable: every pin of the module docstring
    that this CPU can honour; both modes: the thread count when one is given)."""
    if mode not in MODES:
        raise NumericsError(f"numerics.mode must be one of {', '.join(MODES)}, got {mode!r}")
    env = {MARKER: f"{mode}/{threads if threads is not None else 'auto'}"}
    if threads is not None:
        env.update(dict.fromkeys(_THREAD_VARIABLES, str(threads)))
    if mode == "portable" and is_x86() and has_avx2():
        env.update(
            MKL_CBWR="COMPATIBLE,STRICT",
            ONEDNN_MAX_CPU_ISA="AVX2",
            ATEN_CPU_CAPABILITY="avx2",
            NPY_ENABLE_CPU_FEATURES="X86_V3",
        )
    return env


def in_force() -> tuple[str, str] | None:
    """``(mode, threads)`` this process was started under by :func:`apply`, or None."""
    mode, sep, threads = os.environ.get(MARKER, "").partition("/")
    return (mode, threads) if sep else None


def _loaded() -> list[str]:
    return [m for m in ("torch", "numpy") if m in sys.modules]


def apply(mode: str = "portable", threads: int | None = DEFAULT_THREADS) -> None:
    """Put ``mode``'s settings into this process's environment (its children inherit them). Must
    run before torch and NumPy load; if they are loaded already, the settings must be in force
    (else :class:`NumericsError`)."""
    env = environment(mode, threads)
    loaded = _loaded()
    if not loaded:
        for key in ("MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "NPY_ENABLE_CPU_FEATURES"):
            os.environ.pop(key, None)  # native: the machine's own choice, whatever the parent pinned
        os.environ.update(env)
        return
    if in_force() != (mode, env[MARKER].partition("/")[2]):
        if in_force() is not None and cast("tuple[str, str]", in_force())[0] == mode:
            # only the thread count differs: settable
            os.environ.update(env)
            return
        raise NumericsError(
            f"numerics.mode {mode!r} was asked for after {' and '.join(loaded)} loaded in this process, "
            f"which computes with {_describe_in_force()}; numerics are fixed when torch loads: run the step "
            "in a new process (python -m oodgate ..., python -m flows.pipeline ...), or start this one "
            "with the variables of `python -m oodgate numerics`"
        )


def apply_from_params(params: str | Path, overrides: Mapping[str, Any] | None = None) -> None:
    """:func:`apply` with the ``numerics`` section of a params file and its ``--set`` overrides; a
    file or section that cannot be read applies the defaults (loading the config reports why)."""
    import yaml

    section: dict[str, Any] = {}
    try:
        raw = load_yaml(Path(params).read_text(), str(params)) or {}
        if isinstance(raw, dict) and isinstance(raw.get("numerics"), dict):
            section = dict(raw["numerics"])
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError):
        pass
    for key, value in (overrides or {}).items():
        if key.startswith("numerics."):
            section[key.removeprefix("numerics.")] = value
    mode = section.get("mode", "portable")
    threads = section.get("threads", DEFAULT_THREADS)
    if mode not in MODES or not (threads is None or (isinstance(threads, int) and threads > 0)):
        mode, threads = "portable", DEFAULT_THREADS  # invalid: the config's validation says so
    apply(mode, threads)


def apply_from_argv(argv: list[str], default_root: str | Path | None = None) -> None:
    """:func:`apply_from_params` for a program's arguments (``--params``, relative to ``--root``,
    else to ``default_root``, else to the working directory; ``--set KEY=VALUE``), read before the
    program imports torch; anything unreadable applies the defaults and is reported by the program."""
    params, overrides = program_params(argv, default_root, strict=False)
    apply_from_params(params, overrides)


def _describe_in_force() -> str:
    marker = in_force()
    if marker is None:
        return "the machine's own kernels (nothing pinned before torch loaded)"
    return f"numerics.mode {marker[0]!r} with {marker[1]} threads"


# ------------------------------------------------------------------ after torch has loaded
def _mkl_branch() -> int | None:
    """MKL's code branch in force (mkl_serv_cbwr_get), or None where torch has no MKL."""
    import ctypes

    import torch

    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(lib)).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    return int(get(1)) & 0xFFFF  # MKL_CBWR_BRANCH; without the STRICT bit


def _numpy_features() -> list[str]:
    try:
        from numpy._core import _multiarray_umath as umath  # type: ignore[attr-defined]  # not in stubs
    except ImportError:  # numpy < 2
        from numpy.core import _multiarray_umath as umath
    dispatch = getattr(umath, "__cpu_dispatch__", [])
    return [f for f in dispatch if umath.__cpu_features__.get(f)]


def activate(mode: str = "portable", threads: int | None = DEFAULT_THREADS, device: str = "cpu") -> None:
    """Make this process compute under ``mode``: set torch's thread count, the determinism flags,
    and check that what is fixed at load time is what ``mode`` needs (:class:`NumericsError` naming
    the setting otherwise)."""
    import torch

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if mode == "portable" and is_x86():
        problems = _portable_problems()
        if problems:
            raise NumericsError(
                f"numerics.mode 'portable' is not in force in this process ({'; '.join(problems)}); "
                "these are fixed when torch and NumPy load: start the process through oodgate's entry "
                "points, or with the variables `python -m oodgate numerics` prints, or set numerics.mode: native"
            )
    _determinism(portable=mode == "portable", cuda=device.startswith("cuda"))


def _portable_problems() -> list[str]:
    import torch

    if not has_avx2():
        return [
            "this CPU has no AVX2 and FMA, which portable numerics compute with; use numerics.mode: native"
        ]
    problems = []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        problems.append(f"ATen computes with {capability} kernels, not AVX2 (ATEN_CPU_CAPABILITY)")
    branch = _mkl_branch()
    if branch is not None and branch != _MKL_COMPATIBLE:
        problems.append(f"MKL runs its {_MKL_BRANCHES.get(branch, branch)} branch, not COMPATIBLE (MKL_CBWR)")
    if os.environ.get("ONEDNN_MAX_CPU_ISA") != "AVX2":
        problems.append("oneDNN's instruction set is not capped at AVX2 (ONEDNN_MAX_CPU_ISA)")
    if "numpy" in sys.modules:
        above = [f for f in _numpy_features() if f != "X86_V3"]
        if above:
            problems.append(f"NumPy dispatches to {', '.join(above)} (NPY_ENABLE_CPU_FEATURES)")
    return problems


def _determinism(portable: bool, cuda: bool) -> None:
    """Deterministic CPU kernels always; on CUDA, deterministic algorithms in portable mode (cuBLAS
    needs its workspace fixed before CUDA starts: CUBLAS_WORKSPACE_CONFIG, set by :func:`apply`'s
    callers' environment or here when CUDA has not started), cuDNN autotuning in native mode.

    ``torch.use_deterministic_algorithms`` also sets the flag of TorchInductor, whose config costs
    2.5 s to import (each ``dvc repro`` stage is a process): the kernel flag is set directly, the
    inductor flag only where the compiler is loaded."""
    import torch

    if cuda:
        if portable:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        else:
            torch.backends.cudnn.benchmark = True
    if cuda and not portable:
        return
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_flag is None:  # another torch: the public call, whatever it costs
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    set_flag(True, warn_only=True)
    inductor: Any = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True


# ------------------------------------------------------------------ records
def versions() -> dict[str, str]:
    """The software whose kernels compute: torch, MKL, oneDNN, NumPy."""
    import re

    import numpy
    import torch

    shown = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version (\S+)", shown)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", shown)
    return {
        "torch": torch.__version__,
        "mkl": mkl.group(1) if mkl else "none",
        "onednn": onednn.group(1) if onednn else "none",
        "numpy": numpy.__version__,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint_record(mode: str, threads: int | None) -> dict[str, Any]:
    """What results computed under ``mode`` depend on, for the steps' fingerprints: in portable
    mode the mode, the thread count, the pins and the software (the same on every machine); in
    native mode also this CPU (its model and the kernels ATen chose), whose results it is."""
    record: dict[str, Any] = {"mode": mode, "threads": threads, "software": versions()}
    if mode == "portable" and is_x86():
        record["pinned"] = {k: v for k, v in environment(mode, threads).items() if k != MARKER}
    else:
        import torch

        record["cpu"] = {
            "architecture": platform.machine(),
            "model": cpu_model(),
            "aten": torch.backends.cpu.get_cpu_capability(),
        }
        if threads is None:
            record["threads"] = torch.get_num_threads()
    return record


def provenance(mode: str, threads: int | None) -> dict[str, Any]:
    """What this process computes with, as found: the mode, what is in force (ATen's capability,
    MKL's branch, the threads, NumPy's loops), the CPU (model, vendor flags that matter) and the
    software. Machine-specific: written beside a result (never into the files DVC hashes) and as
    MLflow tags."""
    import torch

    flags = sorted(
        f for f in cpu_flags() if f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
    )
    branch = _mkl_branch()
    return {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "in_force": {
            "aten": torch.backends.cpu.get_cpu_capability(),
            "mkl": _MKL_BRANCHES.get(branch, str(branch)) if branch is not None else "none",
            "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "native"),
            "numpy": _numpy_features() if "numpy" in sys.modules else [],
        },
        "cpu": {"architecture": platform.machine(), "model": cpu_model(), "flags": flags},
        "software": versions(),
    }


def banner(mode: str, threads: int | None) -> str:
    """One line for the logs: what computes, and for native mode what that costs."""
    if mode == "native":
        return (
            "numerics: native (this CPU's fastest kernels, "
            f"{'torch default' if threads is None else threads} threads): results repeat on this CPU model "
            "only; numerics.mode: portable gives the same bits on any x86-64 CPU with AVX2"
        )
    where = "any x86-64 CPU with AVX2" if is_x86() else f"this {platform.machine()} CPU"
    return f"numerics: portable ({threads} threads, AVX2 kernels): the same bits on {where}"


def shell_exports(mode: str = "portable", threads: int | None = DEFAULT_THREADS) -> str:
    """``export KEY=VALUE`` lines: start a process by hand (a Dask worker, torchrun on another
    machine) under the same numerics."""
    return "\n".join(f"export {k}={v}" for k, v in environment(mode, threads).items())


PROVENANCE = "provenance.json"  # beside a result: what computed it (machine-specific, not hashed by DVC)


def write_provenance(cfg: Config, out_dir: Path) -> None:
    """``provenance.json`` in ``out_dir``: the numerics in force, the CPU and the software
    (``.dvcignore`` keeps it out of the directory's hash: the result is the same bits anywhere)."""
    write_json(Path(out_dir) / PROVENANCE, provenance(cfg.numerics.mode, cfg.numerics.threads))
