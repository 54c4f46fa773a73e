"""Sampling against a reference sampler written here, on fixed logits (temperature, top-k, top-p)."""
from __future__ import annotations

import math

import pytest
import torch

from streaming_trt.errors import UserError
from streaming_trt.sampling import Sampler, SamplingParams

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
])
def test_bad_parameters_are_refused(kwargs, message):
    with pytest.raises(UserError, match=message):
        SamplingParams(**kwargs)
