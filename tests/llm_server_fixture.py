"""Start the test OpenAI-compatible server (tests/llm_server.py) as a real process. Stable API for all tests:

    from llm_server_fixture import start_llm_server
    from autointerp.llm import make_client, ChatMessage

    with start_llm_server(judge="judges:detection_judge", models=["judge"]) as srv:
        client = make_client("openai", model="judge", base_url=srv.base_url, api_key_env=None, cache_path=None)
        c = asyncio.run(client.complete([ChatMessage("user", "...")]))
        assert srv.stats()["requests"] == 1

`start_llm_server(...)` starts the process at once and returns an LLMServer handle, which is also a context
manager (exit stops it), so it works as `with ...` or in a pytest fixture (`srv = start_llm_server(); yield srv;
srv.stop()`). Handle: .base_url ("http://127.0.0.1:PORT/v1"), .url (without /v1), .port, .stats() (dict, see
llm_server.py), .reset_stats(), .stop().

Options (all keyword; see llm_server.py for their meaning):
    judge           "module:func" (imported with tests/ on sys.path), or the function itself (it must be
                    importable by module name: defined at the top level of a module, not in __main__)
    script          a list of answers / a {regex: answer} dict (written to a temp file), or a JSON file path
    models          list or comma string; other model names get 404 (default: any model accepted)
    api_key         require "Authorization: Bearer <api_key>" (401 otherwise)
    latency_ms, fail_first, fail_status, fail_429, retry_after, fail_500, timeout_rate, hang_s,
    malformed_rate, seed, logprobs (bool), usage (bool), max_prompt_chars, reject_max_tokens,
    judge_path (extra sys.path dirs), verbose
Give the client `cache_path=None` (or a tmp_path file) so answers never come from the shared response cache.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

SERVER = Path(__file__).resolve().parent / "llm_server.py"


class LLMServer:
    def __init__(self, args: list[str], startup_timeout: float = 20.0):
        self._dir = tempfile.mkdtemp(prefix="llm_server_")
        ready = os.path.join(self._dir, "port")
        self._stderr_path = os.path.join(self._dir, "stderr")
        self._stderr = open(self._stderr_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0", "--ready-file", ready, *args],
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )
        deadline = time.monotonic() + startup_timeout
        while not os.path.exists(ready):
            if self.process.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {self.process.returncode}" if self.process.poll() is not None else (
                    f"not ready after {startup_timeout:g}s")
                err = self.stderr()
                self.stop()
                raise RuntimeError(f"llm_server {why}; stderr:\n{err}")
            time.sleep(0.02)
        self.port = int(Path(ready).read_text())
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.url}/v1"

    def stderr(self) -> str:
        try:
            return Path(self._stderr_path).read_text(errors="replace")
        except OSError:
            return ""

    def _call(self, method: str, path: str) -> dict:
        req = urllib.request.Request(self.url + path, method=method, data=b"{}" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict:
        """{"requests", "by_status", "per_model", "prompt_chars", "completion_chars", "in_flight",
        "max_in_flight", "judge_errors"} over chat-completion requests since start or the last reset."""
        return self._call("GET", "/stats")

    def reset_stats(self) -> None:
        self._call("POST", "/stats/reset")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not self._stderr.closed:
            self._stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LLMServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):  # last resort: never leak a server process
        try:
            if self.process.poll() is None:
                self.process.kill()
        except Exception:
            pass


def start_llm_server(
    *,
    judge: str | Callable | None = None,
    script: list | dict | str | os.PathLike | None = None,
    models: list[str] | str | None = None,
    api_key: str | None = None,
    latency_ms: float = 0,
    fail_first: int = 0,
    fail_status: int = 500,
    fail_429: float = 0.0,
    retry_after: float = 1.0,
    fail_500: float = 0.0,
    timeout_rate: float = 0.0,
    hang_s: float = 30.0,
    malformed_rate: float = 0.0,
    seed: int = 0,
    logprobs: bool = True,
    usage: bool = True,
    max_prompt_chars: int = 0,
    reject_max_tokens: bool = False,
    judge_path: list[str] | None = None,
    verbose: bool = False,
    startup_timeout: float = 20.0,
) -> LLMServer:
    args: list[str] = []
    opts: dict[str, Any] = {
        "latency-ms": latency_ms, "fail-first": fail_first, "fail-status": fail_status, "fail-429": fail_429,
        "retry-after": retry_after, "fail-500": fail_500, "timeout-rate": timeout_rate, "hang-s": hang_s,
        "malformed-rate": malformed_rate, "seed": seed, "max-prompt-chars": max_prompt_chars,
    }
    for k, v in opts.items():
        args += [f"--{k}", str(v)]
    extra_paths = list(judge_path or [])
    if callable(judge):
        if judge.__module__ == "__main__":
            raise ValueError("judge function must live in an importable module, not __main__")
        extra_paths.append(str(Path(inspect.getfile(judge)).resolve().parent))
        judge = f"{judge.__module__}:{judge.__qualname__}"
    if judge:
        args += ["--judge", judge]
    for p in extra_paths:
        args += ["--judge-path", p]
    script_file = None
    if isinstance(script, (list, dict)):
        fd, script_file = tempfile.mkstemp(prefix="llm_script_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(script, f)
        script = script_file
    if script is not None:
        args += ["--script", str(script)]
    if models:
        args += ["--models", models if isinstance(models, str) else ",".join(models)]
    if api_key:
        args += ["--api-key", api_key]
    args.append("--logprobs" if logprobs else "--no-logprobs")
    args.append("--usage" if usage else "--no-usage")
    if reject_max_tokens:
        args.append("--reject-max-tokens")
    if verbose:
        args.append("--verbose")
    try:
        return LLMServer(args, startup_timeout=startup_timeout)
    finally:
        if script_file:  # the server has read it by the time it is ready (or it failed to start)
            os.unlink(script_file)
