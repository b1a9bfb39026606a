"""`tunesmith serve` as its users run it: a real server process on 127.0.0.1, driven by the official `openai`
client (and plain HTTP for what a client library would not send), over a tiny sft run, the tiny base model
(which never stops on its own, so its generations are long) and a tiny classifier run; an embedding run on its
own server. Also `tunesmith runs`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from tunesmith.cli import main  # noqa: E402
from tiny import classify_config, embed_config, make_model_dir, sft_config  # noqa: E402

KEY = "test-key-123"


class Server:
    def __init__(self, proc, url: str, log):
        self.proc, self.url, self.log = proc, url, log

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def http(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
             content_type: str = "application/json") -> tuple[int, dict]:
        """A raw request; (status, JSON body)."""
        request = urllib.request.Request(self.url.removesuffix("/v1") + path, data=body, method=method)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        if body is not None:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def log_text(self) -> str:
        self.log.flush()
        return open(self.log.name, encoding="utf-8").read()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory, tiny_llama, tiny_bert, instruction_dir, sentiment_dir):
    """A runs/ folder with a tiny sft run (`sft`) and a tiny classifier run (`clf`)."""
    tmp = tmp_path_factory.mktemp("serve")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["train", str(sft_config(tmp / "sft.yaml", tiny_llama, instruction_dir))]) == 0
        assert main(["train", str(classify_config(tmp / "clf.yaml", tiny_bert, sentiment_dir)), "name=clf",
                     "train.max_steps=12"]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "runs"


@pytest.fixture(scope="module")
def server(runs_dir, tiny_llama, tmp_path_factory):
    """The server over the runs `sft` and `clf` and two random Llamas that never end their turn, so they always
    write max_tokens tokens: `tiny-llama` (word-level tokenizer) and `tiny-bpe` (a byte-level BPE tokenizer like
    SmolLM2's, whose decoded text starts with a space)."""
    bpe = make_model_dir(tmp_path_factory.mktemp("models") / "tiny-bpe", "llama-bpe")
    yield from _serve([str(runs_dir / "sft"), str(tiny_llama), str(runs_dir / "clf"), str(bpe), "--queue", "1",
                       "--max-body", "100000", "--max-tokens", "200"], 4, tmp_path_factory)


def _serve(args: list[str], models: int, tmp_path_factory):
    """`tunesmith serve ARGS` on a free port with the test key, until the test module is done."""
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "tunesmith", "serve", *args, "--port", "0", "--api-key", KEY],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 120
    found = None
    while found is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        found = re.search(rf"serving {models} models? at (http://127\.0\.0\.1:\d+/v1)", open(log.name).read())
    assert found, f"the server did not start:\n{open(log.name).read()}"
    yield Server(proc, found.group(1), log)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def embed_run(tmp_path_factory, tiny_bert, embed_dir):
    """A tiny embed run (`emb`), with the forgetting probe off and a few steps."""
    tmp = tmp_path_factory.mktemp("serve-embed")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["train", str(embed_config(tmp / "e.yaml", tiny_bert, embed_dir)), "name=emb",
                     "train.max_steps=6"]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "runs" / "emb"


def test_embed_run_serves_embeddings_pooled_as_trained(embed_run, tmp_path_factory):
    """/v1/embeddings through the openai client (which asks for base64 by default) and as floats: the vectors
    are the run's own pooled embeddings; other endpoints and `dimensions` are refused."""
    import torch

    from tunesmith.objectives.embed import encode
    from tunesmith.trained import load_trained

    texts = ["the movie was good fun", "a dull plot", "fine"]
    trained = load_trained(embed_run)
    want = torch.tensor(encode(trained.model, trained.tokenizer, texts, trained.obj_cfg, trained.data_cfg))
    for server in _serve([str(embed_run)], 1, tmp_path_factory):
        assert server.client().models.retrieve("emb").model_extra["kind"] == "embedder"
        reply = server.client().embeddings.create(model="emb", input=texts)
        got = torch.tensor([d.embedding for d in reply.data])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert [d.index for d in reply.data] == [0, 1, 2] and reply.usage.prompt_tokens > 0
        floats = server.client().embeddings.create(model="emb", input="fine", encoding_format="float")
        torch.testing.assert_close(torch.tensor(floats.data[0].embedding), want[2], rtol=0, atol=1e-5)
        status, out = server.http("POST", "/v1/embeddings",
                                  json.dumps({"model": "emb", "input": "x", "dimensions": 8}).encode())
        assert status == 400 and "dimensions" in out["error"]["message"]
        status, out = server.http("POST", "/v1/classifications", json.dumps({"model": "emb", "input": "x"}).encode())
        assert status == 400 and out["error"]["code"] == "wrong_endpoint"


