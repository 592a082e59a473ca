"""Regeneration: turn-by-turn answers, resumable append-only output, both backends.

The HTTP backend runs against a real OpenAI-compatible server, `transformers serve`
(`pip install -e '.[serve]'`), serving a tiny random model from a local folder; those
tests are skipped when its dependencies are missing. Reasoning, template variables and
error answers are checked against `StubServer`, a stdlib OpenAI-compatible endpoint that
answers as SGLang and vLLM do with a reasoning parser on.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from draftforge.config import ConfigError
from draftforge.data import (
    DataError,
    GenerationSettings,
    HFBackend,
    HTTPBackend,
    prepare_dataset,
    regenerate,
)
from draftforge.data.regenerate import Dialogue, Failure, Reply, ResultWriter, render_prompt
from draftforge.data.template import load_template
from draftforge.testing import save_tiny_target, tiny_target, tiny_tokenizer

QWEN3_TOOLS = load_template(Path(__file__).parent / "data_templates" / "qwen3_tools.jinja")

# The tiny target has 4 layers, too few for the default aux layers; regeneration does
# not use them, but loading the target checks them.
TINY_AUX = "target.aux_layers=[0,1,2]"
# Tiny models run faster on one thread than on several cores that other jobs share.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_records(path: Path) -> dict[str, list[dict[str, str]]]:
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r["messages"] for r in records}
    assert len(by_id) == len(records), "an id is written twice"
    return by_id


class EchoBackend:
    """Answers each turn with the question and the answers already in its context, so a
    test sees exactly what context every turn was generated from."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail = fail

    def run(self, dialogues: list[Dialogue]) -> Iterator[tuple[Dialogue, Failure | None]]:
        for dialogue in dialogues:
            if dialogue.id in self.fail:
                yield dialogue, Failure("request_failed", "server said no")
                continue
            while not dialogue.done:
                earlier = [m["content"] for m in dialogue.messages if m["role"] == "assistant"]
                dialogue.answer(Reply(f"re {dialogue.messages[-1]['content']} after {earlier}"))
            yield dialogue, None


MIXED_ROWS = [
    {
        "id": "chat",
        "conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "q1"},
            {"from": "gpt", "value": "old answer 1"},
            {"from": "human", "value": "q2"},
            {"from": "gpt", "value": "old answer 2"},
        ],
    },
    {"question_id": 81, "turns": ["t1", "t2"]},  # MT-Bench: consecutive user turns
    {
        "id": "tool",
        "messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}],
    },
    {"id": "sys", "messages": [{"role": "system", "content": "nothing to answer"}]},
    "a bare prompt",
]


def test_assistant_turns_are_replaced_turn_by_turn(tmp_path):
    out = tmp_path / "out.jsonl"
    result = regenerate(
        write_jsonl(tmp_path / "in.jsonl", MIXED_ROWS), out, EchoBackend(), progress=False
    )
    records = read_records(out)
    assert records["chat"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "re q1 after []"},
        {"role": "user", "content": "q2"},
        # The second answer saw the regenerated first one, not the dataset's.
        {"role": "assistant", "content": "re q2 after ['re q1 after []']"},
    ]
    assert [m["content"] for m in records["81"]] == [
        "t1",
        "re t1 after []",
        "t2",
        "re t2 after ['re t1 after []']",
    ]
    assert len(records) == 3  # chat, 81, the bare prompt
    assert (result.written, result.turns, result.already_done) == (3, 5, 0)
    assert result.answering.skipped == {"tool_turns": 1, "no_user_turn": 1}
    assert result.failed == 0
    summary = result.summary()
    assert "skipped 1 (tool_turns)" in summary and "(id tool)" in summary


