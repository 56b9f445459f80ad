"""Bad input gives clear errors; shapes, padding, dtypes and soft-capping are handled."""

import numpy as np
import pytest
from independent import exact_product_and_rounding_bound

import bat_core
from bat_core import BatError

rng = np.random.default_rng(0)
W = rng.normal(size=(40, 4)).astype(np.float32)
LOGITS = (W @ rng.normal(size=4) * 2).astype(np.float32)


def test_nan_in_W():
    bad = W.copy()
    bad[3, 1] = np.nan
    with pytest.raises(BatError, match="W holds NaN or inf.*row 3"):
        bat_core.Basis(bad)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_logits(value):
    z = LOGITS.copy()
    z[5] = value
    with pytest.raises(BatError, match="NaN or inf"):
        bat_core.decide(W, z, [1], 0.1)


def test_logits_narrower_than_W():
    with pytest.raises(BatError, match="39 columns but W has 40 rows"):
        bat_core.decide(W, LOGITS[:39], [1], 0.1)


def test_engine_padding_columns_are_ignored_and_never_decided():
    padded = np.concatenate([LOGITS, np.full(8, 50.0, np.float32)])  # padding with huge logits
    basis = bat_core.Basis(W)
    assert (
        bat_core.decide(basis, padded, [1, 2], 0.05).tolist() == bat_core.decide(basis, LOGITS, [1, 2], 0.05).tolist()
    )
    with pytest.raises(BatError, match=r"must lie in \[0, 40\)"):
        bat_core.decide(basis, padded, [42], 0.05)
    sampler = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", 0.05), seed=0)
    assert all(sampler.sample(padded).token < 40 for _ in range(50))
    assert sampler.mask(padded).mask.shape == (40,)


@pytest.mark.parametrize(
    "kind,value", [("eta", -0.1), ("epsilon", 1.0), ("tau", 0.0), ("eta", float("nan")), ("top_p", 0.9)]
)
def test_bad_rules(kind, value):
    with pytest.raises(BatError):
        bat_core.ThresholdRule(kind, value)


def test_empty_and_bad_candidates():
    with pytest.raises(BatError, match="no candidate"):
        bat_core.decide(W, LOGITS, [], 0.1)
    with pytest.raises(BatError, match="integers"):
        bat_core.decide(W, LOGITS, [1.5], 0.1)
    with pytest.raises(BatError, match=r"\[0, 40\)"):
        bat_core.decide(W, LOGITS, [-1], 0.1)


def test_bad_W_shapes_and_types():
    with pytest.raises(BatError, match="2-D"):
        bat_core.Basis(np.zeros(10))
    with pytest.raises(BatError, match="floating"):
        bat_core.Basis(np.zeros((10, 2), dtype=np.int32))
    with pytest.raises(BatError, match="bias has shape"):
        bat_core.Basis(W, bias=np.zeros(39))


def test_any_float_dtype_gives_the_same_answer():
    for dtype in (np.float16, np.float32, np.float64):
        Wd = W.astype(dtype)
        expected = bat_core.decide(Wd.astype(np.float32), LOGITS, list(range(10)), 0.05)
        assert bat_core.decide(Wd, LOGITS, list(range(10)), 0.05).tolist() == expected.tolist()


def test_softcap_logits_beyond_the_cap_are_refused():
    with pytest.raises(BatError, match="soft-cap"):
        bat_core.decide(bat_core.Basis(W, softcap=1.0), LOGITS * 10, [1], 0.1)
    with pytest.raises(BatError, match="softcap"):
        bat_core.Basis(W, softcap=-3.0)


def test_softcap_uses_scaled_rows():
    """A soft-capped model's decisions equal those of the linear problem on rows scaled by
    1 - (z/c)^2, which the reference builds independently."""
    cap = 6.0
    z = (cap * np.tanh((W @ rng.normal(size=4) * 2) / cap)).astype(np.float32)
    basis = bat_core.Basis(W, softcap=cap)
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    tau = 0.05
    for token in np.flatnonzero(p < tau)[:10]:
        ref = bat_core.reference_decide(basis, z, int(token), tau)
        assert bat_core.decide(basis, z, [int(token)], tau)[0] == ref.accepted


def test_one_request_failing_leaves_another_intact():
    basis = bat_core.Basis(W)
    good = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", 0.05), seed=3)
    bad = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", 0.05), seed=3)
    first = good.sample(LOGITS).token
    with pytest.raises(BatError):
        bad.sample(LOGITS[:10])
    reference = bat_core.BatSampler(basis, bat_core.ThresholdRule("tau", 0.05), seed=3)
    assert reference.sample(LOGITS).token == first
    assert good.sample(LOGITS).token == reference.sample(LOGITS).token


def test_torch_input_when_torch_is_installed():
    torch = pytest.importorskip("torch")
    expected = bat_core.decide(W, LOGITS, list(range(10)), 0.05)
    got = bat_core.decide(torch.from_numpy(W), torch.from_numpy(LOGITS), list(range(10)), 0.05)
    assert got.tolist() == expected.tolist()


def test_product_over_the_vocabulary_is_the_same_on_any_number_of_threads(monkeypatch):
    from bat_core import threads

    monkeypatch.delenv("BAT_MATVEC_THREADS", raising=False)
    big = rng.normal(size=(20000, 8)).astype(np.float32)  # enough rows for the product to be split
    basis = bat_core.Basis(big)
    y = rng.normal(size=8).astype(np.float32)
    before = threads.matvec_threads()
    try:
        results = []
        for n in (1, 3):
            bat_core.set_matvec_threads(n)
            assert threads.matvec_threads() == n
            results.append(basis.matvec(y))
    finally:
        bat_core.set_matvec_threads(before)
    # the split changes the rounding, never beyond the bound that certify.py relies on
    exact, bound = exact_product_and_rounding_bound(big, y)
    for result in results:
        assert np.all(np.abs(result - exact) <= bound)


def test_product_on_a_torch_device_keeps_the_rounding_bound():
    """Basis.set_matvec_device moves the product over the vocabulary to torch (the vLLM processor puts it
    on the logits' GPU; CI has none, so torch's CPU device stands in and a GPU is added when present)."""
    torch = pytest.importorskip("torch")
    big = rng.normal(size=(20000, 16)).astype(np.float32)
    y = (rng.normal(size=16) * 100).astype(np.float32)
    exact, bound = exact_product_and_rounding_bound(big, y)
    basis = bat_core.Basis(big)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        basis.set_matvec_device(device)
        assert basis.matvec_device.startswith(device)
        assert np.all(np.abs(basis.matvec(y) - exact) <= bound)
    basis.set_matvec_device(None)
    assert basis.matvec_device == "numpy"


@pytest.mark.parametrize(
    "knob, value, message",
    [
        ("search_levels", (32, 0), "search_levels"),
        ("point_columns", (), "point_columns"),
        ("point_final_columns", -1, "point_final_columns"),
        ("regression_start", 0, "regression_start"),
        ("tol", 1.0, "tol"),
        ("time_budget", -1.0, "time_budget"),
    ],
)
def test_bad_config_knobs_say_which(knob, value, message):
    with pytest.raises(BatError, match=message):
        bat_core.BatConfig(**{knob: value})