def test_models_list_names_every_served_model(server):
    models = {m.id: m for m in server.client().models.list()}
    assert set(models) == {"sft", "tiny-llama", "clf", "tiny-bpe"}
    assert models["sft"].model_extra["kind"] == "chat" and models["clf"].model_extra["kind"] == "classifier"
    assert server.client().models.retrieve("clf").model_extra["objective"] == "classify"


def test_chat_completion_answers_as_the_run_measured(server, runs_dir):
    """Greedy answers through the run's chat template are the answers the run itself reported for its test prompts."""
    rows = [r for r in json.loads((runs_dir / "sft" / "compare.json").read_text())["rows"]
            if len(r["messages"]) == 1][:3]
    for row in rows:
        reply = server.client().chat.completions.create(model="sft", messages=row["messages"], temperature=0,
                                                        max_tokens=8)
        choice = reply.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == row["tuned"]
        assert choice.finish_reason == "stop"  # the tuned model ends its turn with <|im_end|>
        assert reply.usage.prompt_tokens > 3 and 1 <= reply.usage.completion_tokens <= 8
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.object == "chat.completion" and reply.model == "sft" and reply.id.startswith("chatcmpl-")


def _streamed(client, **kwargs) -> tuple[list[str], list]:
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    return pieces, chunks


def test_streamed_chunks_join_to_the_non_streamed_greedy_answer(server):
    client = server.client()
    asked = {"model": "tiny-llama", "messages": [{"role": "user", "content": "the movie was"}], "temperature": 0,
             "max_tokens": 40}
    whole = client.chat.completions.create(**asked)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 40
    pieces, chunks = _streamed(client, stream_options={"include_usage": True}, **asked)
    assert len(pieces) > 3 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40
    # the sft run's short answer, streamed, is its non-streamed answer too
    asked = {"model": "sft", "messages": [{"role": "user", "content": "a fun film"}], "temperature": 0}
    assert "".join(_streamed(client, **asked)[0]) == client.chat.completions.create(**asked).choices[0].message.content


def test_a_streamed_sampled_answer_is_the_same_text_with_a_bpe_tokenizer(server):
    """Sampling with a seed repeats the answer, so stream and whole answer can be compared on a tokenizer whose
    pieces start with spaces: the stream drops the answer's leading space as the whole answer does."""
    client = server.client()
    for seed in range(8):  # a random model's answers: some start with a space (seed 4 here), some end with one
        asked = {"model": "tiny-bpe", "messages": [{"role": "user", "content": "the movie was"}], "temperature": 1.0,
                 "seed": seed, "max_tokens": 30}
        whole = client.chat.completions.create(**asked).choices[0].message.content
        pieces, _ = _streamed(client, **asked)
        assert whole and whole == whole.strip() and "".join(pieces) == whole, seed


def test_stop_strings_cut_the_answer_streamed_or_not(server):
    client = server.client()
    asked = {"model": "tiny-llama", "messages": [{"role": "user", "content": "a dull story"}], "temperature": 0,
             "max_tokens": 30}
    full = client.chat.completions.create(**asked).choices[0].message.content
    words = full.split()
    stop = next(w for w in words[3:] if len(w) > 2)
    cut = client.chat.completions.create(stop=[stop, "zzz-never"], **asked)
    assert cut.choices[0].message.content == full[:full.index(stop)].rstrip()
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens < 30
    assert "".join(_streamed(client, stop=stop, **asked)[0]) == cut.choices[0].message.content


