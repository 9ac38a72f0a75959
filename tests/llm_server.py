"""A real OpenAI-compatible HTTP server for tests (stdlib only). Start it through llm_server_fixture.py.

    python tests/llm_server.py --port 0 --ready-file PATH [options]

Endpoints: POST /v1/chat/completions, GET /v1/models, GET /stats, POST /stats/reset, GET /health.

Answers, first that applies:
  --script FILE.json   a JSON list of answers returned in order (HTTP 500 "script exhausted" after the last),
                       or an object {regex: answer} (first regex that re.search-es the joined message contents;
                       no match -> the default answer). An answer is a string or {"text": ..., "logprobs": [...]}.
  --judge module:func  func(messages: list[dict], params: dict) -> str | dict; params is the request body
                       without "messages". The module is imported with tests/ (and --judge-path) on sys.path.
  default              the fixed sentence DEFAULT_ANSWER.
Logprobs (when the request asks and --no-logprobs is not set): a dict answer's "logprobs" list
[{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}], else synthesized per word-piece of the text.
Usage: ceil(chars / 4) for prompt and completion (omitted with --no-usage).
--latency-ms N sleeps N ms in every chat request (in flight, so /stats max_in_flight shows client concurrency).

Failures, decided under a lock per chat request, in this order:
  401 when --api-key is set and the bearer differs; 404 (code model_not_found) for a model not in --models;
  400 for a body without messages, for "max_tokens" with --reject-max-tokens (as OpenAI's reasoning models), for
  a prompt over --max-prompt-chars (code context_length_exceeded);
  then the first --fail-first N requests answer --fail-status (default 500);
  then one seeded draw r in [0, 1): r < fail_429 -> 429 with Retry-After; < +fail_500 -> 500;
  < +timeout_rate -> sleep --hang-s then answer; < +malformed_rate -> a 200 with a broken body
  (alternately truncated JSON and JSON without "choices").
/stats: {"requests", "by_status", "per_model", "prompt_chars", "completion_chars", "in_flight",
         "max_in_flight", "judge_errors"}; counts chat-completion requests only.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import re
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DEFAULT_ANSWER = "This is a test answer from the local test server."
HERE = Path(__file__).resolve().parent


def est_tokens(n_chars: int) -> int:
    return math.ceil(n_chars / 4)


class State:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)
        self.models = [m for m in (args.models or "").split(",") if m]
        self.script = None
        if args.script:
            self.script = json.loads(Path(args.script).read_text())
            if not isinstance(self.script, (list, dict)):
                raise SystemExit("--script: expected a JSON list or object")
        self.script_pos = 0
        self.judge = None
        if args.judge:
            for p in [str(HERE), *(args.judge_path or [])]:
                if p not in sys.path:
                    sys.path.insert(0, p)
            mod, _, func = args.judge.partition(":")
            obj = importlib.import_module(mod)
            for part in func.split("."):
                obj = getattr(obj, part)
            self.judge = obj
        self.chat_seen = 0  # for --fail-first (not reset by /stats/reset)
        self.malformed_seen = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        with getattr(self, "lock", threading.Lock()):
            self.requests = 0
            self.by_status: dict[str, int] = {}
            self.per_model: dict[str, int] = {}
            self.prompt_chars = 0
            self.completion_chars = 0
            self.in_flight = getattr(self, "in_flight", 0)
            self.max_in_flight = self.in_flight
            self.judge_errors = 0

    def stats(self) -> dict:
        with self.lock:
            return {
                "requests": self.requests,
                "by_status": dict(self.by_status),
                "per_model": dict(self.per_model),
                "prompt_chars": self.prompt_chars,
                "completion_chars": self.completion_chars,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "judge_errors": self.judge_errors,
            }

    def draw_failure(self) -> str | None:
        """The failure for this request, or None. Deterministic sequence for a given --seed."""
        a = self.args
        with self.lock:
            self.chat_seen += 1
            if self.chat_seen <= a.fail_first:
                return "first"
            r = self.rng.random()
        for name, p in (("429", a.fail_429), ("500", a.fail_500), ("timeout", a.timeout_rate),
                        ("malformed", a.malformed_rate)):
            if r < p:
                return name
            r -= p
        return None

    def answer(self, messages: list[dict], params: dict):
        if self.script is not None:
            if isinstance(self.script, list):
                with self.lock:
                    i = self.script_pos
                    self.script_pos += 1
                if i >= len(self.script):
                    raise ScriptExhausted(f"script exhausted after {len(self.script)} answers")
                return self.script[i]
            joined = "\n".join(str(m.get("content", "")) for m in messages)
            for pattern, ans in self.script.items():
                if re.search(pattern, joined, re.S):
                    return ans
            return DEFAULT_ANSWER
        if self.judge is not None:
            return self.judge(messages, params)
        return DEFAULT_ANSWER


class ScriptExhausted(Exception):
    pass


def synth_logprobs(text: str, top_n: int) -> list[dict]:
    """Deterministic fake logprobs: one entry per word-piece, the chosen token most likely."""
    pieces = re.findall(r"\s*\S+|\s+", text) or [""]
    out = []
    for p in pieces:
        top = [{"token": p, "logprob": -0.05}] + [
            {"token": f"<alt{j}>", "logprob": -3.0 - j} for j in range(1, max(top_n, 1))
        ]
        out.append({"token": p, "logprob": -0.05, "bytes": list(p.encode()), "top_logprobs": top[:top_n]})
    return out


def openai_logprobs(items: list[dict], top_n: int) -> list[dict]:
    out = []
    for t in items:
        tops = [{"token": a["token"], "logprob": float(a["logprob"]), "bytes": list(a["token"].encode())}
                for a in t.get("top_logprobs", [])]
        out.append({"token": t["token"], "logprob": float(t["logprob"]), "bytes": list(t["token"].encode()),
                    "top_logprobs": tops[:top_n] if top_n else []})
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; every response sets Content-Length
    state: State

    def log_message(self, fmt, *args):  # quiet unless asked
        if self.state.args.verbose:
            sys.stderr.write("llm_server: " + fmt % args + "\n")

    # ---- plumbing -----------------------------------------------------------------------------------------

    def _send(self, status: int, body, headers: dict | None = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _error(self, status: int, message: str, etype: str, code: str | None = None, headers=None) -> None:
        self._send(status, {"error": {"message": message, "type": etype, "param": None, "code": code}}, headers)

    def _read_json(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw or b"null")
        except ValueError:
            return None

    # ---- routes -------------------------------------------------------------------------------------------

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/stats":
            return self._send(200, self.state.stats())
        if path == "/health":
            return self._send(200, {"ok": True})
        if path in ("/v1/models", "/models"):
            if not self._authorized():
                return
            names = self.state.models or ["test-model"]
            return self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "test"} for m in names]})
        self._error(404, f"no route GET {path}", "not_found")

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/stats/reset":
            self._read_json()
            self.state.reset_stats()
            return self._send(200, {"ok": True})
        if path in ("/v1/chat/completions", "/chat/completions"):
            st = self.state
            with st.lock:
                st.in_flight += 1
                st.max_in_flight = max(st.max_in_flight, st.in_flight)
            try:
                self._chat()
            finally:
                with st.lock:
                    st.in_flight -= 1
            return
        self._read_json()
        self._error(404, f"no route POST {path}", "not_found")

    def _authorized(self) -> bool:
        key = self.state.args.api_key
        if key and self.headers.get("Authorization", "") != f"Bearer {key}":
            self._error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            return False
        return True

    def _count(self, status: int, model: str | None = None, prompt_chars: int = 0, completion_chars: int = 0):
        st = self.state
        with st.lock:
            st.by_status[str(status)] = st.by_status.get(str(status), 0) + 1
            if model:
                st.per_model[model] = st.per_model.get(model, 0) + 1
            st.prompt_chars += prompt_chars
            st.completion_chars += completion_chars

    def _chat(self):
        st, a = self.state, self.state.args
        body = self._read_json()
        with st.lock:
            st.requests += 1
        if a.latency_ms:
            time.sleep(a.latency_ms / 1000.0)
        if not self._authorized():
            return self._count(401)
        model = body.get("model") if isinstance(body, dict) else None
        if st.models and model not in st.models:
            self._count(404, model)
            return self._error(404, f"The model `{model}` does not exist.", "invalid_request_error",
                               "model_not_found")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages:
            self._count(400, model)
            return self._error(400, "'messages' must be a non-empty list", "invalid_request_error")
        prompt_chars = sum(len(str(m.get("content", ""))) for m in messages if isinstance(m, dict))
        if a.reject_max_tokens and "max_tokens" in body:  # like OpenAI's reasoning models
            self._count(400, model, prompt_chars)
            return self._error(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                               "Use 'max_completion_tokens' instead.", "invalid_request_error",
                               "unsupported_parameter")
        if a.max_prompt_chars and prompt_chars > a.max_prompt_chars:
            self._count(400, model, prompt_chars)
            return self._error(400, f"This model's maximum context length is {est_tokens(a.max_prompt_chars)} "
                               f"tokens. However, your messages resulted in {est_tokens(prompt_chars)} tokens.",
                               "invalid_request_error", "context_length_exceeded")

        failure = st.draw_failure()
        if failure == "first":
            self._count(a.fail_status, model, prompt_chars)
            headers = {"Retry-After": _fmt(a.retry_after)} if a.fail_status == 429 else None
            return self._error(a.fail_status, f"injected failure (status {a.fail_status})", "server_error",
                               headers=headers)
        if failure == "429":
            self._count(429, model, prompt_chars)
            return self._error(429, "Rate limit reached (injected).", "rate_limit_error", "rate_limit_exceeded",
                               headers={"Retry-After": _fmt(a.retry_after)})
        if failure == "500":
            self._count(500, model, prompt_chars)
            return self._error(500, "Internal server error (injected).", "server_error")
        if failure == "timeout":
            time.sleep(a.hang_s)  # past the client's timeout; the client has usually hung up by now
        if failure == "malformed":
            with st.lock:
                st.malformed_seen += 1
                k = st.malformed_seen
            self._count(200, model, prompt_chars)
            raw = b'{"id": "chatcmpl-x", "choices": [{"message": {"con' if k % 2 else b'{"object": "chat.completion"}'
            return self._send(200, None, raw=raw)

        params = {k: v for k, v in body.items() if k != "messages"}
        try:
            ans = st.answer(messages, params)
        except ScriptExhausted as e:
            self._count(500, model, prompt_chars)
            return self._error(500, str(e), "server_error")
        except Exception as e:
            with st.lock:
                st.judge_errors += 1
            traceback.print_exc(file=sys.stderr)
            self._count(500, model, prompt_chars)
            return self._error(500, f"judge raised {type(e).__name__}: {e}", "server_error")
        text, lp_items = (ans.get("text", ""), ans.get("logprobs")) if isinstance(ans, dict) else (str(ans), None)

        logprobs = None
        top_n = int(body.get("top_logprobs") or 0)
        if body.get("logprobs") and a.logprobs:
            logprobs = {"content": openai_logprobs(lp_items, top_n) if lp_items else synth_logprobs(text, top_n)}
        resp = {
            "id": f"chatcmpl-{st.requests}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": logprobs, "finish_reason": "stop"}],
        }
        if a.usage:
            pt, ct = est_tokens(prompt_chars), est_tokens(len(text))
            resp["usage"] = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        self._count(200, model, prompt_chars, len(text))
        self._send(200, resp)


def _fmt(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else str(seconds)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ready-file", required=True, help="the bound port is written here once listening")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--fail-429", type=float, default=0.0)
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds sent with 429")
    p.add_argument("--fail-500", type=float, default=0.0)
    p.add_argument("--timeout-rate", type=float, default=0.0)
    p.add_argument("--hang-s", type=float, default=30.0, help="how long a 'timeout' request sleeps")
    p.add_argument("--malformed-rate", type=float, default=0.0)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--fail-status", type=int, default=500)
    p.add_argument("--judge", default=None, help="module:func")
    p.add_argument("--judge-path", action="append", default=[], help="extra sys.path entry for --judge")
    p.add_argument("--script", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--models", default=None, help="comma-separated; unknown models get 404")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logprobs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--usage", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-prompt-chars", type=int, default=0, help="longer prompts get a context-length 400")
    p.add_argument("--reject-max-tokens", action="store_true", help="400 unless max_completion_tokens is used")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    state = State(args)
    handler = type("BoundHandler", (Handler,), {"state": state})
    ThreadingHTTPServer.request_queue_size = 128  # the default backlog of 5 drops bursts of connections
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True  # hung 'timeout' requests must not block exit
    port = server.server_address[1]
    tmp = f"{args.ready_file}.tmp"
    Path(tmp).write_text(str(port))
    os.replace(tmp, args.ready_file)  # atomic: the reader never sees a partial port
    try:
        server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
