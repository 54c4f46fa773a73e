"""Choosing the next token from logits: greedy, or temperature / top-k / top-p / min-p with a seed,
after repetition, frequency and presence penalties over the stream's recent tokens."""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections import deque

import torch

from ..contract import UserError


GREEDY_BELOW = 1e-5  # smaller temperatures would overflow the scaled logits; they mean greedy
DEFAULT_PENALTY_WINDOW = 1024  # the default cache's size (4 sink tokens + a 1020-token window)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _float32(x) -> float:
    """``x`` as the sampler computes with it (float32): 1e-300 becomes 0, 1e300 becomes inf."""
    return float(torch.tensor(float(x), dtype=torch.float32))


class SamplingError(UserError):
    """One stream's next-token distribution is not a distribution (its logits are not finite, or the
    parameters leave no token): only that stream's request fails."""


@dataclasses.dataclass
class SamplingParams:
    """How tokens are drawn.

    ``temperature == 0`` (or below 1e-5) is greedy; ``top_k == 0``, ``top_p == 1``, ``min_p == 0``
    and the penalties at ``repetition_penalty == 1``, ``frequency_penalty == presence_penalty == 0``
    are off. Order: penalties on the raw logits, then temperature, top-k, top-p on what top-k kept,
    min-p on what top-p kept; greedy takes the argmax of the penalised logits.

    Penalties (token ``j`` seen ``c[j]`` times in the history):

    - ``repetition_penalty`` r (> 0, Hugging Face / vLLM convention): a seen token's logit is
      divided by r where positive and multiplied by r where negative, however often it was seen;
    - ``frequency_penalty`` f and ``presence_penalty`` p (in [-2, 2], OpenAI convention):
      ``logit[j] -= f * c[j] + p * (c[j] > 0)``.

    The history is the stream's most recent ``penalty_window`` tokens that the :class:`Sampler`
    has been shown: the prompt tokens given to :meth:`Sampler.observe` and the tokens it drew
    itself, across turns for as long as the same Sampler is kept. A streaming model's choice: the
    penalties count (about) the tokens the model still attends to, the rolling window, not a
    whole unbounded conversation and not only this turn; callers that know the cache pass its
    ``window`` here. ``min_p`` keeps the tokens whose probability is at least ``min_p`` times the
    most likely token's.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_window: int = DEFAULT_PENALTY_WINDOW

    def __post_init__(self):
        if not (_is_real(self.temperature) and math.isfinite(_float32(self.temperature)) and self.temperature >= 0):
            raise UserError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0 (0 keeps every token), got {self.top_k!r}")
        if not (_is_real(self.top_p) and 0 < _float32(self.top_p) <= 1):  # also refuses NaN
            raise UserError(f"top_p must be a number in (0, 1] (and not round to 0 in float32), got {self.top_p!r}")
        if self.seed is not None and not (_is_int(self.seed) and -(1 << 63) <= self.seed < 1 << 64):
            raise UserError(f"seed must be an integer in [-2**63, 2**64) or None, got {self.seed!r}")
        if not (_is_real(self.min_p) and 0 <= self.min_p <= 1):
            raise UserError(f"min_p must be a number in [0, 1] (0 is off), got {self.min_p!r}")
        if not (_is_real(self.repetition_penalty) and self.repetition_penalty > 0
                and 0 < _float32(self.repetition_penalty) < math.inf):
            raise UserError(f"repetition_penalty must be a number > 0 that float32 holds (1 is off, above 1 "
                            f"discourages repeats), got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (_is_real(value) and -2 <= value <= 2):
                raise UserError(f"{name} must be a number in [-2, 2] (0 is off), got {value!r}")
        if not _is_int(self.penalty_window) or self.penalty_window < 1:
            raise UserError(f"penalty_window must be an integer >= 1 (the recent tokens penalties count), "
                            f"got {self.penalty_window!r}")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0


class Sampler:
    """Draws next tokens for a batch; a seed makes the draws repeatable.

    With a penalty set, the Sampler holds one stream's token history (see :class:`SamplingParams`)
    and takes batch-1 logits: keep one Sampler per stream.
    """

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator = torch.Generator(device=device)
        if params.seed is None:
            self.generator.seed()  # fresh entropy, leaving torch's global generator alone
        else:
            self.generator.manual_seed(params.seed)
        self._history: deque[int] = deque()
        self._counts: dict[int, int] = {}

    @property
    def history(self) -> list[int]:
        """The tokens the penalties count, oldest first (at most ``penalty_window``)."""
        return list(self._history)

    def observe(self, ids) -> None:
        """Record tokens fed to the stream that this Sampler did not draw (a prompt, a turn)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        window, history, counts = self.params.penalty_window, self._history, self._counts
        for t in ids:
            if not _is_int(t) or t < 0:
                raise UserError(f"observe takes token ids (integers >= 0), got {t!r}")
            t = int(t)
            history.append(t)
            counts[t] = counts.get(t, 0) + 1
            if len(history) > window:
                old = history.popleft()
                counts[old] -= 1
                if not counts[old]:
                    del counts[old]

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` -> float32 logits after the penalties over the history."""
        p = self.params
        logits = logits.float()
        if not (p.penalised and self._counts):
            return logits
        if logits.shape[0] != 1:
            raise UserError("a Sampler with penalties holds one stream's history: give it batch-1 logits "
                            "(one Sampler per stream)")
        counts = list(self._counts.items())
        ids = torch.tensor([t for t, _ in counts], device=logits.device)
        if int(ids.max()) >= logits.shape[-1]:
            raise UserError(f"the history holds token {int(ids.max())}, outside the vocabulary of "
                            f"{logits.shape[-1]} logits")
        seen = logits[0, ids]
        if p.repetition_penalty != 1:
            seen = torch.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            c = torch.tensor([n for _, n in counts], dtype=torch.float32, device=logits.device)
            seen = seen - p.frequency_penalty * c - p.presence_penalty
        logits = logits.clone()
        logits[0, ids] = seen
        return logits

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` -> float32 probabilities ``[batch, vocab]`` the next token is
        drawn from (not for greedy parameters): the smallest set of most likely tokens whose
        probability reaches ``top_p`` is kept, so the token that crosses the threshold stays."""
        p = self.params
        logits = self.penalise(logits) / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # drop a token when the tokens ranked above it already reach top_p
            drop = probs.cumsum(-1) - probs >= p.top_p
            logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
        if p.min_p > 0:
            # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p): the same on every renormalisation
            top = logits.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(logits < top + math.log(p.min_p), float("-inf"))
        return torch.softmax(logits, dim=-1)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [batch, vocab]`` float -> token ids ``[batch]`` int64; with batch 1 the drawn
        token joins the history."""
        if self.params.temperature < GREEDY_BELOW:
            scores = self.penalise(logits)
            bad = ~torch.isfinite(scores).any(dim=-1) | torch.isnan(scores).any(dim=-1)
        else:
            scores = self.distribution(logits)
            bad = ~(torch.isfinite(scores).all(dim=-1) & (scores.sum(dim=-1) > 0))
        if bool(bad.any()):
            rows = bad.nonzero().view(-1).tolist()
            raise SamplingError(f"no next-token distribution for row(s) {rows}: the logits are not finite or the "
                                f"sampling parameters leave no token")
        if self.params.temperature < GREEDY_BELOW:
            ids = scores.argmax(dim=-1)
        else:
            ids = torch.multinomial(scores, 1, generator=self.generator).view(-1)
        if ids.shape[0] == 1:
            self.observe([int(ids[0])])
        return ids


def token_logprobs(logits: torch.Tensor, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """``logits [vocab]`` -> (log-probability of ``token``, the ``top`` most likely tokens as
    ``(token_id, logprob)``, most likely first), from the log-softmax of the model's own logits
    (before penalties, temperature and filtering, as OpenAI and vLLM report them)."""
    logp = torch.log_softmax(logits.reshape(-1).double(), dim=-1)
    best = []
    if top > 0:
        values, ids = torch.topk(logp, min(int(top), logp.shape[0]))
        best = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    return float(logp[int(token)]), best