def test_text_completion_continues_the_prompt(server):
    out = server.client().completions.create(model="tiny-llama", prompt="the movie was", max_tokens=6, temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.choices[0].text.strip()
    pieces = [c.choices[0].text for c in server.client().completions.create(
        model="tiny-llama", prompt="the movie was", max_tokens=6, temperature=0, stream=True)]
    assert "".join(pieces) == out.choices[0].text


def test_a_seed_repeats_a_sampled_answer(server):
    asked = {"model": "tiny-llama", "messages": [{"role": "user", "content": "the plot"}], "temperature": 1.5,
             "top_p": 0.9, "max_tokens": 12}
    first, again = (server.client().chat.completions.create(seed=7, **asked).choices[0].message.content
                    for _ in range(2))
    greedy = server.client().chat.completions.create(**{**asked, "temperature": 0}).choices[0].message.content
    assert first == again and first != greedy


def test_classifier_serves_labels_and_probabilities(server):
    texts = ["a great fun film", "an awful dull movie"]
    status, out = server.http("POST", "/v1/classifications", json.dumps({"model": "clf", "input": texts}).encode())
    assert status == 200 and [d["index"] for d in out["data"]] == [0, 1]
    for row in out["data"]:
        assert set(row["probabilities"]) == {"pos", "neg"} and row["label"] in ("pos", "neg")
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-3
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    # a model answers only its own endpoints
    with pytest.raises(openai.BadRequestError) as e:
        server.client().chat.completions.create(model="clf", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "wrong_endpoint"
    status, out = server.http("POST", "/v1/classifications", json.dumps({"model": "sft", "input": "x"}).encode())
    assert status == 400 and out["error"]["param"] == "model"


def test_requests_without_the_key_get_401(server):
    with pytest.raises(openai.AuthenticationError) as e:
        server.client(key="wrong").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    status, out = server.http("GET", "/v1/models", key=None)
    assert status == 401 and set(out["error"]) == {"message", "type", "param", "code"}
    assert server.http("GET", "/health", key=None)[0] == 200


def _error_shape(out: dict) -> dict:
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in out["error"]["message"]
    return out["error"]


def test_bad_requests_get_4xx_in_openai_error_shape(server):
    client = server.client()
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=hello)
    assert e.value.body["code"] == "model_not_found" and "sft" in e.value.body["message"]
    for bad, param in [({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 201}, "max_tokens"),
                       ({"temperature": -0.5}, "temperature"), ({"n": 2}, "n")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="sft", messages=hello, **bad)
        assert e.value.status_code == 400 and e.value.body["param"] == param, bad
    status, out = server.http("POST", "/v1/chat/completions", b'{"model": "sft", "messages": [')
    assert status == 400 and "not valid JSON" in _error_shape(out)["message"]
    status, out = server.http("POST", "/v1/chat/completions", json.dumps(
        {"model": "sft", "messages": [{"role": "user", "content": "word " * 30000}]}).encode())
    assert status == 413 and _error_shape(out)["code"] == "request_too_large"
    status, out = server.http("POST", "/v1/chat/completions", json.dumps({"model": "sft", "messages": []}).encode())
    assert status == 400 and _error_shape(out)["param"] == "messages"
    status, out = server.http("GET", "/v1/nothing-here")
    assert status == 404 and _error_shape(out)["code"] == "not_found"
    assert "Traceback" not in server.log_text()


def test_a_full_queue_answers_429_and_the_server_recovers(server):
    """One worker, a queue of one: of six long generations fired at once, at most two are admitted."""
    def ask(_):
        try:
            server.client().completions.create(model="tiny-llama", prompt="the film", max_tokens=200, temperature=0)
            return 200
        except openai.RateLimitError as e:
            assert e.body["type"] == "rate_limit_error" and e.body["code"] == "queue_full"
            return 429

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(ask, range(6)))
    assert statuses.count(429) >= 3 and statuses.count(200) >= 1, statuses
    reply = server.client().chat.completions.create(model="sft", messages=[{"role": "user", "content": "fun"}],
                                                    temperature=0)
    assert reply.choices[0].finish_reason == "stop"


