"""``simple-dit serve``: the API against a tiny trained run, hostile input (part of the fault
suite: path traversal, huge, negative and non-numeric values, bad JSON, broken clients), many
concurrent requests, the command's one-line errors, a compare directory, and one end-to-end test
in a real headless browser (Debian's chromium and chromium-driver through selenium)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from simple_dit import serve as serve_mod
from simple_dit.cli import main
from simple_dit.runtime import SEED_LIMIT
from simple_dit.sample import Pipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mnist_dir):
    """dit-tiny trained for 20 steps, with one evaluation record like --eval-every writes and a
    guidance.json like `simple-dit eval --guidance 1,3` writes."""
    from simple_dit.evaluate import write_guidance
    from simple_dit.io import append_jsonl
    from simple_dit.train import train

    run = tmp_path_factory.mktemp("serve") / "run"
    train(tiny_config(), run, progress=False, device="cpu", data_dir=str(mnist_dir))
    append_jsonl(run / "metrics.jsonl", {"step": 20, "train_seconds": 1.0, "eval_fid": 300.0, "eval_label_accuracy": 0.1})
    write_guidance(run, [{"guidance": 1.0, "fid": 320.0, "label_accuracy": 0.1}, {"guidance": 3.0, "fid": 300.0, "label_accuracy": 0.12}])
    return run


@contextmanager
def serving(directory, host: str = "127.0.0.1"):
    """``make_server(directory)`` on a free port, serving in a thread."""
    srv = serve_mod.make_server(directory, host, port=0, device="cpu")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="module")
def server(run_dir):
    with serving(run_dir) as srv:
        yield srv


# ---- a raw HTTP client: sends paths and headers exactly as given ----------------------------------


def request(srv, method: str, path: str, body: bytes | None = None, headers: dict | None = None, raw: bytes | None = None):
    """(status, headers, body) of one request over a fresh connection, the path sent verbatim."""
    host, port = srv.server_address[:2]
    if raw is None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    data = b"".join(chunks)
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), hdrs, payload


def get_json(srv, path: str):
    status, hdrs, body = request(srv, "GET", path)
    assert status == 200, body
    assert hdrs["content-type"] == "application/json"
    return json.loads(body)


def sse(body: bytes) -> list[tuple[str, dict]]:
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def generate(srv, **fields):
    status, hdrs, body = request(srv, "POST", "/api/generate", json.dumps(fields).encode(), {"Content-Type": "application/json"})
    assert status == 200, body
    assert hdrs["content-type"] == "text/event-stream"
    return sse(body)


def decode(uri: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :]))))


def final_images(events) -> tuple[list[int], np.ndarray]:
    name, done = events[-1]
    assert name == "done", events[-1]
    return [i["label"] for i in done["images"]], np.stack([decode(i["image"]) for i in done["images"]])


def assert_refused(status: int, hdrs: dict, body: bytes, *statuses: int) -> str:
    assert status in (statuses or (400,)), (status, body)
    assert hdrs["content-type"] == "application/json"
    return json.loads(body)["error"]


# ---- the API ------------------------------------------------------------------------------------


def test_page_info_and_static_files(server):
    status, hdrs, body = request(server, "GET", "/")
    assert status == 200 and hdrs["content-type"].startswith("text/html")
    assert "default-src 'self'" in hdrs["content-security-policy"]
    assert b'id="generate-form"' in body
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, hdrs, body = request(server, "GET", f"/static/{name}")
        assert status == 200 and hdrs["content-type"].startswith(ctype) and body
    info = get_json(server, "/api/info")
    assert info["mode"] == "run" and info["preset"] == "dit-tiny"
    assert info["num_classes"] == 10 and info["class_names"] == [str(k) for k in range(10)]
    assert info["samplers"] == ["ddim", "ddpm", "dpm++2m"]  # dit-tiny is an epsilon model
    assert info["default_steps"] == {"ddim": 50, "ddpm": 200, "dpm++2m": 20}  # ddpm's 1000 capped at the limit
    assert info["limits"] == {"images": 100, "steps": 200, "guidance": [0.0, 20.0], "seed": [0, SEED_LIMIT - 1]}  # every seed the pipeline takes


def test_generate_streams_the_denoising_then_the_images_the_pipeline_draws(server, run_dir):
    events = generate(server, classes=[3, 7], per_class=2, steps=8, guidance=2.5, seed=5)
    names = [name for name, _ in events]
    start = events[0][1]
    assert names == ["start"] + ["frame"] * 8 + ["done"]
    assert start == {"labels": [3, 3, 7, 7], "per_class": 2, "sampler": "ddim", "steps": 8, "guidance": 2.5, "seed": 5,
                     "frames": 8, "columns": 2}  # fmt: skip
    for i, (_, frame) in enumerate(events[1:-1], 1):
        assert frame["index"] == i and frame["frames"] == 8
        assert decode(frame["image"]).shape == (2 * 28 + 2, 2 * 28 + 2)  # 2 x 2 tiles with a 2-pixel gap
    labels, images = final_images(events)
    assert labels == [3, 3, 7, 7] and images.shape == (4, 28, 28) and images.dtype == np.uint8
    done = events[-1][1]
    assert (done["width"], done["height"]) == (28, 28) and decode(done["grid"]).shape == (58, 58)
    # The same images as the Python API's, and the last frame is the final grid.
    expected = Pipeline.from_pretrained(run_dir, device="cpu")([3, 3, 7, 7], steps=8, guidance=2.5, seed=5)
    np.testing.assert_array_equal(images, expected[:, 0].numpy())
    np.testing.assert_array_equal(decode(events[-2][1]["image"]), decode(done["grid"]))


def test_generate_defaults_and_frame_count_past_the_trajectory_limit(server):
    events = generate(server, classes=[0])
    start = events[0][1]
    assert (start["sampler"], start["steps"], start["seed"], start["guidance"]) == ("ddim", 50, 0, 3.0)
    frames = [e for name, e in events if name == "frame"]
    assert len(frames) == start["frames"] == serve_mod.expected_frames(50) == 50  # every step under GIF_FRAMES x 2
    events = generate(server, classes=[1], sampler="ddpm", steps=200)
    assert len([1 for name, _ in events if name == "frame"]) == events[0][1]["frames"] == serve_mod.expected_frames(200) == 40


def test_run_record_and_files(server, run_dir):
    run = get_json(server, "/api/run")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert run["train"] == [r for r in lines if "loss" in r] and len(run["train"]) == 4  # logged every 5 of 20 steps
    assert run["eval"] == [{"step": 20, "train_seconds": 1.0, "eval_fid": 300.0, "eval_label_accuracy": 0.1}]
    assert run["guidance"]["guidance"] == 3.0 and len(run["guidance"]["scores"]) == 2
    assert run["samples"] == "/files/samples.png"
    status, hdrs, body = request(server, "GET", run["samples"])
    assert status == 200 and hdrs["content-type"] == "image/png"
    assert body == (run_dir / "samples.png").read_bytes()
    status, hdrs, body = request(server, "GET", "/files/config.json")
    assert status == 200 and json.loads(body)["preset"] == "dit-tiny"


def test_a_null_field_is_its_default(server):
    """As for sampler and guidance: per_class and seed given as null (a 500 or a mid-stream error before)."""
    with_nulls = generate(server, classes=[1], per_class=None, seed=None, steps=2, sampler=None, guidance=None)
    assert [name for name, _ in with_nulls][-1] == "done"
    without = generate(server, classes=[1], steps=2)
    assert {k: v for k, v in with_nulls[-1][1].items() if k != "seconds"} == {k: v for k, v in without[-1][1].items() if k != "seconds"}


def test_long_records_are_thinned_evenly():
    records = [{"step": i} for i in range(5000)]
    thinned = serve_mod._thin(records)
    assert len(thinned) == serve_mod.MAX_CURVE_POINTS and thinned[0] == records[0] and thinned[-1] == records[-1]


# ---- hostile input ------------------------------------------------------------------------------

BAD_BODIES = [
    (b"nope", "not valid JSON"), (b"{", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"),
    (b'{"classes": [1], "guidance": NaN}', "not valid JSON"), (b'{"classes": [1], "steps": Infinity}', "not valid JSON"),
    (b"[" * 100_00, "JSON"), (b"[1, 2]", "JSON object"), (b'"x"', "JSON object"), (b"null", "JSON object"), (b"", "not valid JSON"),
    (b"{}", "classes must be"), (b'{"classes": []}', "classes must be"), (b'{"classes": 3}', "classes must be"),
    (b'{"classes": [10]}', "out of range"), (b'{"classes": [-1]}', "out of range"), (b'{"classes": [1e400]}', "integers"),
    (b'{"classes": ["3"]}', "integers"), (b'{"classes": [true]}', "integers"), (b'{"classes": [1.5]}', "integers"),
    (b'{"classes": [null]}', "integers"), (b'{"classes": [' + b"1" * 5000 + b"]}", "JSON"),
    (b'{"classes": [1], "per_class": 0}', "per_class"), (b'{"classes": [1], "per_class": -3}', "per_class"),
    (b'{"classes": [1], "per_class": 101}', "per_class"), (b'{"classes": [1], "per_class": 1000000000000}', "per_class"),
    (b'{"classes": [1], "per_class": "4"}', "per_class"), (b'{"classes": [1, 2], "per_class": 51}', "at most 100"),
    (b'{"classes": [' + b"1," * 100 + b"1]}", "at most 100"),
    (b'{"classes": [1], "steps": 0}', "steps"), (b'{"classes": [1], "steps": -5}', "steps"), (b'{"classes": [1], "steps": 201}', "steps"),
    (b'{"classes": [1], "steps": 99999999999999999999}', "steps"), (b'{"classes": [1], "steps": "20"}', "steps"),
    (b'{"classes": [1], "steps": 20.5}', "steps"), (b'{"classes": [1], "steps": true}', "steps"), (b'{"classes": [1], "steps": [20]}', "steps"),
    (b'{"classes": [1], "guidance": -0.5}', "guidance"), (b'{"classes": [1], "guidance": 20.01}', "guidance"),
    (b'{"classes": [1], "guidance": 1e308}', "guidance"), (b'{"classes": [1], "guidance": "3"}', "guidance"),
    (b'{"classes": [1], "guidance": false}', "guidance"), (b'{"classes": [1], "guidance": {}}', "guidance"),
    (b'{"classes": [1], "seed": -1}', "seed"), (b'{"classes": [1], "seed": 9223372036854775808}', "seed"),
    (b'{"classes": [1], "seed": 1.5}', "seed"), (b'{"classes": [1], "seed": "0"}', "seed"), (b'{"classes": [1], "seed": 4294967296}', "seed"),
    (b'{"classes": [1], "sampler": "euler"}', "sampler"), (b'{"classes": [1], "sampler": "../../etc/passwd"}', "sampler"),
    (b'{"classes": [1], "sampler": 3}', "sampler"), (b'{"classes": [1], "n": 5}', "unknown field"),
]  # fmt: skip


@pytest.mark.faults
@pytest.mark.parametrize("body,fragment", BAD_BODIES, ids=[f"{i}-{b[:24]!r}" for i, (b, _) in enumerate(BAD_BODIES)])
def test_bad_generate_requests_get_400_with_a_json_error(server, body, fragment):
    status, hdrs, payload = request(server, "POST", "/api/generate", body, {"Content-Type": "application/json"})
    assert fragment in assert_refused(status, hdrs, payload, 400)


@pytest.mark.faults
@pytest.mark.parametrize("body", [b'{"classes": [1], "seed": ' + b"9" * 4000 + b"}", b'{"classes": [' + b"9" * 4000 + b"]}"], ids=["seed", "class"])
def test_a_huge_number_is_not_echoed_whole(server, body):
    status, hdrs, payload = request(server, "POST", "/api/generate", body, {"Content-Type": "application/json"})
    error = assert_refused(status, hdrs, payload, 400)
    assert "9" * 40 in error and "9" * 41 not in error, error


@pytest.mark.faults
def test_malformed_http_gets_a_json_error(server):
    host = f"Host: {server.server_address[0]}\r\nContent-Type: application/json"
    cases = [
        (b"POST /api/generate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 415),  # not declared JSON
        (b"POST /api/generate HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{}", 415),
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\n\r\n".encode(), 411),  # no Content-Length
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: abc\r\n\r\n".encode(), 400),
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: -5\r\n\r\n".encode(), 400),
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: 99999999999\r\n\r\n".encode(), 413),
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: \xb2\r\n\r\n{{}}".encode("latin-1"), 400),  # a digit to isdigit(), not to int()
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: 15\r\nContent-Length: 2\r\n\r\n{{\"classes\": [1]}}".encode(), 400),
        (f"POST /api/generate HTTP/1.1\r\n{host}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), 411),
        (f"GET /{'a' * 70000} HTTP/1.1\r\n{host}\r\n\r\n".encode(), 414),
        (f"DELETE / HTTP/1.1\r\n{host}\r\n\r\n".encode(), 501),
        (f"GET /api/generate HTTP/1.1\r\n{host}\r\n\r\n".encode(), 405),
        (f"POST /api/info HTTP/1.1\r\n{host}\r\nContent-Length: 0\r\n\r\n".encode(), 405),
        (f"GET /api/nothing HTTP/1.1\r\n{host}\r\n\r\n".encode(), 404),
    ]
    for raw, expected in cases:
        status, hdrs, body = request(server, "", "", raw=raw)
        assert_refused(status, hdrs, body, expected)
    # A request line the server cannot read: it cannot know the HTTP version either, so it answers
    # as HTTP/0.9 does, with the body alone, still a JSON error.
    for line in (b"NONSENSE", b"GET / HTTP/1.1 extra", b"GET / HTTP/2.0", b"GET / FOO/1.1"):
        with socket.create_connection(server.server_address[:2], timeout=30) as s:
            s.sendall(line + b"\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert json.loads(reply)["error"]
    # A body shorter than its Content-Length: the server waits for the rest, then drops the client
    # (SOCKET_TIMEOUT_S); here the client gives up first and the server still answers others.
    with socket.create_connection(server.server_address[:2]) as s:
        s.sendall(f"POST /api/generate HTTP/1.1\r\n{host}\r\nContent-Length: 100\r\n\r\n{{".encode())
        assert get_json(server, "/api/info")["mode"] == "run"


TRAVERSALS = [
    "/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/files/../../etc/passwd", "/files/..%2f..%2fetc%2fpasswd",
    "/files/%2e%2e/%2e%2e/etc/passwd", "/files/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/files/%252e%252e/%252e%252e/etc/passwd",
    "/files/..%5c..%5cetc%5cpasswd", "/files//etc/passwd", "/files/%2fetc%2fpasswd", "/files/./config.json",
    "/files/samples/../../../etc/passwd", "/files/config.json%00.png", "/files/.lock", "/files/checkpoint.safetensors",
    "/files/leak.json", "/files/leakdir/passwd.json", "/static/../serve.py", "/static/..%2fserve.py", "/static/%2e%2e/serve.py",
    "/static/index.html/../../serve.py", "//etc/passwd", "/files/" + "../" * 30 + "etc/passwd",
]  # fmt: skip


@pytest.mark.faults
@pytest.mark.parametrize("path", TRAVERSALS)
def test_nothing_outside_the_served_directory_can_be_read(server, run_dir, tmp_path_factory, path):
    outside = tmp_path_factory.getbasetemp() / "secret"
    outside.mkdir(exist_ok=True)
    (outside / "secret.json").write_text('{"secret": "outside the run"}')
    (outside / "passwd.json").write_text('{"secret": "outside the run"}')
    for link, target in (("leak.json", outside / "secret.json"), ("leakdir", outside)):
        if not (run_dir / link).is_symlink():
            (run_dir / link).symlink_to(target)
    status, hdrs, body = request(server, "GET", path)
    assert_refused(status, hdrs, body, 403, 404)
    assert b"root:" not in body and b"secret" not in body and b"import" not in body


# ---- concurrency and broken clients -------------------------------------------------------------


@pytest.mark.faults
def test_concurrent_requests_neither_crash_nor_mix(server):
    variants = [dict(classes=[k], per_class=1 + k % 3, steps=4 + k, seed=100 + k, guidance=float(k % 4)) for k in range(6)]
    reference = [final_images(generate(server, **v)) for v in variants]
    order = [i % len(variants) for i in range(24)]

    def one(i: int):
        if i % 4 == 3:  # reads interleaved with the sampling
            return get_json(server, "/api/info")["mode"], get_json(server, "/api/run")["samples"]
        return final_images(generate(server, **variants[order[i]]))

    with ThreadPoolExecutor(max_workers=24) as pool:
        results = list(pool.map(one, range(24)))
    for i, got in enumerate(results):
        if i % 4 == 3:
            assert got == ("run", "/files/samples.png")
        else:
            labels, images = got
            assert labels == reference[order[i]][0]
            np.testing.assert_array_equal(images, reference[order[i]][1])


@pytest.mark.faults
def test_requests_beyond_the_queue_get_503_and_the_queue_moves_on(server, monkeypatch):
    monkeypatch.setattr(server, "waiting", threading.BoundedSemaphore(1))
    monkeypatch.setattr(serve_mod, "MAX_WAITING", 1)
    with ThreadPoolExecutor(max_workers=1) as pool:
        with server.model.lock:  # the model is busy: the first request waits in the queue
            first = pool.submit(generate, server, classes=[2], steps=3)
            deadline = time.monotonic() + 10
            while server.waiting._value and time.monotonic() < deadline:
                time.sleep(0.01)
            status, hdrs, body = request(server, "POST", "/api/generate", b'{"classes": [2]}', {"Content-Type": "application/json"})
            assert "busy" in assert_refused(status, hdrs, body, 503)
        assert first.result(timeout=60)[-1][0] == "done"


@contextmanager
def long_stream(srv):
    """A socket on which a 200-step generation is streaming (its first frame received), and what it received."""
    host, port = srv.server_address[:2]
    body = json.dumps({"classes": list(range(10)), "per_class": 10, "steps": 200, "sampler": "ddpm"}).encode()
    with socket.create_connection((host, port)) as s:
        s.sendall(f"POST /api/generate HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        seen = bytearray()
        while b"event: frame" not in seen:  # the model is denoising for this client now
            seen += s.recv(4096)
        yield s, seen


@pytest.mark.faults
def test_a_client_that_leaves_mid_stream_frees_the_model(server, monkeypatch):
    encoded = []
    monkeypatch.setattr(serve_mod, "_png_data_uri", lambda array, encode=serve_mod._png_data_uri: encoded.append(1) or encode(array))
    with long_stream(server) as (s, _):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
    assert generate(server, classes=[4], steps=3)[-1][0] == "done"  # it waited for the model: the first stream has ended
    assert not server.model.lock.locked()
    # The left stream stopped at its next frame instead of denoising all 200 steps (40 frames).
    dropped_frames = len(encoded) - (3 + 1 + 1)  # the second request: 3 frames, the grid, 1 image
    assert 1 <= dropped_frames < serve_mod.expected_frames(200) == 40


def test_stopping_the_server_ends_a_request_that_is_sampling(run_dir):
    """Ctrl-C during a request used to abort the process ("terminate called without an active
    exception", exit 134): PyTorch was still computing in the request's thread at exit."""
    with serving(run_dir) as srv:
        with long_stream(srv) as (s, seen):
            start = time.monotonic()
            srv.stop()
            assert not srv.model.lock.locked() and time.monotonic() - start < 30
            s.settimeout(10)
            while chunk := s.recv(65536):
                seen += chunk
        assert b"event: error" in seen and b"the server is stopping" in seen


def test_stopping_the_server_waits_for_a_request_to_end_not_only_to_give_the_model_back(run_dir, monkeypatch):
    """A stopped request gave the model's lock back, then freed its tensors (its traceback held
    them) while the interpreter exited: exit 134 again, one stop in two. stop() now waits for the
    request itself."""
    ended = threading.Event()
    stream = serve_mod.Handler._stream

    def slow_to_end(self, req):
        try:
            return stream(self, req)
        finally:
            time.sleep(1.0)  # the request's last work, after the lock is free
            ended.set()

    monkeypatch.setattr(serve_mod.Handler, "_stream", slow_to_end)
    with serving(run_dir) as srv:
        with long_stream(srv):
            srv.stop()
            assert ended.is_set()


# ---- the command --------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("simple-dit: error:"), err
    return err[0]


def test_command_errors_are_one_line(run_dir, tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", str(run_dir), "--port", str(port), "--device", "cpu"]) == 2
        assert f"port {port} on 127.0.0.1 is already in use" in _error_line(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    for target, fragment in ((tmp_path / "empty", "is not a run directory"), (tmp_path / "missing", "does not exist"),
                             (tmp_path / "file.txt", "is not a directory")):  # fmt: skip
        assert main(["serve", str(target)]) == 2
        assert fragment in _error_line(capsys)
    assert main(["serve", str(run_dir), "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535" in _error_line(capsys)


def test_a_default_guidance_past_the_limit_is_refused_at_start(run_dir, tmp_path, capsys):
    """A guidance.json of 1e300 (hand-edited; eval takes any finite scale) used to start a server
    that refused every request without a guidance of its own."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    record = json.loads((run / "guidance.json").read_text())
    (run / "guidance.json").write_text(json.dumps(record | {"guidance": 1e300}))
    assert main(["serve", str(run), "--port", "0", "--device", "cpu"]) == 2
    assert "default guidance, 1e+300 (its guidance.json), is past the 20 that serve takes" in _error_line(capsys)


def test_a_compare_directory_shows_its_report(tmp_path):
    report = "<!DOCTYPE html><html><body><h1>simple-dit comparison: a vs b</h1></body></html>"
    (tmp_path / "report.html").write_text(report)
    (tmp_path / "results.json").write_text('{"presets": []}')
    (tmp_path / "loss.png").write_bytes(b"\x89PNG fake")
    with serving(tmp_path) as srv:
        status, hdrs, body = request(srv, "GET", "/")
        assert status == 200 and body.decode() == report and hdrs["content-type"].startswith("text/html")
        assert get_json(srv, "/api/info") == {"mode": "compare", "name": tmp_path.name, "report": "/files/report.html"}
        assert request(srv, "GET", "/files/results.json")[2] == b'{"presets": []}'
        assert request(srv, "GET", "/files/loss.png")[1]["content-type"] == "image/png"
        status, hdrs, body = request(srv, "POST", "/api/generate", b'{"classes": [1]}', {"Content-Type": "application/json"})
        assert "no model" in assert_refused(status, hdrs, body, 404)
        assert_refused(*request(srv, "GET", "/files/../report.html"), 403)


# ---- end to end in a real browser ---------------------------------------------------------------


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install 'simple-dit[test]')"
    if not CHROMIUM or not CHROMEDRIVER:
        return "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver; .ci/run does)"
    return None


@pytest.fixture
def served_cli(run_dir):
    """`simple-dit serve RUN --port 0` in a subprocess; yields its URL."""
    with subprocess.Popen([sys.executable, "-m", "simple_dit.cli", "serve", str(run_dir), "--port", "0", "--device", "cpu"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy()) as proc:  # fmt: skip
        try:
            line = proc.stdout.readline()
            assert "serving run (dit-tiny) at http://127.0.0.1:" in line, line + proc.stderr.read() if proc.poll() is not None else line
            yield line.split(" at ")[1].split()[0]
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.mark.skipif(_browser_missing() is not None, reason=_browser_missing() or "")
def test_browser_generates_a_digit_and_shows_it(served_cli, run_dir, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(served_cli)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "generate").is_enabled())
        assert "dit-tiny" in driver.find_element(By.ID, "model-line").text
        driver.find_element(By.ID, "no-classes").click()
        driver.find_element(By.ID, "class-3").click()
        Select(driver.find_element(By.ID, "sampler")).select_by_value("dpm++2m")  # (sets steps to its default)
        assert driver.find_element(By.ID, "steps").get_attribute("value") == "20"
        for field, value in (("per-class", "2"), ("steps", "12"), ("seed", "7")):
            box = driver.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done in"))
        shown = driver.execute_script(
            "return [...document.querySelectorAll('#gallery figure')].map(f => { const img = f.querySelector('img');"
            " return {label: f.dataset.label, src: img.src, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,"
            " caption: f.textContent}; })"
        )
        assert len(shown) == 2
        for item in shown:
            assert item["label"] == "3" and item["caption"] == "3" and item["complete"]
            assert (item["w"], item["h"]) == (28, 28)  # decoded by the browser at the model's image size
            assert decode(item["src"]).shape == (28, 28)
        assert driver.execute_script("return document.getElementById('progress').value") == 1
        assert driver.execute_script("return document.getElementById('frame').naturalWidth") == 2 * 28 + 2
        assert "dpm++2m, 12 steps" in driver.find_element(By.ID, "status").get_attribute("data-settings")
        # The page shows exactly what the Python API draws with the same settings.
        expected = Pipeline.from_pretrained(run_dir, device="cpu")([3, 3], sampler="dpm++2m", steps=12, seed=7)
        np.testing.assert_array_equal(np.stack([decode(item["src"]) for item in shown]), expected[:, 0].numpy())
        # The training record: loss, learning rate, images/s, gradient norm, FID, label accuracy;
        # the evaluation and guidance tables; the final grid.
        assert len(driver.find_elements(By.CSS_SELECTOR, "#charts svg polyline")) == 6
        assert len(driver.find_elements(By.CSS_SELECTOR, "#scores table")) == 2
        assert driver.execute_script("return document.getElementById('samples-png').naturalWidth") > 0
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        driver.save_screenshot(str(tmp_path / "page.png"))
    finally:
        driver.quit()


def test_without_a_directory_it_serves_the_packaged_default_model(run_dir, tmp_path, monkeypatch):
    from simple_dit import export

    export.export(run_dir, tmp_path / "export")
    monkeypatch.setattr(export, "default_model_path", lambda: tmp_path / "export" / export.MODEL_NAME)
    with serving(None) as srv:
        info = get_json(srv, "/api/info")
        assert info["name"] == "default model" and info["preset"] == "dit-tiny"
        assert get_json(srv, "/api/run") == {"train": [], "eval": [], "guidance": None, "samples": None}
        labels, images = final_images(generate(srv, classes=[5], steps=4))
        assert labels == [5] and images.shape == (1, 28, 28)
        assert_refused(*request(srv, "GET", "/files/config.json"), 404)  # no directory is served


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_an_ipv6_host_is_served(run_dir):
    with serving(run_dir, "::1") as srv:
        assert srv.url.startswith("http://[::1]:") and get_json(srv, "/api/info")["preset"] == "dit-tiny"
