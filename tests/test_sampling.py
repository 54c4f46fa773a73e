"""Sampling against a reference sampler written here, on fixed and random logits (temperature, top-k,
top-p, min-p, repetition / frequency / presence penalties over the sampler's token history)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from streaming_trt.contract import UserError
from streaming_trt.runtime.sampling import Sampler, SamplingParams

# Distinct logits, far enough apart that no kept set sits on a rounding boundary.
LOGITS = [2.0, 0.5, -1.0, 1.2, 3.1, -0.3, 0.9, -2.2]


def reference(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """The distribution the next token is drawn from, in float64 Python: scale by the temperature,
    keep the top_k largest, then the smallest prefix (most likely first) whose probability
    reaches top_p, the token that crosses the threshold included; renormalise."""
    z = [x / temperature for x in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    keep = order[:top_k] if top_k else order
    top = max(z[i] for i in keep)
    weight = {i: math.exp(z[i] - top) for i in keep}
    total = sum(weight.values())
    prob = {i: w / total for i, w in weight.items()}
    if top_p < 1:
        nucleus, mass = [], 0.0
        for i in keep:
            nucleus.append(i)
            mass += prob[i]
            if mass >= top_p:
                break
        total = sum(prob[i] for i in nucleus)
        prob = {i: prob[i] / total for i in nucleus}
    return [prob.get(i, 0.0) for i in range(len(z))]


def kept(dist) -> set[int]:
    return {i for i, p in enumerate(dist) if p > 0}


CASES = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.7, 0, 1.0), (2.0, 0, 1.0),
    (1.0, 1, 1.0), (1.0, 3, 1.0), (0.5, 5, 1.0), (1.0, 8, 1.0), (1.0, 100, 1.0),
    (1.0, 0, 0.5), (1.0, 0, 0.6), (1.0, 0, 0.9), (1.0, 0, 0.99), (0.8, 0, 0.75), (3.0, 0, 0.3), (1.0, 0, 1e-6),
    (1.0, 3, 0.8), (1.5, 4, 0.9), (1.0, 2, 0.99),
]


@pytest.mark.parametrize("temperature,top_k,top_p", CASES)
def test_distribution_matches_the_reference(temperature, top_k, top_p):
    expected = reference(LOGITS, temperature, top_k, top_p)
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0))
    got = sampler.distribution(torch.tensor([LOGITS, LOGITS[::-1]]))
    torch.testing.assert_close(got[0], torch.tensor(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], torch.tensor(expected[::-1]), atol=1e-6, rtol=0)  # per row


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # probabilities 0.5, 0.3, 0.2: 0.5 alone does not reach 0.6, so the second token must stay
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    for top_p, expected in [(0.45, {0}), (0.6, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2})]:
        dist = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).distribution(logits)[0]
        assert kept(dist.tolist()) == expected, top_p
        assert kept(reference(logits[0].tolist(), 1.0, 0, top_p)) == expected


def test_top_p_stops_once_the_threshold_is_reached_exactly():
    """Four equal logits: probabilities exactly 0.25, so two tokens reach top_p = 0.5 exactly and
    the third is not needed."""
    for top_p, count in [(0.5, 2), (0.25, 1), (0.75, 3), (0.5000001, 3)]:
        dist = Sampler(SamplingParams(temperature=1.0, top_p=top_p)).distribution(torch.zeros(1, 4))[0]
        assert len(kept(dist.tolist())) == count == len(kept(reference([0.0] * 4, 1.0, 0, top_p))), top_p


def test_top_k_keeps_exactly_k():
    for k in range(1, len(LOGITS) + 1):
        dist = Sampler(SamplingParams(temperature=1.0, top_k=k)).distribution(torch.tensor([LOGITS]))[0]
        best = sorted(range(len(LOGITS)), key=lambda i: -LOGITS[i])[:k]
        assert kept(dist.tolist()) == set(best)


def test_draws_follow_the_distribution():
    """The seeded draws land only on kept tokens, at the reference's frequencies."""
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.85, seed=1)
    expected = torch.tensor(reference(LOGITS, 0.9, 5, 0.85))
    n = 20_000
    draws = Sampler(params)(torch.tensor([LOGITS]).expand(n, -1))
    freq = torch.bincount(draws, minlength=len(LOGITS)).double() / n
    assert set(draws.unique().tolist()) == kept(expected.tolist())
    torch.testing.assert_close(freq, expected.double(), atol=0.015, rtol=0)
    again = Sampler(params)(torch.tensor([LOGITS]).expand(n, -1))
    assert torch.equal(draws, again)  # the seed repeats the draws


