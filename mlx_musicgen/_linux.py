"""Process setup for MLX on Linux: an optimized BLAS, loaded before mlx, and a malloc that keeps freed memory.

MLX's Linux wheels link a reference BLAS whose float32 matmul is ~60x slower than an optimized one. Loading one
into the global symbol namespace before mlx is imported makes mlx's BLAS calls resolve to it. In order of speed:
- MKL (pip package `mkl`, installed with the `cpu` extra on x86-64): a decoding step's products of 2-8 rows by
  each weight stream at the memory bandwidth on its own threads, so the decoder runs as one stream.
- OpenBLAS (Debian's libopenblas0-pthread): it repacks whole weights for such products, so the decoder works
  around it with its own two streams (cpu.py) and OpenBLAS runs one thread.
MKL has optimised code for Intel's CPUs only: on others (AMD's) it takes a generic path, and training's large
products run faster on OpenBLAS, so finetune.py runs itself again with OpenBLAS there (training_environment,
restart_with).
"""

import ctypes
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import NoReturn

MKL = "mkl"
OPENBLAS = "openblas"
OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so")
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")


LOADED: str | None = None  # what load_optimized_blas loaded
THREADS_SET_BY_US: list[str] = []  # the thread settings taken over here (the user made none of them)
ENV_SET_BY_US: list[str] = []  # the variables put in os.environ here (for the BLAS's runtime, as it loads)