def test_rerun_skips_what_is_done_and_retries_failures(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    first = regenerate(src, out, EchoBackend(fail=("p1", "p3")), progress=False)
    assert (first.written, first.failed) == (3, 2)
    assert set(read_records(out)) == {"p0", "p2", "p4"}
    summary = first.summary()
    assert "failed 2 (request_failed)" in summary and "(id p1): server said no" in summary
    assert "run the same command again" in summary

    second = regenerate(src, out, EchoBackend(), progress=False)
    assert (second.already_done, second.written, second.failed) == (3, 2, 0)
    assert set(read_records(out)) == {f"p{i}" for i in range(5)}


def test_strict_stops_at_the_first_failure_keeping_what_was_written(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataError, match=r"in\.jsonl:3 \(id p2\): server said no"):
        regenerate(src, out, EchoBackend(fail=("p2",)), strict=True, progress=False)
    assert set(read_records(out)) == {"p0", "p1"}


def test_torn_last_line_is_cut_and_its_conversation_redone(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": f"q{i}"} for i in range(4)])
    out = tmp_path / "out.jsonl"
    regenerate(src, out, EchoBackend(), progress=False)
    lines = out.read_bytes().splitlines(keepends=True)
    # A kill in the middle of writing the third record: part of it, no newline.
    out.write_bytes(b"".join(lines[:2]) + lines[2][:15])

    with ResultWriter(out) as writer:
        assert writer.ids == {json.loads(line)["id"] for line in lines[:2]}
    assert out.read_bytes() == b"".join(lines[:2])  # the torn part is gone, the rest intact

    out.write_bytes(b"".join(lines[:2]) + lines[2][:15])
    result = regenerate(src, out, EchoBackend(), progress=False)
    assert (result.already_done, result.written) == (2, 2)
    assert set(read_records(out)) == {f"p{i}" for i in range(4)}
    assert out.read_bytes().startswith(b"".join(lines[:2]))


def test_output_that_is_not_ours_is_refused_with_its_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a", "messages": []}\nnot json\n')
    with pytest.raises(DataError, match=r"out\.jsonl:2: not a regenerated record"):
        ResultWriter(out)


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out), pytest.raises(DataError, match="another run is writing"):
        ResultWriter(out)
    ResultWriter(out).close()  # the lock went with the first writer


# ----------------------------------------------------------------------------- HF backend


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, object]:
    return tiny_target("llama"), tiny_tokenizer()


PROMPTS = [{"id": f"p{i}", "prompt": "hello " * (i + 1)} for i in range(5)] + [
    {"id": "mt", "turns": ["first question", "second"]}
]


def test_hf_greedy_is_the_same_batched_or_alone(tmp_path, tiny):
    model, tok = tiny
    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    settings = GenerationSettings(max_new_tokens=8)
    outputs = []
    for batch_size in (1, 4):
        out = tmp_path / f"out{batch_size}.jsonl"
        result = regenerate(
            src, out, HFBackend(model, tok, settings, batch_size=batch_size), progress=False
        )
        assert (result.written, result.turns, result.truncated_turns) == (6, 7, 7)
        outputs.append(read_records(out))
    # Left padding with an attention mask: a row's answer does not depend on its batch.
    assert outputs[0] == outputs[1]
    assert all(m[-1]["role"] == "assistant" and m[-1]["content"] for m in outputs[0].values())


def test_hf_stops_at_eos(tiny):
    model, tok = tiny
    prompt = render_prompt(tok, [{"role": "user", "content": "stop early"}], None)
    free = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    tokens = free[0, len(prompt) :].tolist()
    # Make a token the model emits (first at position k > 0) an end-of-turn token.
    k = next(i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i])
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = tokens[k]
    try:
        backend = HFBackend(model, tok, GenerationSettings(max_new_tokens=12))
        (reply,) = backend.generate([prompt], seed=0)
    finally:
        model.generation_config.eos_token_id = saved
    assert reply == Reply(tok.decode(tokens[:k], skip_special_tokens=True), truncated=False)