def test_greedy_is_argmax():
    logits = torch.tensor([LOGITS, LOGITS[::-1]])
    for t in (0.0, 1e-6, 1e-40):  # 1e-40 would overflow the scaled logits to inf if it were not greedy
        assert Sampler(SamplingParams(temperature=t)).__call__(logits).tolist() == [4, 3]


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be"),
    (dict(temperature=float("inf")), "temperature must be"),
    (dict(temperature=True), "temperature must be"),
    (dict(temperature="1"), "temperature must be"),
    (dict(top_k=-1), "top_k must be"),
    (dict(top_k=2.5), "top_k must be"),
    (dict(top_k=True), "top_k must be"),
    (dict(top_p=0.0), "top_p must be"),
    (dict(top_p=1.01), "top_p must be"),
    (dict(top_p=float("nan")), "top_p must be"),
    (dict(top_p="0.9"), "top_p must be"),
    (dict(seed=1.5), "seed must be"),
    (dict(seed=True), "seed must be"),
    (dict(min_p=-0.1), "min_p must be"),
    (dict(min_p=1.5), "min_p must be"),
    (dict(min_p=float("nan")), "min_p must be"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be"),
    (dict(repetition_penalty=-1.0), "repetition_penalty must be"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be"),
    (dict(repetition_penalty="1.1"), "repetition_penalty must be"),
    (dict(frequency_penalty=2.5), "frequency_penalty must be"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be"),
    (dict(presence_penalty=-2.01), "presence_penalty must be"),
    (dict(presence_penalty=True), "presence_penalty must be"),
    (dict(penalty_window=0), "penalty_window must be"),
    (dict(penalty_window=2.0), "penalty_window must be"),
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs)


# --- penalties and min-p, against a float64 reference on random logits ----------------------------------


def reference_full(logits, history, window=1024, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                   repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0):
    """(distribution, smallest margin to a threshold) in float64 Python. Penalties first, over the
    last ``window`` tokens of ``history``: a seen token's logit is divided by the repetition
    penalty when positive, multiplied when not; then minus frequency x count and presence once.
    Then temperature, top-k, top-p (the token crossing the threshold stays), min-p: keep tokens
    whose probability is at least min_p times the largest. The margin says how close a kept or
    dropped token sits to a cut-off (the comparison is only meaningful when it is not tiny)."""
    recent = history[-window:] if window else []
    count = {}
    for t in recent:
        count[t] = count.get(t, 0) + 1
    z = list(logits)
    for t, c in count.items():
        x = z[t]
        x = x / repetition_penalty if x > 0 else x * repetition_penalty
        z[t] = x - frequency_penalty * c - presence_penalty
    z = [x / temperature for x in z]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    margin = math.inf
    if top_k:
        keep = order[:top_k]
        if top_k < len(z):
            margin = min(margin, abs(z[order[top_k - 1]] - z[order[top_k]]))
    else:
        keep = order
    top = z[keep[0]]
    w = {i: math.exp(z[i] - top) for i in keep}
    total = sum(w.values())
    prob = {i: v / total for i, v in w.items()}
    if top_p < 1:
        nucleus, mass = [], 0.0
        for i in keep:
            nucleus.append(i)
            margin = min(margin, abs(mass + prob[i] - top_p), abs(mass - top_p))
            mass += prob[i]
            if mass >= top_p:
                break
        keep = nucleus
    if min_p > 0:
        best = max(prob[i] for i in keep)
        margin = min([margin] + [abs(prob[i] / best - min_p) for i in keep if prob[i] < best])  # the best stays
        keep = [i for i in keep if prob[i] >= min_p * best]
    total = sum(prob[i] for i in keep)
    dist = [prob[i] / total if i in keep else 0.0 for i in range(len(z))]
    return dist, margin


PENALTY_CASES = [  # SamplingParams fields beyond the logits
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=0.8),
    dict(frequency_penalty=-0.5),
    dict(presence_penalty=1.5),
    dict(presence_penalty=-1.0, frequency_penalty=0.3),
    dict(repetition_penalty=1.2, frequency_penalty=0.5, presence_penalty=0.5),
    dict(min_p=0.05),
    dict(min_p=0.3, temperature=0.7),
    dict(min_p=1.0),
    dict(repetition_penalty=1.5, min_p=0.1, top_k=20),
    dict(frequency_penalty=1.0, top_p=0.8, min_p=0.02, temperature=1.3),
    dict(presence_penalty=2.0, penalty_window=5),
    dict(repetition_penalty=1.4, frequency_penalty=2.0, penalty_window=1),
]


def random_case(seed, vocab=64, history_len=40):
    """Random logits (some positive, some negative) and a history with repeats, from a seed."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(vocab, generator=g, dtype=torch.float64) * 2.5).tolist()
    history = torch.randint(0, vocab // 4, (history_len,), generator=g).tolist()  # a few tokens, often
    return logits, history


@pytest.mark.parametrize("case", PENALTY_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in PENALTY_CASES])
def test_penalties_and_min_p_match_the_reference_on_random_logits(case):
    kw = dict(dict(temperature=1.0), **case)
    checked = 0
    for seed in range(40):
        logits, history = random_case(seed)
        expected, margin = reference_full(logits, history, window=kw.get("penalty_window", 1024),
                                          **{k: v for k, v in kw.items() if k != "penalty_window"})
        if margin < 1e-4:  # float32 rounding could legitimately flip this token in or out
            continue
        sampler = Sampler(SamplingParams(seed=0, **kw))
        sampler.observe(history)
        got = sampler.distribution(torch.tensor([logits], dtype=torch.float32))[0]
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), atol=2e-6, rtol=0)
        assert kept(got.tolist()) == kept(expected), seed
        checked += 1
    assert checked >= 30  # the margin filter left almost every case in


def test_penalties_change_the_distribution():
    """The reference itself: each penalty moves probability away from the seen tokens."""
    logits, history = random_case(1)
    plain, _ = reference_full(logits, history)
    seen = set(history)
    for kw in PENALTY_CASES[:7]:
        if (kw.get("repetition_penalty", 1) < 1 or kw.get("frequency_penalty", 0) < 0
                or kw.get("presence_penalty", 0) < 0):
            continue
        dist, _ = reference_full(logits, history, **kw)
        assert sum(dist[i] for i in seen) < sum(plain[i] for i in seen) - 0.01, kw


def test_greedy_takes_the_argmax_of_the_penalised_logits():
    for seed in range(20):
        logits, history = random_case(seed)
        for kw in (dict(repetition_penalty=1.8), dict(frequency_penalty=1.5), dict(presence_penalty=2.0)):
            dist, _ = reference_full(logits, history, temperature=1.0, **kw)
            expected = max(range(len(dist)), key=dist.__getitem__)
            sampler = Sampler(SamplingParams(temperature=0.0, **kw))
            sampler.observe(history)
            assert int(sampler(torch.tensor([logits]))[0]) == expected, (seed, kw)


def test_history_is_bounded_and_records_draws():
    s = Sampler(SamplingParams(temperature=0.0, penalty_window=4))
    s.observe([5, 6, 7])
    assert int(s(torch.tensor([LOGITS]))[0]) == 4
    assert s.history == [5, 6, 7, 4]
    s.observe(torch.tensor([1, 2]))
    assert s.history == [7, 4, 1, 2]
    # a batch of several streams records nothing: the history is one stream's
    s(torch.tensor([LOGITS, LOGITS]))
    assert s.history == [7, 4, 1, 2]
    with pytest.raises(UserError, match="token ids"):
        s.observe([1, -3])


def test_penalised_sampler_refuses_a_batch():
    s = Sampler(SamplingParams(temperature=1.0, frequency_penalty=0.5))
    s.observe([1])
    with pytest.raises(UserError, match="one Sampler per stream"):
        s(torch.tensor([LOGITS, LOGITS]))


def test_penalised_draws_follow_the_reference_step_by_step():
    """Sequential seeded draws with presence and repetition penalties over a one-token window:
    the next token's distribution depends on the previous token only, so the frequency of each
    (previous, next) pair is compared with the reference's distribution given that history."""
    kw = dict(temperature=1.0, presence_penalty=1.2, repetition_penalty=1.5, penalty_window=1, min_p=0.02)
    logits = LOGITS[:6]
    sampler = Sampler(SamplingParams(seed=7, **kw))
    sampler.observe([0])
    prev, pairs = 0, torch.zeros(6, 6, dtype=torch.float64)
    x = torch.tensor([logits])
    for _ in range(12_000):
        t = int(sampler(x)[0])
        pairs[prev, t] += 1
        prev = t
    window = kw.pop("penalty_window")
    for p in range(6):
        expected, _ = reference_full(logits, [p], window=window, **kw)
        if pairs[p].sum() < 1500:
            continue
        freq = pairs[p] / pairs[p].sum()
        torch.testing.assert_close(freq, torch.tensor(expected, dtype=torch.float64), atol=0.035, rtol=0)
        assert all(pairs[p, i] == 0 for i in range(6) if expected[i] == 0)
    again = Sampler(SamplingParams(seed=7, penalty_window=1, **kw))
    again.observe([0])
    first = Sampler(SamplingParams(seed=7, penalty_window=1, **kw))
    first.observe([0])
    assert [int(first(x)[0]) for _ in range(200)] == [int(again(x)[0]) for _ in range(200)]  # seeded


def test_generate_tokens_counts_the_prompt_and_the_reply():
    """On the built-in model, greedy with a frequency penalty: every token equals the argmax of
    the reference-penalised logits of the runtime, the history being the prompt and the reply."""
    import streaming_trt as st
    from streaming_trt.loading.builtin import builtin_model

    model = builtin_model()
    prompt = [5, 6, 7, 5, 6, 7, 5]
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, repetition_penalty=1.3, penalty_window=8)
    got = list(st.generate_tokens(model.session(2, 32), prompt, 30, params, stop_token_ids=[]))
    check = model.session(2, 32)
    logits = check.feed(prompt, all_logits=False)[0].double().tolist()
    history = list(prompt)
    for token in got:
        dist, _ = reference_full(logits, history, window=8, frequency_penalty=1.0, repetition_penalty=1.3)
        assert token == max(range(len(dist)), key=dist.__getitem__)
        history.append(token)
        logits = check.feed([token], all_logits=False)[0].double().tolist()
    plain = list(st.generate_tokens(model.session(2, 32), prompt, 30, SamplingParams(), stop_token_ids=[]))
    assert plain[-6:] == [60] * 6 and got[-6:] != [60] * 6  # greedy loops here; the penalty breaks the loop


