"""Helpers of the jobs benchmarks (bench/jobs_*.py): a private redis-server, `autointerp worker` processes, CPU
accounting of a process tree, waiting for a job."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    def __init__(self):
        if shutil.which("redis-server") is None:
            sys.exit("redis-server is not installed")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        import redis

        self.client = redis.Redis.from_url(self.url)

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def cpu_s(self) -> float:
        c = self.client.info("cpu")
        return float(c["used_cpu_user"]) + float(c["used_cpu_sys"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Worker:
    """`autointerp worker` in its own process group; `cpu_s()` sums user+sys of the whole tree (pool children)."""

    def __init__(self, env: dict, *args: str, log: Path | None = None):
        self.log = log or Path(tempfile.mkstemp(prefix="bench-worker-", suffix=".log")[1])
        self.proc = subprocess.Popen([sys.executable, "-m", "autointerp.cli", "worker", "--loglevel", "INFO", *args],
                                     env=env, cwd=str(ROOT), stdout=open(self.log, "wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._seen: dict[int, float] = {}

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        raise RuntimeError("worker not ready")

    def cpu_s(self) -> float:
        """CPU seconds of the tree so far (children that exited keep their last reading)."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                t = p.cpu_times()
                self._seen[p.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return sum(self._seen.values())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def wait_job(store, job_id: int, timeout: float = 3600, poll: float = 0.2) -> tuple[float, str]:
    """Seconds until the job is no longer pending/running, and its status."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        s = store.job(job_id)["status"]
        if s not in ("pending", "running"):
            return time.perf_counter() - t0, s
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


def worker_env(db_url: str, broker: str, **extra) -> dict:
    return {**os.environ, "AUTOINTERP_DATABASE_URL": db_url, "AUTOINTERP_BROKER_URL": broker,
            "AUTOINTERP_LLM_CACHE": "off", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "AUTOINTERP_SWEEP_S": "0.5", "PYTHONPATH": str(ROOT),
            **{k: str(v) for k, v in extra.items()}}
