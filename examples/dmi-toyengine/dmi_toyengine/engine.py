"""The toy engine: continuous batching over a flat token batch, greedy sampling, per-request KV cache.

Each `step()` admits waiting requests while slots are free, then runs ONE forward over a flat
batch holding every new request's whole prompt (prefill) and one token for every running
request (decode), like vLLM's scheduler without chunking or paging. A request leaves the batch
after its `max_new_tokens`-th token, freeing its slot and its cache for the next waiting one.

Observers (a profiler, dmi's adapter) register in `step_listeners`: `begin(batch)` runs just
before the forward and `end(batch)` just after it (also when it raises), so they learn who is in
the batch without patching anything.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from .model import KVCache, SeqSlice, ToyConfig, ToyModel

Phase = Literal["prefill", "decode"]


@dataclass(frozen=True)
class Segment:
    """One request's rows [start, stop) of a step's flat batch, at positions first_position, ..."""

    request_id: str
    start: int
    stop: int
    first_position: int
    phase: Phase

    @property
    def num_tokens(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class StepBatch:
    """What one step's forward computes: the flat batch, in row order."""

    step: int
    segments: tuple[Segment, ...]
    tokens: torch.Tensor          # int64 [num_tokens]
    positions: torch.Tensor       # int64 [num_tokens]

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def request_ids(self) -> list[str]:
        """The request id of every row."""
        return [s.request_id for s in self.segments for _ in range(s.num_tokens)]

    def phases(self) -> list[Phase]:
        return [s.phase for s in self.segments for _ in range(s.num_tokens)]


class StepListener(Protocol):
    def begin(self, batch: StepBatch) -> None: ...

    def end(self, batch: StepBatch) -> None: ...


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    cache: KVCache = field(default_factory=KVCache)

    @property
    def prefilled(self) -> bool:
        return bool(self.generated)

    @property
    def done(self) -> bool:
        return len(self.generated) >= self.max_new_tokens


class Engine:
    def __init__(self, max_batch: int = 4, seed: int = 0, config: ToyConfig | None = None, **overrides):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.config = config or ToyConfig(**overrides)
        self.max_batch = max_batch
        self.seed = seed
        self.model = ToyModel(self.config)
        self.model.init_weights(seed)
        self.model.requires_grad_(False).eval()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.step_listeners: list[StepListener] = []
        self.steps_done = 0

    # -- requests -----------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: list[int], max_new_tokens: int) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if any(r.request_id == request_id for r in (*self.waiting, *self.running)):
            raise ValueError(f"request {request_id!r} is already queued or running")
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: token ids {bad[:5]} outside the vocabulary "
                             f"0..{self.config.vocab_size - 1}")
        if max_new_tokens < 1:
            raise ValueError(f"request {request_id!r}: max_new_tokens must be at least 1, got {max_new_tokens}")
        self.waiting.append(Request(request_id, list(prompt), max_new_tokens))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- stepping -----------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one forward over the current batch; returns the requests that finished in it."""
        while self.waiting and len(self.running) < self.max_batch:
            self.running.append(self.waiting.popleft())
        if not self.running:
            return []
        batch, seqs = self._schedule()
        listeners = list(self.step_listeners)  # one that leaves mid-step still gets its end()
        try:
            for listener in listeners:
                listener.begin(batch)
            with torch.no_grad():
                logits = self.model(batch.tokens, batch.positions, seqs)
        finally:
            # Every listener hears end(), even when the forward or another listener's begin()
            # raised, so none is left mid-step.
            for listener in listeners:
                listener.end(batch)
        self.steps_done += 1
        return self._sample(batch, logits)

    def _schedule(self) -> tuple[StepBatch, list[SeqSlice]]:
        segments, seqs, tokens, positions = [], [], [], []
        for req in self.running:
            if req.prefilled:
                # The token sampled last step is fed now, at the position after everything cached.
                new, phase = [req.generated[-1]], "decode"
            else:
                new, phase = req.prompt, "prefill"
            start, first = len(tokens), req.cache.length()
            tokens += new
            positions += range(first, first + len(new))
            segments.append(Segment(req.request_id, start, len(tokens), first, phase))
            seqs.append(SeqSlice(start, len(tokens), req.cache))
        batch = StepBatch(self.steps_done, tuple(segments), torch.tensor(tokens, dtype=torch.int64),
                          torch.tensor(positions, dtype=torch.int64))
        return batch, seqs

    def _sample(self, batch: StepBatch, logits: torch.Tensor) -> list[Request]:
        """Greedy: each request's next token is the argmax at its last row of the step."""
        last = torch.tensor([s.stop - 1 for s in batch.segments])
        for req, tok in zip(self.running, logits[last].argmax(-1).tolist()):
            req.generated.append(int(tok))
        finished = [r for r in self.running if r.done]
        self.running = [r for r in self.running if not r.done]
        for r in finished:
            r.cache = KVCache()  # free the slot's memory now; the request keeps its tokens
        return finished

    def run(self, prompts: dict[str, list[int]], max_new_tokens: int) -> dict[str, list[int]]:
        """Add every prompt and step until all are done: {request id: generated tokens}."""
        for rid, prompt in prompts.items():
            self.add_request(rid, prompt, max_new_tokens)
        out: dict[str, list[int]] = {}
        while self.has_unfinished():
            for req in self.step():
                out[req.request_id] = req.generated
        return {rid: out[rid] for rid in prompts}


__all__ = ["Engine", "Request", "Segment", "StepBatch", "StepListener", "ToyConfig", "Phase"]