def test_token_logprobs_are_the_log_softmax():
    from streaming_trt.runtime.sampling import token_logprobs

    total = math.log(sum(math.exp(x) for x in LOGITS))
    chosen, top = token_logprobs(torch.tensor(LOGITS), 3, top=3)
    assert chosen == pytest.approx(LOGITS[3] - total, abs=1e-6)
    best = sorted(range(len(LOGITS)), key=lambda i: -LOGITS[i])[:3]
    assert [i for i, _ in top] == best
    for i, lp in top:
        assert lp == pytest.approx(LOGITS[i] - total, abs=1e-6)
    assert token_logprobs(torch.tensor(LOGITS), 0)[1] == []


# --- the command lines' defaults -------------------------------------------------------------------------

from streaming_trt.cli.common import checkpoint_defaults, cli_params  # noqa: E402

NO_FLAGS = dict(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                frequency_penalty=None, presence_penalty=None, penalty_window=None, seed=None)


def test_demo_defaults_without_generation_config(tmp_path):
    a, banner = cli_params(NO_FLAGS, str(tmp_path))
    b, _ = cli_params(NO_FLAGS, None)
    assert (a.temperature, a.top_p, a.top_k, a.min_p, a.repetition_penalty) == (0.7, 0.9, 0, 0.0, 1.0)
    assert f"seed={a.seed}" in banner and "generation_config" not in banner
    assert a.seed != b.seed  # a fresh seed each run (two draws of 2**31 colliding: 5e-10)
    again, banner2 = cli_params(dict(NO_FLAGS, seed=a.seed), None)
    assert again == a and banner2 == banner  # the printed seed repeats the run


