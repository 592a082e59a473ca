"""`draftforge regenerate`: rewrite the assistant turns of a dataset with the target itself.

A draft learns best from the target's own outputs, so the answers in a dataset are
replaced by what the target says. System and user turns are kept in place; the input's
assistant turns are dropped and an answer is generated after every user turn, from the
conversation so far with the *regenerated* earlier answers in it (turn by turn). Prompt
lists (user turns only, e.g. MT-Bench) are answered the same way.

Two backends: `HFBackend` runs batched `generate` in this process; `HTTPBackend` asks any
OpenAI-compatible server (`/v1/chat/completions`: SGLang, vLLM, `transformers serve`)
through the `openai` client (the `http` extra) with a pool of concurrent requests,
timeouts and retries with exponential backoff.

Reasoning models: both backends apply `chat_template_kwargs` (`enable_thinking`, ...). A
server's reasoning (`reasoning_content`, or vLLM's `reasoning`) is written with the answer as
`reasoning_content`; the HF backend leaves Qwen3's `<think>...</think>` in the answer, where
its template finds it. Earlier answers go back into prompts without their reasoning.

The output is JSONL in the `messages` format with each conversation's `id`, written
append-only, one whole record per write, flushed and fsynced. A restart reads the ids
already there (cutting off a record torn by a kill) and answers only the rest, so an
interrupted run ends with every conversation exactly once. Conversations that cannot be
answered are counted with their id and reason; failed requests are not written, so the
next run retries them.
"""

from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import torch

from draftforge.config import ConfigError
from draftforge.data.conversation import Conversation
from draftforge.data.readers import Source, read_conversations
from draftforge.data.report import DataError, DataReport
from draftforge.data.template import template_kwargs
from draftforge.progress import progress_bar

# Reasons a conversation failed this time rather than for good (like `prompt_too_long`):
# it is not written, so a rerun retries it.
FAIL_REASONS = ("request_failed", "request_rejected", "bad_response")


