"""The `hf` engine: transformers weights, our own batching loop, per-row adapter routing.

Why not `generate` or transformers' continuous batching: docs/architecture.md, "The hf
engine: why it is written by hand" (measured on 2 cores). This engine runs a small loop:

- One engine thread does all torch work (two threads running torch ops cost each other up to
  38%); callers only queue requests and receive tokens through callbacks.
- KV lives in preallocated buffers, per layer (max_batch, kv_heads, max_len, head_dim). Active
  requests occupy rows 0..n-1; a finished row is refilled by moving the last row into it, so
  the decode step attends over plain views `[:n, :, :L]`, never a gather.
- New requests are admitted between decode steps (prefilled in right-padded passes of like
  lengths, then they join the next decode step), so requests for different adapters
  and the base share forward passes.
- Adapters are routed per row by `lora_slots` (stacked A/B, one mask per step). The dtype
  and the engine thread's torch threads come from registry/hardware.py.
- Each row's next token is chosen from the step's logits by serving/engines/token_choice.py:
  greedy rows that shape nothing take theirs from one argmax over the batch; only the rows
  with penalties, bias, sampling or a grammar pay for `sampling.Shaping`, and only the rows
  that ask for log-probabilities for one batched log_softmax. Grammars (serving/engines/
  structured.py) compile in `submit`, so a bad schema fails the caller.

The model runs its own transformers modules over those buffers: serving/engines/row_model.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from registry.families import hf_verdict, read_config
from registry.hardware import ThreadTuner, resolve_dtype
from serving.engines import seam
from serving.engines.heads import Classifications, refuse, run_classifications
from serving.engines.lora_slots import AdapterSlots, read_adapter
from serving.engines.row_model import RowModel, prefill_groups
from serving.engines.seam import GenerationRequest, OnEvent, TokenEvent
from serving.engines.token_choice import Queued, Row, TokenChoice, compact
from serving.errors import EngineStopped, NoFreeSlot, NotServable, Overloaded

logger = logging.getLogger(__name__)


class HFEngine:
    """See the module docstring. Thread-safe public methods; torch work on one thread."""

    def __init__(
        self,
        base_dir: Path | str,
        *,
        dtype: str = "auto",
        max_batch: int = 32,
        max_len: int = 1024,
        adapter_slots: int = 8,
        max_rank: int = 16,
        max_queue: int = 256,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        self.max_batch, self.max_len, self.max_queue = max_batch, max_len, max_queue
        self.max_rank, self.adapter_slots = max_rank, adapter_slots
        self.dtype_name = resolve_dtype(dtype)  # registry/hardware.py
        self.dtype = torch.bfloat16 if self.dtype_name == "bf16" else torch.float32
        self._threads, self._compile = threads, compile
        self.rows: list[Row] = []
        self.max_batch_seen = 0  # largest decode batch so far (tests, metrics)
        self._pending: deque[Queued] = deque()
        self._classes = Classifications(max_queue)  # serving/engines/heads.py
        self._commands: deque[tuple[Any, Future[None]]] = deque()
        self._cancelled: set[str] = set()
        self._resident: dict[str, int] = {}  # key -> adapter slot
        self._users: dict[str, int] = {}  # key -> queued + running requests
        self._unloading: set[str] = set()
        self._cond = threading.Condition()
        self._stopped = False
        # The model is loaded on the engine thread too: the thread that runs torch's first
        # parallel region owns an OpenMP team, and a second team (say, the caller's) makes
        # libgomp throttle its spin-waits, which cost 25-35% of a decode step here.
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(Path(base_dir), ready), name="hf-engine", daemon=True
        )
        self._thread.start()
        ready.result()

    def _load(self, base_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        verdict = hf_verdict(read_config(base_dir))  # before loading weights it cannot run
        if verdict.reason is not None:
            raise NotServable(verdict.reason)

        model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), dtype=self.dtype, use_safetensors=True
        ).eval()  # type: ignore[no-untyped-call]
        config = model.config
        eos = config.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else eos or ())
        self.slots = AdapterSlots(model, self.adapter_slots, self.max_rank)
        self.rows_model = RowModel(model, self.max_batch, self.max_len, self._compile)
        self.vocab_size = self.rows_model.vocab_size  # the logits' width
        self.choice = TokenChoice(base_dir, self.vocab_size, self.eos_ids, self.max_len)

    # ---- public, any thread --------------------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: OnEvent) -> None:
        """Queue a request; BadRequest for parameters this engine cannot run (a bad schema
        included: it compiles here, on the caller's thread)."""
        grammar = self.choice.check(request.params)
        with self._cond:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            if len(self._pending) >= self.max_queue:
                raise Overloaded(f"engine queue is full ({self.max_queue} waiting); retry shortly")
            if request.adapter is not None:
                if request.adapter not in self._resident or request.adapter in self._unloading:
                    raise NotServable(f"adapter {request.adapter} is not loaded in this engine")
                self._users[request.adapter] = self._users.get(request.adapter, 0) + 1
            self._pending.append(Queued(request, on_event, grammar))
            self._cond.notify()

    def classify(self, request: seam.ClassifyRequest, on_done: seam.OnClassified) -> None:
        with self._cond:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            self._classes.add(request, on_done, self._unloading)  # NotServable, Overloaded
            self._users[request.adapter] = self._users.get(request.adapter, 0) + 1
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def load_adapter(self, key: str, directory: Path) -> None:
        weights = read_adapter(directory)  # file reading off the engine thread (no math)
        with self._cond:
            if key in self._resident:
                self._unloading.discard(key)
                return
            taken = set(self._resident.values())
            free = [s for s in range(self.adapter_slots) if s not in taken]
            if not free:
                raise NoFreeSlot(f"all {self.adapter_slots} adapter slots are taken")
            slot = free[0]
            self._resident[key] = slot  # reserved now; usable once written
        try:
            self._call(lambda: self.slots.load(slot, weights))
        except BaseException:
            with self._cond:
                self._resident.pop(key, None)
            raise
        with self._cond:
            self._classes.loaded(key, weights.head)

    def unload_adapter(self, key: str) -> None:
        with self._cond:
            if key not in self._resident:
                return
            self._unloading.add(key)
            self._cond.notify()

    def resident(self) -> list[str]:
        with self._cond:
            return sorted(k for k in self._resident if k not in self._unloading)

    def shutdown(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    def _call(self, fn: Any) -> None:
        """Run `fn` on the engine thread and wait for it."""
        future: Future[None] = Future()
        with self._cond:
            if self._stopped:
                raise EngineStopped("the engine is shut down")
            self._commands.append((fn, future))
            self._cond.notify()
        future.result()

    # ---- engine thread -------------------------------------------------------------------

    def _run(self, base_dir: Path, ready: Future[None]) -> None:
        torch.set_grad_enabled(False)
        try:
            # Set here: torch's thread count belongs to the thread that runs the math.
            self.threads = ThreadTuner(self._threads)
            self._load(base_dir)
        except BaseException as err:  # handed to the constructor
            ready.set_exception(err)
            return
        ready.set_result(None)
        while True:
            with self._cond:
                while not (
                    self._stopped
                    or self._commands
                    or self._pending
                    or self._classes.queue
                    or self.rows
                    or self._cancelled
                    or self._unloadable()
                ):
                    self._cond.wait()
                if self._stopped:
                    break
                commands = list(self._commands)
                self._commands.clear()
                cancelled, self._cancelled = self._cancelled, set()
                classify = self._classes.take(self.max_batch - len(self.rows), self._resident)
                admitted: list[Queued] = []
                while self._pending and len(self.rows) + len(admitted) < self.max_batch:
                    admitted.append(self._pending.popleft())
                pending_cancel = [p for p in self._pending if p.request.request_id in cancelled]
                for item in pending_cancel:
                    self._pending.remove(item)
            for fn, future in commands:
                try:
                    fn()
                    future.set_result(None)
                except BaseException as err:  # handed to the caller waiting on it
                    future.set_exception(err)
            for queued in pending_cancel:
                self._finish_request(queued.request, queued.on_event, TokenEvent(None, "cancelled"))
            if classify:
                first = len(self.rows)
                run_classifications(classify, self.rows_model, self.slots, first, self._let_go)
            fresh = []
            for queued in admitted:
                if queued.request.request_id in cancelled:
                    self._finish_request(
                        queued.request, queued.on_event, TokenEvent(None, "cancelled")
                    )
                else:
                    fresh.append(queued)
            if fresh:
                self._guarded(lambda batch=fresh: self._prefill(batch))
            for row in self.rows:
                if row.request.request_id in cancelled:
                    self._end(row, TokenEvent(None, "cancelled"))
            self._compact()
            if self.rows:
                self._guarded(self._decode_step)
            self._release_unloaded()
        self._cancel_everything()

    def _guarded(self, step: Any) -> None:
        """A failing forward pass ends the requests in it, not the engine."""
        try:
            step()
        except (RuntimeError, ValueError, IndexError) as err:
            logger.exception("engine step failed")
            for row in self.rows:
                self._end(row, TokenEvent(None, "error", error=f"engine error: {err}"))
            self._compact()

    def _let_go(self, key: str) -> None:  # a classification of `key` was answered
        with self._cond:
            self._users[key] -= 1
        self._release_unloaded()

    def _unloadable(self) -> bool:
        return any(self._users.get(k, 0) == 0 for k in self._unloading)

    def _release_unloaded(self) -> None:
        with self._cond:
            done = [k for k in self._unloading if self._users.get(k, 0) == 0]
            slots = [self._resident.pop(k) for k in done]
            self._classes.forget(done)
            self._unloading -= set(done)
        for slot in slots:
            self.slots.clear(slot)

    def _admit(self, queued: Queued) -> Row | None:
        """A row for a queued request, or None when it ended at once (its prompt's size)."""
        request = queued.request
        prompt = request.prompt_ids
        if not prompt or len(prompt) >= self.max_len:
            error = f"prompt has {len(prompt)} tokens; this engine takes 1 to {self.max_len - 1}"
            event = TokenEvent(None, "error", error=error)
            self._finish_request(request, queued.on_event, event)
            return None
        slot = self._resident.get(request.adapter) if request.adapter else None
        return self.choice.prepare(queued, slot)

    def _prefill(self, admitted: list[Queued]) -> None:
        """Prefill new prompts, like lengths together (right-padded, a pass per group of
        row_model.prefill_groups), into rows after the running ones, for the next decode
        step. A request with max_new_tokens 0 ends here with its prompt log-probabilities."""
        rows = [row for row in map(self._admit, admitted) if row is not None]
        for group in prefill_groups([row.length for row in rows]):
            self._prefill_pass([rows[i] for i in group])

    def _prefill_pass(self, rows: list[Row]) -> None:
        first = len(self.rows)
        self.rows.extend(rows)
        lengths = torch.tensor([r.length for r in rows])
        prompts = [torch.tensor(r.request.prompt_ids, dtype=torch.long) for r in rows]
        ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)  # right-padded, 0
        width = ids.shape[1]
        self.slots.set_rows([r.slot for r in rows], self.dtype)
        positions = torch.arange(width).expand(len(rows), width)
        scored = [i for i, r in enumerate(rows) if r.request.params.prompt_logprobs is not None]
        full_rows = torch.tensor(scored) if scored else None
        logits, full = self.rows_model.forward(ids, positions, (first, lengths), full_rows)
        if full is not None:
            self.choice.score_prompts([rows[i] for i in scored], full)
        for row in rows:
            if row.request.params.max_new_tokens == 0:
                self._end(row, TokenEvent(None, "length"))
        live = [i for i, r in enumerate(rows) if not r.done]
        if len(live) < len(rows):
            rows, logits = [rows[i] for i in live], logits[live]
        self._advance(rows, logits)

    def _decode_step(self) -> None:
        rows, start = self.rows, time.perf_counter()
        self.max_batch_seen = max(self.max_batch_seen, len(rows))
        ids = torch.tensor([[r.last_token] for r in rows])
        positions = torch.tensor([[r.length] for r in rows])
        slots = [r.slot for r in rows]
        if self._compile and len(rows) == 1 < self.max_batch:  # row 1 is free: a batch of
            # two reuses the compiled step, where one would compile its own (size 1 is special)
            ids, positions, slots = ids.repeat(2, 1), positions.repeat(2, 1), slots * 2
        self.slots.set_rows(slots, self.dtype)
        logits, _ = self.rows_model.forward(ids, positions, None)
        logits = logits[: len(rows)]
        for row in rows:
            row.length += 1
        self._advance(rows, logits)
        self.threads.observe(time.perf_counter() - start, len(rows))
        self._compact()

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Choose and emit each row's next token from its raw logits (rows, vocab)."""
        tokens, logprobs, endings = self.choice.pick(rows, logits)
        for i, event in endings.items():  # rows whose every token was masked
            self._end(rows[i], event)
        for row, token, logprob in zip(rows, tokens, logprobs, strict=True):
            if row.done:
                continue
            deliver, ending = self.choice.take(row, token)
            if deliver:
                self._deliver(row, TokenEvent(token, logprob=logprob))
            if ending is not None:
                self._end(row, ending)

    def _deliver(self, row: Row, event: TokenEvent) -> None:
        try:
            row.on_event(row.with_prompt_logprobs(event))
        except Exception:  # a broken consumer must not stop the engine; its request ends
            logger.exception("token callback of %s failed", row.request.request_id)
            self._end(row, TokenEvent(None, "error", error="token consumer failed"))

    def _end(self, row: Row, event: TokenEvent) -> None:
        if row.done:
            return
        row.done = True
        self._finish_request(row.request, row.on_event, row.with_prompt_logprobs(event))

    def _finish_request(
        self, request: GenerationRequest, on_event: OnEvent, event: TokenEvent
    ) -> None:
        with self._cond:
            if request.adapter is not None:
                self._users[request.adapter] -= 1
        # Free a slot waiting to be unloaded before the caller hears the request ended.
        self._release_unloaded()
        try:
            on_event(event)
        except Exception:
            logger.exception("token callback of %s failed", request.request_id)

    def _compact(self) -> None:
        compact(self.rows, self.rows_model.cache.move)

    def _cancel_everything(self) -> None:
        for row in self.rows:
            self._end(row, TokenEvent(None, "cancelled"))
        self.rows.clear()
        with self._cond:
            pending = list(self._pending)
            self._pending.clear()
            commands = list(self._commands)
            self._commands.clear()
        for queued in pending:
            self._finish_request(queued.request, queued.on_event, TokenEvent(None, "cancelled"))
        with self._cond:
            classify = self._classes.take(len(self._classes.queue), self._resident)
        refuse(classify, "the engine is shut down")
        for _, future in commands:
            future.set_exception(EngineStopped("the engine is shut down"))
