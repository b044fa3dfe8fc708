"""The generation worker: the one thread that runs the model (MLX is not thread-safe), fed
by a FIFO queue of jobs, and handing each job's tokens back as events.

Continuous batching: jobs that differ only in their prompts, lengths and stop strings (the
same sampler settings, no seed, no logits processors) decode as rows of one DecodeBatch, one
model call per step for all of them. A job that arrives while a batch runs joins it at the next
step (the prompts joining together are prefilled as one batch, then stacked in); a row leaves
when it finishes or its client goes. Other jobs (a seed, a repetition penalty, a JSON
constraint; every job when the server has a draft model, for speculative decoding) run one at
a time, between batches, through stream_generate. At most max_batch rows decode at once; a job
that cannot join waits for the batch to drain, and no job behind it joins meanwhile.

Prompt caches: a job that starts a batch (or runs alone) reuses the KV cache of the earlier
request sharing the longest prefix with it (the previous turn of the same conversation), from
a small pool kept between requests, least recently used first out. When another row joins, the
batch takes that cache over and the pool forgets it; joining rows start from scratch.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import mlx.core as mx

from ..decode import DecodeBatch, Step
from ..detokenizer import TextStream
from ..generate import PromptCache, stream_generate
from ..sampling import make_sampler
from .protocol import Sampling


@dataclass
class Token:
    text: str
    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None
    """(token id, logprob) of the most likely tokens, most likely first."""


@dataclass
class Finished:
    reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    prompt: List[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[object], None]
    """Called from the worker thread with each Token, then one Finished or Failed."""
    processors: list = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def batchable(self) -> bool:
        return self.sampling.batchable and not self.processors


@dataclass
class _Row:
    """A job decoding as a row of the batch."""
    job: Job
    text: TextStream
    cached_tokens: int = 0
    tokens: list = field(default_factory=list)
    done: bool = False


class Worker:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, prompt_caches: int = 4,
                 draft_model=None, num_draft_tokens: int = 3):
        # Arrays not computed yet belong to the stream of the thread that made them, which the
        # worker's thread cannot run: the weights are read in now, in the loading thread.
        mx.eval(model.parameters(), [] if draft_model is None else draft_model.parameters())
        self.model, self.tokenizer = model, tokenizer
        self.eos = {*tokenizer.eos_token_ids, *model.config.eos_token_ids}
        self.max_batch, self.pool_size = max_batch, prompt_caches
        self.draft_model, self.num_draft_tokens = draft_model, num_draft_tokens
        self.caches: List[PromptCache] = []
        self.jobs: queue.Queue = queue.Queue()
        self.backlog: deque = deque()
        """Jobs taken off the queue that did not fit the running batch, first in first out."""
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        # MLX streams belong to the thread that made them; this thread needs its own.
        mx.set_default_stream(mx.new_stream(mx.default_device()))
        while not (self.stopping and not self.backlog):
            job = self.backlog.popleft() if self.backlog else self.jobs.get()
            if job is None:
                self.stopping = True
            elif not job.cancelled.is_set():
                self._serve(job)

    def _serve(self, job: Job) -> None:
        rows: List[_Row] = []
        try:
            if self._batchable(job):
                self._batch(job, rows)
            else:
                self._alone(job)
        except Exception as error:  # a bug or a refusal: every client concerned is told
            traceback.print_exc()
            message = " ".join(str(error).split()) or type(error).__name__
            for concerned in [row.job for row in rows if not row.done] or [job]:
                concerned.emit(Failed(message))

    def _take_compatible(self, sampling: Sampling, room: int) -> List[Job]:
        """Queued jobs that can join a batch of these settings, at most `room`, in order, up to
        the first that cannot: that one runs next, so no job waits behind later ones."""
        while True:
            try:
                self.backlog.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        taken, left = [], deque()
        for job in self.backlog:
            if job is None:
                self.stopping = True
            elif job.cancelled.is_set():
                continue
            elif not left and len(taken) < room and self._batchable(job) and \
                    job.sampling.batch_key() == sampling.batch_key():
                taken.append(job)
            else:
                left.append(job)
        self.backlog = left
        return taken

    def _batchable(self, job: Job) -> bool:
        # With a draft model, requests run alone, decoded speculatively.
        return job.batchable and self.draft_model is None

    def _batch(self, first: Job, rows: List[_Row]) -> None:
        """Decode `first` and every compatible job that comes while it runs, as one batch."""
        batch = DecodeBatch(self.model, sampler=make_sampler(*first.sampling.batch_key()))
        pooled = self._cache_for(first.prompt)
        cached = pooled.reuse(first.prompt)
        first_row = self._row(first, cached)
        rows.append(first_row)
        step = batch.start(mx.array([first.prompt[cached:]], dtype=mx.int32), pooled.cache)
        self._hand_out(rows[:], step)
        pending = None
        while True:
            self._leave(batch, rows)
            if not rows:  # a job waiting now starts the next batch, with its prompt cache
                break
            joining = self._take_compatible(first.sampling, self.max_batch - len(rows))
            if joining:
                self.caches = [cache for cache in self.caches if cache is not pooled]  # the batch's now
                rows.extend(self._row(job, 0) for job in joining)
                self._hand_out(rows[-len(joining):], batch.join([job.prompt for job in joining]))
                self._leave(batch, rows)
                if not rows:
                    break
            following, covered = batch.step(), rows[:]
            mx.async_eval(following.tokens)
            if pending is not None:
                self._hand_out(*pending)
            pending = (covered, following)
        if any(cache is pooled for cache in self.caches):  # alone all along
            pooled.tokens = (first.prompt + first_row.tokens)[: pooled.cache[0].offset]

    def _row(self, job: Job, cached: int) -> _Row:
        return _Row(job, TextStream(self.tokenizer, self.eos, job.sampling.stop, job.max_tokens),
                    cached)

    def _hand_out(self, rows: List[_Row], step: Step) -> None:
        """Each live row's token of `step`; a row that finishes or whose client left is done."""
        tokens = step.tokens.tolist()
        for index, (row, token) in enumerate(zip(rows, tokens)):
            if row.done:
                continue
            if row.job.cancelled.is_set():
                row.done = True
                continue
            row.tokens.append(token)
            text, finish = row.text.add(token)
            row.job.emit(self._token(row.job, text, token, step.logprobs[index]))
            if finish:
                row.done = True
                row.job.emit(Finished(finish, len(row.job.prompt), row.text.count,
                                      row.cached_tokens))

    @staticmethod
    def _leave(batch: DecodeBatch, rows: List[_Row]) -> None:
        live = [index for index, row in enumerate(rows) if not row.done]
        if len(live) < len(rows):
            batch.keep(live)
            rows[:] = [rows[index] for index in live]

    def _alone(self, job: Job) -> None:
        s = job.sampling
        # Speculative decoding takes no logits processors (repetition penalty, constraints).
        speculate = not job.processors and s.repetition_penalty in (None, 1.0)
        responses = stream_generate(
            self.model, self.tokenizer, job.prompt, job.max_tokens, temperature=s.temperature,
            top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, seed=s.seed, stop=s.stop,
            repetition_penalty=s.repetition_penalty,
            repetition_context_size=s.repetition_context_size, logits_processors=job.processors,
            prompt_cache=self._cache_for(job.prompt),
            draft_model=self.draft_model if speculate else None,
            num_draft_tokens=self.num_draft_tokens)
        for response in responses:
            if job.cancelled.is_set():
                break
            job.emit(self._token(job, response.text, response.token, response.logprobs))
            if response.finish_reason:
                job.emit(Finished(response.finish_reason, len(job.prompt),
                                  response.generation_tokens, response.cached_tokens))
        responses.close()  # the cache keeps what it holds (stream_generate's finally)

    @staticmethod
    def _token(job: Job, text: str, token: int, logprobs: mx.array) -> Token:
        count = job.sampling.logprobs
        if count is None:
            return Token(text, token)
        top = []
        if count:
            ids = mx.argsort(-logprobs)[:count]
            top = list(zip(ids.tolist(), logprobs[ids].tolist()))
        return Token(text, token, logprobs[token].item(), top)

    def _cache_for(self, prompt: List[int]) -> PromptCache:
        """The pooled cache sharing the longest prefix with `prompt` (most recently used
        last); a new one while the pool has room, else the least recently used."""
        best = max(self.caches, key=lambda cache: cache.common_prefix(prompt), default=None)
        if best is None or best.common_prefix(prompt) == 0:
            if len(self.caches) < self.pool_size:
                best = PromptCache.for_model(self.model)
            else:
                best = self.caches[0]
        self.caches = [cache for cache in self.caches if cache is not best] + [best]
        return best