def test_hf_sampling_follows_the_seed(tiny):
    model, tok = tiny
    prompts = [render_prompt(tok, [{"role": "user", "content": "sample"}], None)] * 2

    def sample(seed: int) -> list[str]:
        settings = GenerationSettings(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return [r.text for r in HFBackend(model, tok, settings).generate(prompts, seed)]

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_hf_renders_prompts_with_the_template_kwargs(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    prompts = []

    def generate(self: HFBackend, batch: list[list[int]], seed: int) -> list[Reply]:
        prompts.extend(tok.decode(ids) for ids in batch)
        return [Reply("ok") for _ in batch]

    monkeypatch.setattr(HFBackend, "generate", generate)
    backend = HFBackend(
        model,
        tok,
        GenerationSettings(),
        chat_template=QWEN3_TOOLS,
        chat_template_kwargs={"enable_thinking": False},
    )
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "p", "prompt": "hi"}])
    assert regenerate(src, tmp_path / "out.jsonl", backend, progress=False).written == 1
    assert prompts == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ]


def test_prompts_over_the_limit_are_skipped_and_counted(tmp_path, tiny):
    model, tok = tiny
    rows = [{"id": "short", "prompt": "hi"}, {"id": "long", "prompt": "word " * 50}]
    settings = GenerationSettings(max_new_tokens=4, max_prompt_tokens=40)
    out = tmp_path / "out.jsonl"
    result = regenerate(
        write_jsonl(tmp_path / "in.jsonl", rows), out, HFBackend(model, tok, settings)
    )
    assert set(read_records(out)) == {"short"}
    assert result.answering.skipped == {"prompt_too_long": 1}
    assert result.failed == 0  # a skip for good, not a failure to retry
    assert "(id long): prompt of" in result.summary()


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, capsys):
    """SIGKILL a real `draftforge regenerate` process mid-run; rerunning the same command
    (in this process, to save the start-up) completes the output."""
    from draftforge.cli import main

    model_dir = save_tiny_target(tmp_path / "tiny")
    rows = [{"id": f"q{i:02d}", "prompt": f"prompt number {i}"} for i in range(40)]
    src = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    argv = [
        "regenerate",
        str(src),
        "--out",
        str(out),
        "--max-new-tokens",
        "24",
        "--batch-size",
        "2",
        "--no-progress",
        f"target.path={model_dir}",
        TINY_AUX,
    ]
    command = [sys.executable, "-m", "draftforge.cli", *argv]
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=ONE_THREAD)
    deadline = time.monotonic() + 60
    while not out.exists() or out.read_bytes().count(b"\n") < 6:
        assert run.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "no progress within a minute"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    before = out.read_bytes()
    done_before = before.count(b"\n")
    assert 6 <= done_before < 40

    assert main(argv) == 0
    assert f"already in {out}: {done_before}\n" in capsys.readouterr().out
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == [r["id"] for r in rows]  # every id, exactly once
    assert out.read_bytes().startswith(before[: before.rfind(b"\n") + 1])


# ----------------------------------------------------------------------------- HTTP backend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_counted_failure(tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    )
    out = tmp_path / "out.jsonl"
    backend = HTTPBackend(
        f"http://127.0.0.1:{free_port()}/v1",
        "m",
        GenerationSettings(),
        retries=2,
        backoff=0.01,
        timeout=2,
    )
    result = regenerate(src, out, backend, progress=False)
    assert result.failed == 2 and result.written == 0
    assert backend.retried == 4  # two retries for each conversation
    examples = result.answering.examples["request_failed"]
    assert any("(id a)" in e and "after 3 tries" in e for e in examples)
    assert out.read_bytes() == b""
    with pytest.raises(DataError, match=r"\(id [ab]\).*Connection refused"):
        regenerate(src, out, backend, strict=True, progress=False)


def test_http_counts_prompt_tokens_before_sending(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "long", "prompt": "word " * 50}])
    settings = GenerationSettings(max_prompt_tokens=40)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: a request would fail
    with pytest.raises(ConfigError, match="needs the target's tokenizer"):
        HTTPBackend(url, "m", settings)
    backend = HTTPBackend(url, "m", settings, tokenizer=tiny_tokenizer(), retries=0)
    result = regenerate(src, tmp_path / "out.jsonl", backend, progress=False)
    assert result.answering.skipped == {"prompt_too_long": 1}