def load_optimized_blas() -> str | None:
    """Returns MKL, OPENBLAS, or None (not Linux, turned off, or neither installed).

    MLX_MUSICGEN_BLAS=openblas skips MKL; MLX_MUSICGEN_NO_BLAS_FIX=1 loads nothing. If mlx was imported first,
    its BLAS is fixed for good: this reports a BLAS preloaded into the process (LD_PRELOAD), or warns."""
    if not sys.platform.startswith("linux") or os.environ.get("MLX_MUSICGEN_NO_BLAS_FIX"):
        return None
    global LOADED
    if "mlx.core" in sys.modules:
        LOADED = preloaded_blas()
        if LOADED is None:
            warnings.warn(
                "mlx was imported before mlx_musicgen, so MLX keeps its reference BLAS (matrix products ~60x slower "
                "on Linux): import mlx_musicgen first",
                stacklevel=2,
            )
        return LOADED
    choice = requested_blas()
    if choice is None and os.environ.get("MLX_MUSICGEN_BLAS"):
        warnings.warn(f"MLX_MUSICGEN_BLAS={os.environ['MLX_MUSICGEN_BLAS']!r} is not {MKL} or {OPENBLAS}: ignored",
                      stacklevel=2)
    if choice != OPENBLAS and load_mkl():
        LOADED = MKL
    elif load_first(OPENBLAS_NAMES):
        LOADED = OPENBLAS
        # The decoder's split layers run their own two streams of small products (cpu.decoder); OpenBLAS's worker
        # threads would only spin against them. Set through OpenBLAS, not OPENBLAS_NUM_THREADS, which numpy's own
        # OpenBLAS (and every child process) would read too.
        if not any(name in os.environ for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
            THREADS_SET_BY_US.append("OPENBLAS_NUM_THREADS")
            set_openblas_threads(1)
    return LOADED


def requested_blas() -> str | None:
    """MLX_MUSICGEN_BLAS when it is "mkl" or "openblas" (load_optimized_blas warns of another value), else None."""
    choice = os.environ.get("MLX_MUSICGEN_BLAS")
    return choice if choice in (MKL, OPENBLAS) else None


def preloaded_blas() -> str | None:
    """MKL or OPENBLAS if the process has one of the libraries that load_optimized_blas would load."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    # Debian's libopenblas.so.0 resolves to libopenblasp-r0.*.so; numpy's bundled OpenBLAS has other names.
    for blas, prefixes in ((MKL, ("libmkl_rt.so",)), (OPENBLAS, ("libopenblas.so", "libopenblasp-r0"))):
        if any(name.startswith(prefixes) for name in names):
            return blas
    return None


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def settle_threads() -> list[str]:
    """MKL's thread team gets the usable cores less one, and its idle threads sleep instead of spinning.

    A decoding step keeps two threads busy besides MKL's helpers: MLX's worker, which calls MKL (and leads its
    team), and Python building the next step's graph. With a helper for every core, three threads spun on two
    cores, each product's barrier waited for a descheduled thread: speed varied ~2x from process to process,
    and fell to a fifth with one core taken by another program (docs/performance.md). Settings the user made
    (MKL_NUM_THREADS, OMP_NUM_THREADS, OMP_WAIT_POLICY) win. Returns the names it took over: OMP_WAIT_POLICY is
    set in the environment (the OpenMP runtime reads it when it loads); the team is set through MKL's own call
    once MKL is loaded (load_mkl), not as MKL_NUM_THREADS in the environment, which every child process would
    inherit and take for the user's choice."""
    taken = []
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        ENV_SET_BY_US.append("OMP_WAIT_POLICY")
        taken.append("OMP_WAIT_POLICY")
    if not any(name in os.environ for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS")):
        taken.append("MKL_NUM_THREADS")
    return taken


def first_library(names, mode: int = os.RTLD_LOCAL) -> ctypes.CDLL | None:
    """The first of the libraries `names` that loads (one already loaded is found again), or None."""
    for name in names:
        try:
            return ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
    return None


def load_first(names) -> bool:
    """Load the first of `names` that loads into the global symbol namespace (where mlx's BLAS calls resolve)."""
    return first_library(names, os.RTLD_GLOBAL) is not None


def mkl_function(name: str):
    """MKL's function `name` (through the MKL library this process has, or can load), or None."""
    return getattr(first_library(MKL_NAMES), name, None)


def blas_team() -> int | None:
    """The threads MKL runs each product on (None where no MKL library can be found; ask only where LOADED is
    MKL)."""
    get_max_threads = mkl_function("MKL_Get_Max_Threads")
    return None if get_max_threads is None else get_max_threads()


def blas_team_is_ours() -> bool:
    """Whether MKL is loaded and the size of its team is ours to choose (the user set none)."""
    return LOADED == MKL and "MKL_NUM_THREADS" in THREADS_SET_BY_US


def set_blas_threads(count: int) -> bool:
    """Resize MKL's team, for the products that follow. Returns whether it did."""
    set_num_threads = mkl_function("MKL_Set_Num_Threads")
    if set_num_threads is not None:
        set_num_threads(ctypes.c_int(count))
    return set_num_threads is not None


def set_openblas_threads(count: int) -> bool:
    """Resize the team of the OpenBLAS that MLX calls (not numpy's own). Returns whether it did."""
    set_num_threads = getattr(first_library(OPENBLAS_NAMES), "openblas_set_num_threads", None)
    if set_num_threads is not None:
        set_num_threads(ctypes.c_int(count))
    return set_num_threads is not None


def use_all_cores_for_blas() -> bool:
    """For large products (training: hundreds of rows a product, where building a step's graph is not the
    bottleneck), the BLAS's team gets every usable core, unless the user chose its size. Returns whether it did."""
    if LOADED == OPENBLAS:
        return "OPENBLAS_NUM_THREADS" in THREADS_SET_BY_US and set_openblas_threads(usable_cores())
    return blas_team_is_ours() and set_blas_threads(usable_cores())


def cpu_vendor() -> str | None:
    """The CPU's vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD", ...), or None."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def openblas_trains_faster() -> bool:
    """Whether this process runs MKL on a CPU MKL has no optimised code for (not Intel's: MKL_VERBOSE=1 names its
    path "Intel(R) Architecture processors", with no AVX2), with OpenBLAS installed and no BLAS chosen by the
    user. There OpenBLAS's kernels for the CPU run training's products faster: on an AMD EPYC, 504 x 1024 by
    4096 at 124-150 GFLOPS against MKL's 57-131, and a LoRA step in ~0.85x the time (docs/performance.md)."""
    if LOADED != MKL or requested_blas() or cpu_vendor() in (None, "GenuineIntel"):
        return False
    if "libmkl" in os.environ.get("LD_PRELOAD", ""):  # a preloaded MKL would serve MLX's products all the same
        return False
    return first_library(OPENBLAS_NAMES) is not None  # loadable (locally: MLX keeps the BLAS it has)


def training_environment() -> dict[str, str]:
    """The variables a fine-tune on this CPU runs faster with, which take effect only as a BLAS loads
    (restart_with): MLX_MUSICGEN_BLAS=openblas where MKL runs its generic code (openblas_trains_faster), and,
    unless the user set it, OPENBLAS_THREAD_TIMEOUT=4: OpenBLAS's idle threads (numpy's and MLX's) then sleep at
    once instead of spinning for up to 2^28 cycles after each product, taking a core from numba's kernels between
    the products (a LoRA step ~7% shorter on an AMD EPYC, docs/performance.md), where an OpenBLAS is loaded or
    will be. Empty where none is missing."""
    env = {}
    if openblas_trains_faster():
        env["MLX_MUSICGEN_BLAS"] = OPENBLAS
    if sys.platform.startswith("linux") and "OPENBLAS_THREAD_TIMEOUT" not in os.environ and (
            env or openblas_loaded()):
        env["OPENBLAS_THREAD_TIMEOUT"] = "4"
    return env


def openblas_loaded() -> bool:
    """Whether an OpenBLAS is loaded in this process (numpy's wheel's, or MLX's)."""
    from threadpoolctl import threadpool_info

    return any(info.get("internal_api") == "openblas" for info in threadpool_info())


def restart_with(variables: dict[str, str]) -> NoReturn:
    """Run this command again from its start, in this process (os.execve), with `variables` set (a BLAS can only
    be chosen, or its threads set up, before it loads): the same command line (interpreter options and `-m`
    included) and environment, less the variables set here for MKL."""
    env = {name: value for name, value in os.environ.items() if name not in ENV_SET_BY_US}
    env.update(variables)
    sys.stdout.flush()
    sys.stderr.flush()
    ctypes.CDLL(None).fflush(None)  # and C's buffers (MKL's or MLX's own output)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def load_mkl() -> bool:
    settled = settle_threads()
    THREADS_SET_BY_US[:] = settled
    # The pip wheel puts its libraries in the environment's lib/ folder, which the loader does not search.
    folders = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    candidates = [str(folder / name) for folder in folders for name in MKL_NAMES] + list(MKL_NAMES)
    if load_first(("libgomp.so.1",)):
        # GNU OpenMP: the runtime torch and compilers bring anyway, so a process never holds two of them.
        if "MKL_THREADING_LAYER" not in os.environ:
            os.environ["MKL_THREADING_LAYER"] = "GNU"
            ENV_SET_BY_US.append("MKL_THREADING_LAYER")
    if load_first(candidates):
        if "MKL_NUM_THREADS" in settled:
            set_blas_threads(max(1, usable_cores() - 1))
        return True
    for name in ENV_SET_BY_US:  # no MKL: leave the environment as it was
        del os.environ[name]
    ENV_SET_BY_US.clear()
    THREADS_SET_BY_US.clear()
    return False


def keep_freed_memory() -> None:
    """Have glibc keep freed memory for reuse rather than hand it back to the OS at once.

    MLX's CPU allocator mallocs every buffer and caches only 32 MB of freed ones. glibc serves blocks over
    128 KB with fresh mmaps and trims a freed heap top, so each large intermediate was page-faulted in anew:
    much of EnCodec's decode time (docs/performance.md). Blocks up to 32 MB (glibc's most) now come from the
    heap, and up to 256 MB of free heap stays mapped. Settings the user made through the environment win.
    """
    if platform.libc_ver()[0] != "glibc" or any(
        name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
    ):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    libc = ctypes.CDLL(None)
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
