"""The compiled int8 product over the vocabulary (bat_core/q8.py) for W made of GGUF Q8_0 blocks."""

import shutil

import numpy as np
import pytest
from independent import accept_value, augmented, exact_product_and_rounding_bound

import bat_core
from bat_core import q8

rng = np.random.default_rng(11)


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as handle:
            return any(line.startswith("flags") and " avx2" in line and " fma" in line for line in handle)
    except OSError:
        return False


# where a C compiler and AVX2 are present (CI: yes), the kernel must build: a silent fallback to numpy
# would hide a broken build
KERNEL_EXPECTED = bool(shutil.which("cc") or shutil.which("gcc")) and cpu_has_avx2()


def q8_0_matrix(v: int, d: int, scale: float = 0.05) -> np.ndarray:
    """A float32 matrix quantized the way GGUF Q8_0 is: per 32 values, d = amax / 127 stored as float16,
    q = round(x / d); dequantized as d * q."""
    x = rng.normal(size=(v, d // 32, 32)) * scale
    step = (np.abs(x).max(axis=2) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(x / step[:, :, None]), -127, 127)
    return (step[:, :, None] * q.astype(np.float32)).reshape(v, d).astype(np.float32)


def test_q8_parts_recover_the_blocks_exactly():
    W = q8_0_matrix(300, 96)
    W[7, 32:64] = 0.0  # an all-zero block
    values, scales = q8.q8_parts(W)
    assert values.dtype == np.int8 and scales.shape == (300, 3)
    rebuilt = (values.reshape(300, 3, 32).astype(np.float64) * scales[:, :, None]).reshape(300, 96)
    assert np.array_equal(rebuilt, W)


def test_q8_parts_refuse_what_is_not_q8_0():
    W = q8_0_matrix(64, 64)
    nudged = W.copy()
    nudged[5, 3] = np.nextafter(nudged[5, 3], np.float32(1))  # one value off the block's grid
    assert q8.q8_parts(nudged) is None
    assert q8.q8_parts(rng.normal(size=(64, 64)).astype(np.float32)) is None  # a float checkpoint
    assert q8.q8_parts(q8_0_matrix(64, 64)[:, :40].copy()) is None  # hidden size not a multiple of 32


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
def test_compiled_product_keeps_the_rounding_bound_on_any_number_of_threads(monkeypatch):
    from bat_core import threads

    assert q8.kernel() is not None, q8.kernel_status()
    monkeypatch.delenv("BAT_MATVEC_THREADS", raising=False)
    W = q8_0_matrix(20000, 64)  # enough rows for the product to be split over threads
    basis = bat_core.Basis(W)
    assert basis.matvec_device == "q8"
    y = (rng.normal(size=64) * 30).astype(np.float32)
    exact, bound = exact_product_and_rounding_bound(W, y)
    before = threads.matvec_threads()
    results = []
    try:
        for n in (1, 3):
            bat_core.set_matvec_threads(n)
            results.append(basis.matvec(y))
    finally:
        bat_core.set_matvec_threads(before)
    assert np.array_equal(results[0], results[1])  # each row is summed the same way, whichever thread runs it
    assert np.all(np.abs(results[0] - exact) <= bound)
    assert np.abs(results[0] - exact).max() > 0  # it really ran in float32
    basis.set_matvec_device("numpy")
    assert basis.matvec_device == "numpy"
    assert np.all(np.abs(basis.matvec(y) - exact) <= bound)
    basis.set_matvec_device(None)
    assert basis.matvec_device == "q8"


def test_a_float_matrix_keeps_numpys_product():
    assert bat_core.Basis(rng.normal(size=(100, 64)).astype(np.float32)).matvec_device == "numpy"


def test_bat_native_0_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(q8, "_kernel", None)
    monkeypatch.setattr(q8, "_reason", q8._reason)
    monkeypatch.setenv("BAT_NATIVE", "0")
    assert bat_core.Basis(q8_0_matrix(64, 64)).matvec_device == "numpy"
    assert q8.kernel_status() == "BAT_NATIVE=0"


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
def test_set_up_built_the_widest_variant_and_engines_only_load_it(monkeypatch, tmp_path):
    """Set-up built the library for the widest instruction set this CPU reports (fixed flags, no
    -march=native); a process whose cache holds no build falls back to numpy and compiles nothing."""
    flags = q8._cpu_flags()
    assert q8.variant() == ("avx512" if "avx512f" in flags else "avx2")
    assert q8.library_path(q8.variant()).exists() and q8.kernel_status() == f"in use ({q8.variant()})"
    monkeypatch.setattr(q8, "_kernel", None)
    monkeypatch.setattr(q8, "_reason", q8._reason)
    monkeypatch.setenv("BAT_CACHE", str(tmp_path))
    assert bat_core.Basis(q8_0_matrix(64, 64)).matvec_device == "numpy"
    assert q8.kernel_status().startswith("not built on this machine")
    assert not any(tmp_path.iterdir())  # nothing compiled


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
def test_a_build_keeps_the_cache_to_the_most_recent_libraries(tmp_path):
    """Each change of the source (or the flags) builds a new library into the user cache: a build
    removes all but the 8 most recent, never the one it made, and the new one loads and runs."""
    import ctypes
    import os

    folder = tmp_path / "native"
    folder.mkdir()
    for n in range(12):  # libraries of earlier versions, oldest first
        old = folder / f"q8_matvec-{n:016x}.so"
        old.write_bytes(b"old")
        os.utime(old, (1_000_000 + n, 1_000_000 + n))
    target = folder / "q8_matvec-new.so"
    assert q8._build(shutil.which("cc") or shutil.which("gcc"), target, q8.VARIANTS[q8.variant()][0]) is None
    left = sorted(path.name for path in folder.glob("q8_matvec-*.so"))
    assert len(left) == 8 and target.name in left
    assert left[:7] == [f"q8_matvec-{n:016x}.so" for n in range(5, 12)]  # the newest of the old ones stay
    assert ctypes.CDLL(str(target)).bat_q8_matvec is not None


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
def test_compiled_row_products_are_float64_exact_within_their_bound():
    """The head's products (certify.py's `exact_products`) on the int8 rows, against an 80-bit reference."""
    W = q8_0_matrix(3000, 96)
    basis = bat_core.Basis(W)
    assert basis.rows_product_native
    tokens = np.array([2999, 0, 17, 17, 1500, 42])  # any order, repeats allowed
    Y = rng.normal(size=(96, 7)) * 10.0 ** rng.uniform(-3, 3, size=7)
    got = basis.rows_product(tokens, Y)
    reference = W[tokens].astype(np.longdouble) @ Y.astype(np.longdouble)
    bound = (
        (96 + 3) * 2.0**-53 * np.linalg.norm(W[tokens].astype(np.float64), axis=1)[:, None] * np.linalg.norm(Y, axis=0)
    )
    assert np.all(np.abs(got - reference.astype(np.float64)) <= bound)
    basis.set_matvec_device("numpy")
    assert not basis.rows_product_native
    assert np.allclose(basis.rows_product(tokens, Y), got, rtol=1e-12, atol=0)


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_value_pass_equals_numpys(monkeypatch, softcap):
    """Step.full_value's pass over the vocabulary, compiled and in numpy, on random certificates."""
    from bat_core.certify import Step

    W = rng.normal(size=(5000, 32)).astype(np.float32)
    basis = bat_core.Basis(W, softcap=softcap)
    z = W @ rng.normal(size=32) * 3
    step = Step.build(basis, np.tanh(z / softcap) * softcap if softcap else z, 0.05)
    from bat_core.search import WeightedLeastSquares

    tokens = np.argsort(-step.p)[[3, 20, 50, 700, 2000]]
    found = WeightedLeastSquares(step).directions(tokens)  # certificate candidates: some prove their token
    certificates = [(found[:, n], int(t)) for n, t in enumerate(tokens)]
    certificates += [(np.random.default_rng(n).normal(size=33), int(t)) for n, t in enumerate(tokens)]
    values = {}
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(q8, "value_sums", lambda *args: None)
        values[compiled] = [step.full_value(y, t) for y, t in certificates]
    assert np.allclose(values[True], values[False], rtol=1e-12, atol=1e-12)
    assert max(values[True]) > 0 > min(values[True]), values[True]


@pytest.mark.skipif(not KERNEL_EXPECTED, reason="needs a C compiler and an AVX2 CPU")
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_compiled_token_values_equal_numpys_and_prove_only_true_accepts(monkeypatch, softcap):
    """Step.all_values (every token's value under a few certificates, what mask mode proves tokens with),
    compiled and in numpy, on 1, 3 and 6 certificates; each token the compiled values prove is checked by
    the independent dense float64 value."""
    from bat_core.certify import Step
    from bat_core.search import WeightedLeastSquares

    W = rng.normal(size=(5000, 32)).astype(np.float32)
    basis = bat_core.Basis(W, softcap=softcap)
    z = W @ rng.normal(size=32) * 3
    step = Step.build(basis, np.tanh(z / softcap) * softcap if softcap else z, 0.05)
    tokens = np.argsort(-step.p)[[3, 20, 50, 700, 2000, 4000]]
    found = WeightedLeastSquares(step).directions(tokens)  # certificate candidates: some prove many tokens
    A = augmented(W, step.scale)
    proven, entries = 0, 0
    for columns in ([0], [1, 2, 5], [0, 1, 2, 3, 4, 5]):
        Y = found[:, columns]
        compiled = step.all_values(Y)
        with monkeypatch.context() as patch:
            patch.setattr(q8, "token_values", lambda *args: None)
            numpy_values = step.all_values(Y)
        assert compiled.shape == (len(columns), 5000)
        assert np.allclose(compiled, numpy_values, rtol=1e-12, atol=1e-12)
        for k, token in zip(*np.nonzero(compiled > 0)):
            assert accept_value(A, step.p, step.tau, int(token), Y[:, k]) >= compiled[k, token] * (1 - 1e-9)
            proven += 1
        entries += compiled.size
    assert 0 < proven < entries, proven  # some tokens proven, not all