def test_a_stream_does_not_block_other_requests(server):
    stream = server.client().chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "the story"}], max_tokens=200, temperature=0,
        stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)  # the stream is under way
    started = time.perf_counter()
    assert {m.id for m in server.client().models.list()} == {"sft", "tiny-llama", "clf", "tiny-bpe"}
    assert server.http("POST", "/v1/classifications", json.dumps({"model": "clf", "input": "fun"}).encode())[0] in (
        200, 429)  # the worker may be busy with the stream: queued or refused, never stuck behind it
    assert time.perf_counter() - started < 30
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"


def test_the_server_stops_cleanly_on_sigterm(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0
    log = server.log_text()
    assert "server stopped" in log and "Traceback" not in log


def test_a_bad_command_line_fails_before_the_server_starts(runs_dir, tmp_path, capsys):
    import socket

    assert main(["serve", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "neither a run folder" in capsys.readouterr().err
    assert main(["serve", str(runs_dir / "sft"), str(runs_dir / "sft"), "--port", "0"]) == 2
    assert "two models are named 'sft'" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        assert main(["serve", str(runs_dir / "clf"), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "--port" in err


# ---- in-process pieces ------------------------------------------------------------------------------------------


def test_cut_releases_a_stream_that_adds_up_to_the_whole_answer():
    from tunesmith.serve.generating import Cut

    text = "  the movie was STOP good and fun  "
    for stops, strip in [(["STOP"], True), (["ST", "xyz"], False), ([], True), (["fun"], True)]:
        whole = Cut(stops, strip).whole(text)
        stream = Cut(stops, strip)
        pieces = [stream.feed(ch) for ch in text] + [stream.finish()]
        assert "".join(pieces) == whole, (stops, strip)
    assert Cut(["STOP"], True).whole(text) == "the movie was"
    assert Cut(["ST"], False).whole(text) == "  the movie was "
    assert Cut([], True).whole(text) == text.strip()


def test_workers_refuse_beyond_the_queue_and_cancel_on_timeout():
    from tunesmith.serve.workers import Busy, Workers

    async def scenario():
        workers = Workers(workers=1, queue=1)
        first, second = threading.Event(), threading.Event()
        task = asyncio.ensure_future(workers.run(lambda: first.wait(5) and "cancelled", first, timeout=0.3))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(workers.run(lambda: "ran", second, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(Busy):
            workers.submit(lambda: None, threading.Event())
        with pytest.raises(asyncio.TimeoutError):
            await task
        assert first.is_set()  # the timed-out job was told to stop
        assert await waiting == "ran"  # and the queued one ran once it had
        workers.close()

    asyncio.run(scenario())


# ---- tunesmith runs ---------------------------------------------------------------------------------------------


def test_runs_lists_run_folders_as_a_table_and_json(runs_dir, capsys):
    assert main(["runs", str(runs_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["name", "status", "objective", "tuning", "metric"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["sft"][1:5] == ["completed", "sft", "full", "loss"]
    assert rows["clf"][1:5] == ["completed", "classify", "full", "accuracy"]
    assert main(["runs", str(runs_dir), "--json"]) == 0
    data = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    summary = json.loads((runs_dir / "clf" / "summary.json").read_text())
    assert data["clf"]["tuned"] == summary["test"]["accuracy"]
    assert data["clf"]["base"] == summary["base"]["test"]["accuracy"]
    assert data["sft"]["tuned"] < data["sft"]["base"]  # sft's main metric is the loss
    assert data["sft"]["seconds"] > 0 and data["sft"]["model"].endswith("tiny-llama")


def test_runs_marks_a_run_no_process_holds_as_interrupted(tmp_path, capsys):
    run = tmp_path / "runs" / "halfway"
    run.mkdir(parents=True)
    (run / ".tunesmith-run").write_text("")
    (run / "status.json").write_text(json.dumps({"state": "running", "time": "2030-01-01T00:00:00"}))
    (tmp_path / "runs" / "not-a-run").mkdir()
    assert main(["runs", str(tmp_path / "runs"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in rows] == [("halfway", "interrupted")]