class StubServer:
    """An OpenAI-compatible `/v1/chat/completions` on a free loopback port (stdlib only).

    Each answer holds `reasoning_content` apart from the content, as SGLang and vLLM write
    it with a reasoning parser on (`reasoning_key` renames it, as newer vLLM does). The
    request bodies are kept in `requests`; `errors` are what to answer the next requests
    with, one each, before answering normally: an HTTP status, or a body to send with 200.
    """

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.errors: list[int | bytes] = []
        self.reasoning_key = "reasoning_content"
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, **body})
                    error = stub.errors.pop(0) if stub.errors else None
                status = error if isinstance(error, int) else 200
                if error is None:
                    question = body["messages"][-1]["content"]
                    message = {
                        "role": "assistant",
                        "content": f"answer to {question}",
                        stub.reasoning_key: f"thinking about {question}",
                    }
                    reply = {
                        "id": "stub",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    }
                else:
                    reply = {"error": {"message": f"stub answer {error!r}"}}
                data = error if isinstance(error, bytes) else json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:  # no request lines on stderr
                pass

        self.lock = threading.Lock()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


@pytest.fixture
def stub() -> Iterator[StubServer]:
    served = StubServer()
    yield served
    served.close()


@pytest.mark.parametrize("reasoning_key", ["reasoning_content", "reasoning"])
def test_http_keeps_reasoning_and_sends_template_kwargs(tmp_path, stub, reasoning_key):
    """End to end: the server's reasoning is written with each answer, read back, rendered
    in the answer's think block and supervised; every request carried the template
    variables, and earlier answers went back without their reasoning."""
    stub.reasoning_key = reasoning_key
    src = write_jsonl(
        tmp_path / "in.jsonl", [{"id": "mt", "turns": ["t1", "t2"]}, {"id": "p", "prompt": "q"}]
    )
    out = tmp_path / "out.jsonl"
    kwargs = {"enable_thinking": True}
    backend = HTTPBackend(stub.url, "m", GenerationSettings(), chat_template_kwargs=kwargs)
    result = regenerate(src, out, backend, progress=False)
    assert (result.written, result.turns, result.failed) == (2, 3, 0)
    records = read_records(out)
    assert records["mt"] == [
        {"role": "user", "content": "t1"},
        {"role": "assistant", "content": "answer to t1", "reasoning_content": "thinking about t1"},
        {"role": "user", "content": "t2"},
        {"role": "assistant", "content": "answer to t2", "reasoning_content": "thinking about t2"},
    ]
    assert len(stub.requests) == 3
    assert {r["path"] for r in stub.requests} == {"/v1/chat/completions"}
    assert all(r["chat_template_kwargs"] == kwargs for r in stub.requests)
    second = next(r for r in stub.requests if len(r["messages"]) == 3)
    assert second["messages"][1] == {"role": "assistant", "content": "answer to t1"}

    tok = tiny_tokenizer()
    ds = prepare_dataset(
        out, tok, chat_template=QWEN3_TOOLS, cache_dir=tmp_path / "cache", progress=False
    )
    rows = {ds[i]["id"]: ds[i] for i in range(len(ds))}
    # Qwen3 keeps the reasoning of the answers after the last user turn only.
    supervised = tok.decode(rows["mt"]["input_ids"][rows["mt"]["loss_mask"]])
    assert supervised == (
        "answer to t1<|im_end|><think>\nthinking about t2\n</think>\n\nanswer to t2<|im_end|>"
    )


def test_http_retries_server_errors_and_fails_bad_answers_at_once(tmp_path, stub):
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "p", "prompt": "q"}])
    stub.errors = [503, 429]
    backend = HTTPBackend(stub.url, "m", GenerationSettings(), backoff=0.01)
    assert regenerate(src, tmp_path / "a.jsonl", backend, progress=False).written == 1
    assert backend.retried == 2 and len(stub.requests) == 3
    assert "chat_template_kwargs" not in stub.requests[0]  # not sent when not set

    stub.errors = [400]
    backend = HTTPBackend(stub.url, "m", GenerationSettings(), backoff=0.01)
    result = regenerate(src, tmp_path / "b.jsonl", backend, progress=False)
    assert result.answering.skipped == {"request_rejected": 1} and backend.retried == 0
    assert "HTTP 400: " in result.answering.examples["request_rejected"][0]

    stub.errors = [b"not json"]
    result = regenerate(src, tmp_path / "c.jsonl", backend, progress=False)
    assert result.answering.skipped == {"bad_response": 1} and backend.retried == 0