def test_generation_config_json_gives_the_defaults_and_flags_win(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.85, "top_k": 20, "repetition_penalty": 1.05,
         "eos_token_id": [1, 2], "min_p": None}))
    p, banner = cli_params(NO_FLAGS, str(tmp_path))
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.min_p) == (0.6, 0.85, 20, 1.05, 0.0)
    assert "from generation_config.json" in banner and "repetition_penalty=1.05" in banner
    p, _ = cli_params(dict(NO_FLAGS, temperature=0.0, top_k=0, seed=3), str(tmp_path))
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (0.0, 0, 0.85, 3)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.9,
                                                                 "repetition_penalty": 1.2}))
    assert checkpoint_defaults(str(tmp_path)) == {"temperature": 0.0, "repetition_penalty": 1.2}
    p, banner = cli_params(NO_FLAGS, str(tmp_path))
    assert banner.startswith("[streaming-trt] sampling: greedy repetition_penalty=1.2") and p.temperature == 0


def test_bad_generation_config_is_a_clear_error(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(UserError, match="generation_config.json: cannot be read as JSON"):
        cli_params(NO_FLAGS, str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    with pytest.raises(UserError, match="temperature must be.*generation_config.json for temperature"):
        cli_params(NO_FLAGS, str(tmp_path))


def test_generate_cli_prints_the_seed_and_the_seed_repeats_the_run(capsys):
    from streaming_trt.cli import generate

    argv = ["--model", "builtin:random", "--max-new-tokens", "12", "--ignore-eos", "--window", "16", "--threads", "1"]
    assert generate.main(argv) == 0
    out, err = capsys.readouterr()
    line = next(l for l in err.splitlines() if "sampling:" in l)
    assert "temperature=0.7 top_p=0.9 seed=" in line
    seed = line.split("seed=")[1].split()[0]
    assert generate.main(argv + ["--seed", seed]) == 0
    assert capsys.readouterr().out == out
    assert generate.main(argv + ["--temperature", "0", "--frequency-penalty", "0.5", "--min-p", "0.1"]) == 0
    assert "sampling: greedy frequency_penalty=0.5 penalties over the last 16 tokens" in capsys.readouterr().err
    assert generate.main(argv + ["--presence-penalty", "3"]) == 2
    assert "presence_penalty must be a number in [-2, 2]" in capsys.readouterr().err


# --- parameters as float32 holds them, and distributions that are not -------------------------------------
@pytest.mark.parametrize("field,value", [("repetition_penalty", 1e-300), ("repetition_penalty", 1e300),
                                         ("top_p", 5e-324), ("temperature", 1e300), ("temperature", float("inf"))])
def test_parameters_that_float32_breaks_are_refused(field, value):
    from streaming_trt.runtime.sampling import SamplingParams

    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("params", [dict(temperature=1.0, seed=0), dict(temperature=0.0)])
def test_a_stream_without_a_distribution_is_refused_by_name(params):
    from streaming_trt.runtime.sampling import Sampler, SamplingError, SamplingParams

    sampler = Sampler(SamplingParams(**params))
    with pytest.raises(SamplingError, match=r"row\(s\) \[0\]"):
        sampler(torch.full((1, 5), float("nan")))
    assert sampler.history == []  # nothing drawn, nothing recorded
    assert int(sampler(torch.tensor([[0.0, 5.0, 1.0]]))[0]) in (0, 1, 2)