@dataclass
class GenerationSettings:
    """How the target answers; shared by both backends."""

    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    max_prompt_tokens: int | None = None  # longer prompts are skipped (counted); None = no limit

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ConfigError(f"max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def turn_seed(seed: int, conversation_id: str, turn: int) -> int:
    """A sampling seed per (run seed, conversation, turn), so a sampled answer does not
    depend on which other requests run beside it or on where a resumed run restarted."""
    digest = hashlib.sha256(f"{seed}\0{conversation_id}\0{turn}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class Reply:
    """One generated answer."""

    text: str
    truncated: bool = False  # stopped at max_new_tokens rather than at the end of the turn
    reasoning_content: str = ""  # the reasoning a server's reasoning parser took apart


@dataclass
class Failure:
    """Why a conversation got no answer; `reason` is the report's counter key."""

    reason: str
    detail: str


class Dialogue:
    """One conversation being answered turn by turn.

    `messages` always ends with the user turn to answer next, until `done`.
    """

    def __init__(self, conversation: Conversation) -> None:
        self.id = conversation.id
        self.source = conversation.source
        self._rest = [m for m in conversation.messages if m.role != "assistant"]
        self.messages: list[dict[str, Any]] = []
        self.turns = 0
        self.truncated = 0
        self._take_until_user()

    def _take_until_user(self) -> None:
        while self._rest:
            message = self._rest.pop(0)
            self.messages.append(message.as_dict())
            if message.role == "user":
                return

    @property
    def done(self) -> bool:
        return not self.messages or self.messages[-1]["role"] != "user"

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation so far as it is sent: earlier answers without their reasoning."""
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def answer(self, reply: Reply) -> None:
        message = {"role": "assistant", "content": reply.text}
        if reply.reasoning_content:
            message["reasoning_content"] = reply.reasoning_content
        self.messages.append(message)
        self.turns += 1
        self.truncated += reply.truncated
        self._take_until_user()

    def record(self) -> dict[str, Any]:
        return {"id": self.id, "messages": self.messages}


class Backend(Protocol):
    def run(self, dialogues: list[Dialogue]) -> Iterator[tuple[Dialogue, Failure | None]]:
        """Answer every dialogue; yield each once, finished (None) or with why it failed."""
        ...


def render_prompt(
    tokenizer: Any,
    messages: list[dict[str, str]],
    template: str | None,
    kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the chat-templated conversation followed by the assistant header;
    `kwargs` are template variables (`chat_template_kwargs`)."""
    text = tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=False,
        chat_template=template,
        **(kwargs or {}),
    )
    # The rendered text already holds the template's BOS, when it has one.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _too_long(length: int, settings: GenerationSettings) -> Failure | None:
    limit = settings.max_prompt_tokens
    if limit is not None and length > limit:
        return Failure("prompt_too_long", f"prompt of {length} tokens > {limit}")
    return None


class HFBackend:
    """Batched `generate` with a Hugging Face model in this process.

    Up to `batch_size` dialogues are in the batch at once; each call answers the next turn
    of every one, and a finished dialogue's place goes to the next waiting one. Prompts are
    left-padded so that all rows generate from the same position. Sampling seeds the whole
    batch from its first row (`generate` has no per-row generator), so sampled answers
    depend on the batch; greedy answers do not.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: GenerationSettings,
        *,
        batch_size: int = 8,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.batch_size = batch_size
        self.chat_template = chat_template
        self.chat_template_kwargs = template_kwargs(chat_template_kwargs)
        # The turn ends at the tokenizer's EOS or any end token of the model's generation
        # config (chat models often list both <|im_end|> and <|endoftext|>).
        config_eos = model.generation_config.eos_token_id
        eos = config_eos if isinstance(config_eos, list) else [config_eos]
        self.eos_ids = sorted({i for i in [tokenizer.eos_token_id, *eos] if i is not None})
        if not self.eos_ids:
            raise ConfigError("the target has no EOS token: generation could not stop")
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]

    def run(self, dialogues: list[Dialogue]) -> Iterator[tuple[Dialogue, Failure | None]]:
        waiting = iter(dialogues)
        batch: list[Dialogue] = []
        while True:
            batch.extend(itertools.islice(waiting, self.batch_size - len(batch)))
            if not batch:
                return
            prompts = [
                render_prompt(
                    self.tokenizer, d.prompt, self.chat_template, self.chat_template_kwargs
                )
                for d in batch
            ]
            ready: list[tuple[Dialogue, list[int]]] = []
            for dialogue, ids in zip(batch, prompts, strict=True):
                error = _too_long(len(ids), self.settings)
                if error is not None:
                    yield dialogue, error
                else:
                    ready.append((dialogue, ids))
            batch = []
            if not ready:
                continue
            seed = turn_seed(self.settings.seed, ready[0][0].id, ready[0][0].turns)
            replies = self.generate([ids for _, ids in ready], seed)
            for (dialogue, _), reply in zip(ready, replies, strict=True):
                dialogue.answer(reply)
                if dialogue.done:
                    yield dialogue, None
                else:
                    batch.append(dialogue)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[Reply]:
        """Answers to already-templated prompts, in one left-padded `generate` call."""
        width = max(len(ids) for ids in prompts)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
        s = self.settings
        if s.greedy:
            sampling: dict[str, Any] = {"do_sample": False}
        else:
            torch.manual_seed(seed)
            # top_k=0 turns off transformers' default top-k of 50, which servers do not apply.
            sampling = {
                "do_sample": True,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "top_k": 0,
            }
        out = self.model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=s.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
            **sampling,
        )
        eos = torch.tensor(self.eos_ids)
        replies = []
        for row in out[:, width:].cpu():
            ends = torch.isin(row, eos).nonzero()
            stop = int(ends[0]) if len(ends) else len(row)
            text = self.tokenizer.decode(row[:stop], skip_special_tokens=True)
            replies.append(Reply(text=text, truncated=not len(ends)))
        return replies


def _openai() -> Any:
    """The `openai` module, or a one-line error naming the extra that installs it."""
    try:
        import openai
    except ImportError:
        raise ConfigError(
            "the http backend needs the openai client: pip install 'draftforge[http]'"
        ) from None
    return openai


class HTTPBackend:
    """Any OpenAI-compatible server, `concurrency` conversations in flight at once.

    Connection errors, timeouts, HTTP 429 and 5xx are retried `retries` times with
    exponential backoff and jitter (so many clients do not retry in lockstep); other 4xx
    answers (a prompt over the server's context, a wrong model name) fail at once. The
    client's own retries are off: these are the only ones. `chat_template_kwargs` go in the
    request body when set (strict servers refuse fields they do not know).
    `tokenizer` is only needed to enforce `settings.max_prompt_tokens` before sending.
    """

    def __init__(
        self,
        url: str,
        model: str,
        settings: GenerationSettings,
        *,
        concurrency: int = 8,
        timeout: float = 300.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        api_key: str | None = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ConfigError(f"concurrency must be at least 1, got {concurrency}")
        if retries < 0 or timeout <= 0:
            raise ConfigError(f"need retries >= 0 and timeout > 0, got {retries} and {timeout}")
        if settings.max_prompt_tokens is not None and tokenizer is None:
            raise ConfigError("max_prompt_tokens needs the target's tokenizer to count tokens")
        self._openai = _openai()
        # The client takes the API base and adds /chat/completions itself. A server without
        # keys ignores the placeholder key that the client insists on.
        self.client = self._openai.OpenAI(
            base_url=url.rstrip("/").removesuffix("/chat/completions"),
            api_key=api_key or "none",
            timeout=timeout,
            max_retries=0,
        )
        self.model = model
        self.settings = settings
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.chat_template_kwargs = template_kwargs(chat_template_kwargs)
        self.retried = 0  # requests sent again after an error, for the run's summary
        self._lock = threading.Lock()

    def run(self, dialogues: list[Dialogue]) -> Iterator[tuple[Dialogue, Failure | None]]:
        waiting = iter(dialogues)
        # Only `concurrency` dialogues are ever submitted, none queued: a killed run loses
        # at most the answers in flight.
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="regenerate") as pool:
            running: dict[Future[Failure | None], Dialogue] = {}
            while True:
                for dialogue in itertools.islice(waiting, self.concurrency - len(running)):
                    running[pool.submit(self.converse, dialogue)] = dialogue
                if not running:
                    return
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield running.pop(future), future.result()

    def converse(self, dialogue: Dialogue) -> Failure | None:
        """Answer every turn of one dialogue; why it failed, or None when done."""
        while not dialogue.done:
            if self.tokenizer is not None:
                ids = render_prompt(
                    self.tokenizer, dialogue.prompt, self.chat_template, self.chat_template_kwargs
                )
                error = _too_long(len(ids), self.settings)
                if error is not None:
                    return error
            reply = self.complete(
                dialogue.prompt, turn_seed(self.settings.seed, dialogue.id, dialogue.turns)
            )
            if isinstance(reply, Failure):
                return reply
            dialogue.answer(reply)
        return None

    def complete(self, messages: list[dict[str, str]], seed: int) -> Reply | Failure:
        """One chat completion, retried on errors that waiting may cure."""
        s = self.settings
        request: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": s.max_new_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": seed,
        }
        if self.chat_template_kwargs:
            request["extra_body"] = {"chat_template_kwargs": self.chat_template_kwargs}
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.0))
                with self._lock:
                    self.retried += 1
            try:
                completion = self.client.chat.completions.create(**request)
            except ValueError as err:  # a body that is not JSON
                return Failure("bad_response", f"{type(err).__name__}: {err}")
            except self._openai.APIStatusError as err:
                detail = f"HTTP {err.status_code}: {err.response.text[:300]}"
                if err.status_code != 429 and err.status_code < 500:
                    return Failure("request_rejected", detail)
            except self._openai.APIConnectionError as err:
                # Refused or reset connections, timeouts, cut-off bodies: the cause says which.
                cause = f" ({err.__cause__})" if err.__cause__ else ""
                detail = f"{type(err).__name__}: {err}{cause}"
            else:
                return _parse_completion(completion)
        return Failure("request_failed", f"{detail} (after {self.retries + 1} tries)")


def _parse_completion(completion: Any) -> Reply | Failure:
    try:
        choice = completion.choices[0]
        message = choice.message
        content = message.content
        # SGLang and vLLM with a reasoning parser on; newer vLLM names it `reasoning`.
        reasoning = getattr(message, "reasoning_content", None) or getattr(
            message, "reasoning", None
        )
    except (AttributeError, IndexError, TypeError) as err:
        shown = str(completion)[:200]
        return Failure("bad_response", f"{type(err).__name__} {err} in {shown!r}")
    if not isinstance(content, str | None) or not isinstance(reasoning, str | None):
        return Failure("bad_response", f"content or reasoning is not text in {message!r:.200}")
    # `content` is null when the model said nothing at all.
    return Reply(
        text=content or "",
        truncated=choice.finish_reason == "length",
        reasoning_content=reasoning or "",
    )


class ResultWriter:
    """The append-only output file, locked against a second run writing to it.

    Opening it reads the ids already done and cuts off a torn last record: records are
    written whole with the newline last, so a line without its newline is a write that a
    kill interrupted. Its conversation is answered again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a+b")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise DataError(f"{self.path}: another run is writing to this file") from None
        try:
            self.ids = self._scan()
        except DataError:
            self._file.close()
            raise

    def _scan(self) -> set[str]:
        # Line by line: the output of a long run can be larger than memory.
        self._file.seek(0)
        ids: set[str] = set()
        complete = 0  # bytes of whole lines
        for number, line in enumerate(self._file, start=1):
            if not line.endswith(b"\n"):
                break  # the torn last line
            complete += len(line)
            if not line.strip():
                continue
            try:
                ids.add(str(json.loads(line)["id"]))
            except (ValueError, KeyError, TypeError):
                raise DataError(
                    f"{self.path}:{number}: not a regenerated record; "
                    "remove the line or write to another --out"
                ) from None
        if complete < os.fstat(self._file.fileno()).st_size:
            self._file.truncate(complete)
            os.fsync(self._file.fileno())
        return ids

    def write(self, record: dict[str, Any]) -> None:
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())
        self.ids.add(record["id"])

    def close(self) -> None:
        self._file.close()  # also releases the lock

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class RegenerateResult:
    """What a run did: input rows, conversations already done, written, skipped, failed."""

    out: Path
    input: DataReport  # rows read from the input and the malformed ones skipped
    # Conversations to answer (`rows_read`) and those left out, per reason with ids.
    answering: DataReport = field(default_factory=DataReport)
    already_done: int = 0
    written: int = 0
    turns: int = 0
    truncated_turns: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return sum(self.answering.skipped[reason] for reason in FAIL_REASONS)

    def summary(self) -> str:
        lines = [
            f"input: {self.input.rows_read} rows, {self.input.rows_kept} conversations",
            *self.input.lines()[1:],
            f"already in {self.out}: {self.already_done}",
            f"regenerated: {self.written} conversations, {self.turns} turns "
            f"({self.truncated_turns} cut at max_new_tokens) in {self.seconds:.1f} s",
        ]
        for reason, count in sorted(self.answering.skipped.items()):
            verb = "failed" if reason in FAIL_REASONS else "skipped"
            lines.append(f"{verb} {count} ({reason}), e.g.")
            lines.extend(f"    {e}" for e in self.answering.examples.get(reason, []))
        if self.failed:
            lines.append(f"{self.failed} failed: run the same command again to retry them")
        return "\n".join(lines)


def regenerate(
    source: Source | str | Path,
    out: str | Path,
    backend: Backend,
    *,
    split: str = "train",
    fmt: str = "auto",
    strict: bool = False,
    progress: bool = True,
) -> RegenerateResult:
    """Answer every conversation of `source` not yet in `out` with `backend`; append them.

    With `strict`, the first malformed row or unanswerable conversation raises `DataError`
    (what was written so far stays and counts as done on the next run).
    """
    start = time.perf_counter()
    conversations, report = read_conversations(
        source, split=split, fmt=fmt, require_assistant=False, strict=strict
    )
    with ResultWriter(out) as writer:
        result = RegenerateResult(writer.path, report, DataReport(strict=strict))
        todo = []
        for conversation in conversations:
            if conversation.id in writer.ids:
                result.already_done += 1
                continue
            result.answering.rows_read += 1
            where = f"{conversation.source} (id {conversation.id})"
            roles = {m.role for m in conversation.messages}
            if "tool" in roles:
                # A regenerated answer would not make the calls whose results follow it.
                result.answering.skip("tool_turns", where, "tool turns cannot be regenerated")
            elif "user" not in roles:
                result.answering.skip("no_user_turn", where, "nothing to answer")
            else:
                todo.append(Dialogue(conversation))
        with progress_bar(len(todo), desc="regenerate", unit="conv", disable=not progress) as bar:
            for dialogue, failure in backend.run(todo):
                bar.update()
                if failure is not None:
                    where = f"{dialogue.source} (id {dialogue.id})"
                    result.answering.skip(failure.reason, where, failure.detail)
                    continue
                writer.write(dialogue.record())
                result.written += 1
                result.turns += dialogue.turns
                result.truncated_turns += dialogue.truncated
    result.seconds = time.perf_counter() - start
    return result