def test_http_without_the_openai_client_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'draftforge\[http\]'"):
        HTTPBackend("http://127.0.0.1:1/v1", "m", GenerationSettings())


class Server:
    """`transformers serve` on a free loopback port, serving a model folder on CPU."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.stop()
        cli = Path(sys.executable).with_name("transformers")
        command = [str(cli), "serve", self.model, "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--device", "cpu"]
        env = {**ONE_THREAD, "HF_HUB_OFFLINE": "1"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=env)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def ready(self) -> "Server":
        if self.proc is None:
            self.start()
        deadline = time.monotonic() + 120
        while not self.up():
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "server not up within 2 minutes"
            time.sleep(0.2)
        return self


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    pytest.importorskip("fastapi", reason="needs the serve extra: pip install -e '.[serve]'")
    pytest.importorskip("uvicorn", reason="needs the serve extra: pip install -e '.[serve]'")
    root = tmp_path_factory.mktemp("serve")
    served = Server(save_tiny_target(root / "tiny"), root / "server.log")
    yield served
    served.stop()


@pytest.mark.serve
def test_http_retries_until_the_server_is_up_and_matches_hf(tmp_path, server, tiny):
    """Requests sent while the server is still starting are retried until it answers; the
    greedy answers then equal the in-process HF backend's on the same weights."""
    server.start()  # (re)started now: the first requests find nothing listening
    src = write_jsonl(tmp_path / "in.jsonl", PROMPTS)
    settings = GenerationSettings(max_new_tokens=8)
    backend = HTTPBackend(
        server.url,
        server.model,
        settings,
        concurrency=3,
        retries=60,
        backoff=0.25,
        max_backoff=1.0,
        timeout=30,
    )
    result = regenerate(src, tmp_path / "http.jsonl", backend, progress=False)
    assert (result.written, result.turns, result.failed) == (6, 7, 0), result.summary()
    assert backend.retried > 0

    model, tok = tiny  # the same seed-0 weights that the server loaded from disk
    regenerate(src, tmp_path / "hf.jsonl", HFBackend(model, tok, settings), progress=False)
    assert read_records(tmp_path / "http.jsonl") == read_records(tmp_path / "hf.jsonl")


@pytest.mark.serve
def test_http_timeout_is_retried_then_counted(tmp_path, server):
    """A server that stops answering (paused) makes requests time out; after the retries
    the conversation is a counted failure, and the next run completes it."""
    server.ready()
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": "slow", "prompt": "are you there?"}])
    out = tmp_path / "out.jsonl"
    settings = GenerationSettings(max_new_tokens=4)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        backend = HTTPBackend(
            server.url, server.model, settings, retries=1, timeout=0.5, backoff=0.01
        )
        result = regenerate(src, out, backend, progress=False)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert result.failed == 1 and backend.retried == 1
    assert "timed out" in result.answering.examples["request_failed"][0]

    backend = HTTPBackend(server.url, server.model, settings, timeout=60)
    assert regenerate(src, out, backend, progress=False).written == 1
    assert set(read_records(out)) == {"slow"}


@pytest.mark.serve
def test_cli_regenerates_through_the_server(tmp_path, server, capsys):
    server.ready()
    from draftforge.cli import main

    src = write_jsonl(tmp_path / "in.jsonl", MIXED_ROWS)
    out = tmp_path / "out.jsonl"
    argv = ["regenerate", str(src), "--out", str(out), "--backend", "http", "--url", server.url]
    argv += ["--model", server.model, "--max-new-tokens", "6", "--concurrency", "2"]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "regenerated: 3 conversations, 5 turns" in printed
    assert "skipped 1 (tool_turns)" in printed and "requests retried: 0" in printed
    records = read_records(out)
    assert len(records) == 3 and {"chat", "81"} <= set(records)
    chat = records["chat"]
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user", "assistant"]
    assert "old answer" not in json.dumps(chat)
