"""The product over the vocabulary on int8 rows, for models whose output matrix is GGUF Q8_0.

Both default models (SmolLM2's and Gemma 3's GGUF) store W as Q8_0: blocks of 32 int8 values with one
scale each. Dequantized to float32 (what the engine multiplies with, and what `Basis` holds), W is still
exactly ``scale * int8``; `q8_parts` checks that, block by block, in exact arithmetic. The product then
reads a quarter of the bytes (W of Gemma 3, 671 MB in float32, does not fit this machine's cache).

The kernel is a small C file (native/q8_matvec.c) compiled at set-up (`python -m bat_core`, run by
scripts/setup.sh) with the system's C compiler into the user cache, with fixed instruction-set flags
(`VARIANTS`: AVX2 + FMA, or AVX-512F on top), the widest that this CPU reports, and tested in a separate
process before it is kept (a CPU that announces an instruction set it does not run would otherwise kill the
engine's process). An engine process only loads it, and only where the CPU reports the variant's
instruction sets; it never compiles. Not built, no compiler, no AVX2, a failed test or BAT_NATIVE=0:
numpy's float32 product is used, with the same decisions.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from .paths import cache_root

BLOCK = 32  # values per scale in GGUF Q8_0
_CHUNK_ROWS = 8192
_SOURCE = Path(__file__).with_name("native") / "q8_matvec.c"
_FLAGS = ["-O3", "-shared", "-fPIC"]  # no fast-math: the rounding bound needs IEEE arithmetic
# instruction sets of each build, widest first, with the /proc/cpuinfo flags a CPU needs to run it
VARIANTS = {
    "avx512": (["-mavx512f", "-mavx2", "-mfma"], {"avx512f", "avx2", "fma"}),
    "avx2": (["-mavx2", "-mfma"], {"avx2", "fma"}),
}

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_kernel: object = None  # the ctypes function, False when unavailable, None before the first attempt
_reason = "not tried yet"

# Run in a fresh process on a freshly built library: a product of random Q8 rows against float64.
_SELF_TEST = """
import ctypes, sys
import numpy as np
library = ctypes.CDLL(sys.argv[1])
fn = library.bat_q8_matvec
rng = np.random.default_rng(0)
for v, d in ((37, 32), (200, 96), (513, 640)):
    q = rng.integers(-127, 128, size=(v, d), dtype=np.int8)
    s = rng.uniform(1e-3, 1e-1, size=(v, d // 32)).astype(np.float32)
    y = rng.standard_normal(d).astype(np.float32)
    out = np.full(v, np.nan, np.float32)
    fn(q.ctypes.data_as(ctypes.c_void_p), s.ctypes.data_as(ctypes.c_void_p), y.ctypes.data_as(ctypes.c_void_p),
       out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(d), ctypes.c_int64(0), ctypes.c_int64(v))
    W = (q.reshape(v, -1, 32) * s[:, :, None].astype(np.float64)).reshape(v, d)
    exact = W @ y.astype(np.float64)
    bound = (d + 4) * 2.0**-24 * np.abs(W) @ np.abs(y.astype(np.float64)) + 1e-30
    if not np.all(np.abs(out - exact) <= bound):
        sys.exit("the product differs from float64 beyond the rounding bound")
    tokens = np.array([v - 1, 0, 5 % v, v // 2], dtype=np.int64)
    Y = rng.standard_normal((3, d))
    got = np.full((4, 3), np.nan)
    library.bat_q8_rows_product(*(a.ctypes.data_as(ctypes.c_void_p) for a in (q, s, tokens)), ctypes.c_int64(4),
                                Y.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(3),
                                got.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(d))
    if not np.allclose(got, W[tokens] @ Y.T, rtol=1e-12, atol=1e-12):
        sys.exit("the float64 row products differ from numpy's")
    weight, norm = rng.uniform(size=v), rng.uniform(1, 2, size=v)
    sums = np.empty(2)
    library.bat_tail_sums(*(a.ctypes.data_as(ctypes.c_void_p) for a in (out, weight, norm)), None, ctypes.c_int64(v),
                          ctypes.c_double(0.5), ctypes.c_double(1e-6), ctypes.c_double(0.1),
                          sums.ctypes.data_as(ctypes.c_void_p))
    c = out.astype(np.float64) + 0.5
    hi, lo = c + 1e-6 * norm, c - 1e-6 * norm
    if not np.allclose(sums, [weight @ np.maximum(0.1 * hi, -lo), weight @ np.maximum(-0.1 * lo, hi)], rtol=1e-9):
        sys.exit("the value sums differ from numpy's")
"""


def q8_parts(W: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(int8 values [v, d], float32 scales [v, d/32]) with W == scales * values exactly, or None when W
    is not made of Q8_0 blocks (any other quantization, a float checkpoint, a reduced basis)."""
    v, d = W.shape
    if d % BLOCK or W.dtype != np.float32:
        return None
    values = np.empty((v, d), dtype=np.int8)
    scales = np.empty((v, d // BLOCK), dtype=np.float32)
    for start in range(0, v, _CHUNK_ROWS):
        block = W[start : start + _CHUNK_ROWS].reshape(-1, d // BLOCK, BLOCK)
        # Q8_0 stores scale = amax / 127 and rounds x / scale; the largest value has |q| = 127 exactly
        scale = np.abs(block).max(axis=2) / np.float32(127)
        safe = np.where(scale > 0, scale, np.float32(1))
        q = np.rint(block / safe[:, :, None])
        if np.abs(q).max(initial=0) > 127:
            return None
        # exact in float64 (a 24-bit scale times an 8-bit integer): the kernel's s * q is the true W
        if not np.array_equal(scale.astype(np.float64)[:, :, None] * q, block):
            return None
        values[start : start + len(block)] = q.astype(np.int8).reshape(len(block), d)
        scales[start : start + len(block)] = scale
    return values, scales


def _cache_dir() -> Path:
    """Beside the converted model folders (bat_models.hf_folder), under `cache_root()`."""
    return cache_root() / "native"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            return set(next((line for line in handle if line.startswith("flags")), "").split())
    except OSError:
        return set()


def variant() -> str | None:
    """The widest build in `VARIANTS` that this CPU runs, or None (not x86-64, no AVX2)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    flags = _cpu_flags()
    return next((name for name, (_, needs) in VARIANTS.items() if needs <= flags), None)


def library_path(name: str) -> Path:
    """Where the build `name` lives: its file name depends on the source and the flags only."""
    text = "\n".join([_SOURCE.read_text(), " ".join(_FLAGS + VARIANTS[name][0]), platform.machine()])
    return _cache_dir() / f"q8_matvec-{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.so"


def build() -> str:
    """Compile and test the build for this CPU into the user cache, unless it is there (set-up runs this);
    the reason it is not usable, or "built"."""
    name = variant()
    if name is None:
        return f"this CPU ({platform.machine()}) has no AVX2 and FMA"
    target = library_path(name)
    if target.exists():
        return "built"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return "no C compiler (cc or $CC) on PATH"
    return _build(compiler, target, VARIANTS[name][0]) or "built"


def _build(compiler: str, target: Path, flags: list[str]) -> str | None:
    """Compile and test the library into `target`; the reason it failed, or None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        run = subprocess.run(
            [compiler, *_FLAGS, *flags, str(_SOURCE), "-o", str(built)], capture_output=True, text=True
        )
        if run.returncode != 0:
            last = ((run.stderr or run.stdout).strip().splitlines() or ["no message"])[-1]
            return f"{compiler} could not build it: {last}"
        test = subprocess.run(
            [sys.executable, "-c", _SELF_TEST, str(built)], capture_output=True, text=True, timeout=120
        )
        if test.returncode != 0:
            return f"its self-test failed (exit status {test.returncode}): {test.stderr.strip()[-300:]}"
        os.replace(built, target)  # atomic: another process never loads a half-written library
    _prune(target.parent, keep=target)
    return None


def _prune(folder: Path, keep: Path, limit: int = 8) -> None:
    """Remove all but the `limit` most recently built libraries (each change of the source or the flags
    builds a new one). A library a running process has loaded stays mapped."""
    try:
        built = sorted(folder.glob("q8_matvec-*.so"), key=lambda path: path.stat().st_mtime, reverse=True)
    except OSError:  # another process pruned at the same time
        return
    for old in built[limit:]:
        if old != keep:
            old.unlink(missing_ok=True)


def kernel():
    """The compiled products (a ctypes library), or None; loaded on first call (built at set-up)."""
    global _kernel, _reason
    if _kernel is not None:  # settled: no lock on the per-decision path
        return _kernel or None
    with _lock:
        if _kernel is None:
            try:
                library, reason = _load()
            except Exception as exc:  # a cache dir that cannot be written, a timeout: numpy is the answer
                library, reason = False, f"{type(exc).__name__}: {exc}"
            if library is False:
                logger.info("bat_core: the int8 product over the vocabulary is off (%s); numpy's is used", reason)
            # settled last: a thread reading without the lock never sees a half-made answer
            _reason, _kernel = reason, library
        return _kernel or None


def kernel_status() -> str:
    """Why the compiled product is or is not in use (for logs and benchmarks)."""
    kernel()
    return _reason


def _load():
    if os.environ.get("BAT_NATIVE", "1") == "0":
        return False, "BAT_NATIVE=0"
    name = variant()
    if name is None:
        return False, f"this CPU ({platform.machine()}) has no AVX2 and FMA"
    target = library_path(name)
    if not target.exists():
        return False, "not built on this machine: run `python -m bat_core` (scripts/setup.sh does)"
    library = ctypes.CDLL(str(target))
    library.bat_q8_matvec.restype = library.bat_q8_rows_product.restype = None
    library.bat_q8_matvec.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    library.bat_q8_rows_product.argtypes = [ctypes.c_void_p] * 3 + [
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_void_p,
        ctypes.c_int64,
    ]
    library.bat_tail_sums.restype = None
    library.bat_tail_sums.argtypes = (
        [ctypes.c_void_p] * 4 + [ctypes.c_int64] + [ctypes.c_double] * 3 + [ctypes.c_void_p]
    )
    library.bat_token_values.restype = None
    library.bat_token_values.argtypes = (
        [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        + [ctypes.c_void_p] * 5
        + [ctypes.c_double] * 2
        + [ctypes.c_void_p] * 5
    )
    return library, f"in use ({name})"


class Q8Rows:
    """W as int8 values and float32 scales, and its product with float32 vectors by row ranges."""

    def __init__(self, values: np.ndarray, scales: np.ndarray, library) -> None:
        self.values, self.scales, self._library = values, scales, library
        self.hidden_size = values.shape[1]

    @classmethod
    def of(cls, W: np.ndarray) -> Q8Rows | None:
        library = kernel()
        if library is None:
            return None
        parts = q8_parts(W)
        return None if parts is None else cls(*parts, library)

    def product(self, y: np.ndarray, out: np.ndarray, start: int, stop: int) -> None:
        """out[start:stop] = (W y)[start:stop]; y float32 contiguous. Releases the GIL (ctypes)."""
        self._library.bat_q8_matvec(
            self.values.ctypes.data,
            self.scales.ctypes.data,
            y.ctypes.data,
            out.ctypes.data,
            self.hidden_size,
            start,
            stop,
        )

    def rows_product(self, tokens: np.ndarray, Y: np.ndarray) -> np.ndarray:
        """W[tokens] @ Y in float64 ([n, m]) without a float64 copy of the rows (half the time of the copy and a
        BLAS product on the head). Same rounding bound as a float64 BLAS product."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        Yt = np.ascontiguousarray(np.asarray(Y, dtype=np.float64).T)
        out = np.empty((len(tokens), Yt.shape[0]))
        self._library.bat_q8_rows_product(
            self.values.ctypes.data,
            self.scales.ctypes.data,
            tokens.ctypes.data,
            len(tokens),
            Yt.ctypes.data,
            Yt.shape[0],
            out.ctypes.data,
            self.hidden_size,
        )
        return out


def value_sums(
    u: np.ndarray, weight: np.ndarray, norm: np.ndarray, scale: np.ndarray | None, y0: float, g: float, tprime: float
) -> tuple[float, float] | None:
    """The compiled pass of certify.py's `Step.full_value` over the vocabulary (see bat_tail_sums in
    native/q8_matvec.c), or None without the compiled library. u: float32; the rest float64."""
    library = kernel()
    if library is None:
        return None
    # the C loop reads raw memory: contiguous arrays of the right types (no copy when they already are)
    u = np.ascontiguousarray(u, dtype=np.float32)
    weight, norm = (np.ascontiguousarray(a, dtype=np.float64) for a in (weight, norm))
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float64)
    if not len(u) == len(weight) == len(norm) == (len(u) if scale is None else len(scale)):
        raise ValueError("value_sums: u, weight, norm and scale must have one entry per token")
    sums = np.empty(2)
    library.bat_tail_sums(
        u.ctypes.data,
        weight.ctypes.data,
        norm.ctypes.data,
        None if scale is None else scale.ctypes.data,
        len(u),
        y0,
        g,
        tprime,
        sums.ctypes.data,
    )
    return float(sums[0]), float(sums[1])


def token_values(
    u: np.ndarray,
    p: np.ndarray,
    norm: np.ndarray,
    scale: np.ndarray | None,
    y0: np.ndarray,
    g: np.ndarray,
    tprime: float,
    sum_slack: float,
    slot: np.ndarray,
    c_exact: np.ndarray,
    err_exact: np.ndarray,
    denominator: np.ndarray,
) -> np.ndarray | None:
    """The compiled form of certify.py's `Step.all_values` (see bat_token_values in native/q8_matvec.c): [m, v]
    lower bounds of each token's value under m certificates, or None without the compiled library. u: [m, v]
    float32 products; slot: int32 [v], the row of c_exact / err_exact ([len(head), m]) of a head token, else -1."""
    library = kernel()
    if library is None:
        return None
    m, n = u.shape
    u = np.ascontiguousarray(u, dtype=np.float32)
    slot = np.ascontiguousarray(slot, dtype=np.int32)
    p, norm, y0, g, c_exact, err_exact, denominator = (
        np.ascontiguousarray(a, dtype=np.float64) for a in (p, norm, y0, g, c_exact, err_exact, denominator)
    )
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=np.float64)
    if not (len(p) == len(norm) == len(slot) == n and len(y0) == len(g) == len(denominator) == m):
        raise ValueError(
            "token_values: p, norm and slot need one entry per token, y0, g and denominator one per column"
        )
    if c_exact.shape != err_exact.shape or c_exact.ndim != 2 or c_exact.shape[1] != m or slot.max() >= len(c_exact):
        raise ValueError("token_values: c_exact and err_exact need a row for each slot and one column per certificate")
    out = np.empty((m, n))
    library.bat_token_values(
        u.ctypes.data,
        n,
        m,
        p.ctypes.data,
        norm.ctypes.data,
        None if scale is None else scale.ctypes.data,
        y0.ctypes.data,
        g.ctypes.data,
        tprime,
        sum_slack,
        slot.ctypes.data,
        c_exact.ctypes.data,
        err_exact.ctypes.data,
        denominator.ctypes.data,
        out.ctypes.data,
    )
    return out
