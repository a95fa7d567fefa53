"""N `lorakit serve` replicas on one S3 bucket behind nginx, and a load test through it while one replica is
stopped (SIGTERM: it drains) and started again. Everything listens on 127.0.0.1; nothing else is contacted.

    python scripts/replicas.py --replicas 2 --requests 100 --concurrency 8 --out replicas.json
    python scripts/replicas.py --replicas 2 --no-nginx        # only: an adapter uploaded once is served by all

Steps: an S3 server (moto's server mode, unless --endpoint names one) and a bucket; N replicas started with
`--adapters s3://BUCKET/adapters` and each its own cache; one adapter (LoRA-XS over the random tiny base)
uploaded once, after the replicas are up; each replica asked for it directly (all must answer, the same
text: same base, same adapter, greedy); then nginx (`proxy_next_upstream`: a request a stopping replica
refuses goes to another) and --requests completions from --concurrency clients, half on the adapter, while
replica 0 is stopped (after --requests answers), is down and starts again, and --requests answers after
it is back. Prints (and writes to --out) the counts per phase: requests, failures, statuses, seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
BASE = "tiny-llama-random"
BUCKET = "fleet"
ADAPTER = "fleet_adapter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout: float, what: str, poll: float = 0.1) -> None:
    """Poll `check` until it is true; RuntimeError naming `what` after `timeout` seconds (a failsafe)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Replica:
    """One `lorakit serve` process on 127.0.0.1:port over the bucket."""

    def __init__(self, index: int, port: int, workdir: Path, env: dict[str, str]) -> None:
        self.index, self.port, self.env = index, port, env
        self.cache = workdir / f"cache{index}"
        self.log = workdir / f"replica{index}.log"
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "lorakit", "serve", "--base", BASE, "--adapters", f"s3://{BUCKET}/adapters",
                   "--adapter-cache", str(self.cache), "--host", "127.0.0.1", "--port", str(self.port),
                   "--max-batch", "8", "--drain-timeout", "20", "--max-tokens-limit", "64"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float = 180) -> None:
        def up() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"replica {self.index} exited ({self.process.returncode}); log: {self.log}")
            return healthy(self.url)

        wait_until(up, timeout, f"replica {self.index} on {self.url}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (the server drains its running requests) and wait for the exit; returns its code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def nginx_config(workdir: Path, port: int, upstreams: list[int]) -> Path:
    """An nginx config for an unprivileged run: everything under `workdir`, loopback ports only. A request
    that a replica refuses (connection refused or reset, 502/503 while it stops) is retried on another."""
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;" for p in upstreams)
    conf = workdir / "nginx.conf"
    conf.write_text(f"""worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/body; proxy_temp_path {workdir}/proxy; fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi; scgi_temp_path {workdir}/scgi;
    upstream lorakit {{
{servers}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://lorakit;
            proxy_http_version 1.1;
            proxy_buffering off;                       # server-sent events pass as they come
            proxy_read_timeout 120s;
            proxy_connect_timeout 2s;
            # completions have no side effects: a request refused by a stopping replica goes to the next one
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries {len(upstreams) + 1};
        }}
    }}
}}
""")
    return conf


def start_s3(endpoint: str | None):
    """(endpoint URL, a stop function): moto's server on 127.0.0.1 unless `endpoint` is given."""
    if endpoint:
        return endpoint, lambda: None
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return f"http://{host}:{port}", server.stop


def make_adapter(workdir: Path) -> Path:
    """A LoRA-XS adapter (random non-zero cores) over the seeded random base every replica builds."""
    import lorakit
    from lorakit.io import save_adapter
    from lorakit.serve.base_loader import load_serving_base

    model, _ = load_serving_base(BASE)
    lorakit.attach(model, lorakit.LoraXSConfig(r=4, init_std=0.3), ADAPTER)
    return save_adapter(model, ADAPTER, workdir / "upload" / ADAPTER)


def ask(url: str, model: str, prompt: str, max_tokens: int, timeout: float = 120) -> tuple[int, str]:
    import httpx

    try:
        r = httpx.post(f"{url}/v1/completions", timeout=timeout,
                       json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                             "ignore_eos": True})
    except httpx.HTTPError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.text)


def load_test(url: str, replica: Replica, phase_requests: int, concurrency: int, max_tokens: int,
              time_limit: float, max_requests: int) -> dict:
    """Completions through `url` from `concurrency` threads, in three phases: `phase_requests` answered
    before `replica` is stopped; every one answered while it drains, is down and starts again; then
    `phase_requests` more after it is healthy. Bounded by `max_requests` and `time_limit` seconds."""
    statuses: dict[str, dict[str, int]] = {"before": {}, "while stopped": {}, "after": {}}
    errors: list[str] = []
    lock = threading.Lock()
    phase = ["before"]
    counts = {"before": 0, "while stopped": 0, "after": 0}
    before_done, finished = threading.Event(), threading.Event()
    events: list[tuple[str, float]] = []
    sent = [0]
    start = time.monotonic()

    def worker() -> None:
        while not finished.is_set():
            with lock:
                if sent[0] >= max_requests or time.monotonic() - start > time_limit:
                    finished.set()
                    return
                sent[0] += 1
                i = sent[0]
            status, text = ask(url, ADAPTER if i % 2 else BASE, f"request {i}", max_tokens)
            with lock:
                now = phase[0]
                statuses[now][str(status)] = statuses[now].get(str(status), 0) + 1
                counts[now] += 1
                if status != 200:
                    errors.append(f"{now}: {status}: {text[:200]}")
                if now == "before" and counts[now] >= phase_requests:
                    before_done.set()
                if now == "after" and counts[now] >= phase_requests:
                    finished.set()

    def bounce() -> None:
        if not before_done.wait(time_limit):
            return
        with lock:
            phase[0] = "while stopped"
        events.append(("sigterm", time.monotonic() - start))
        code = replica.stop()
        events.append((f"exited {code}", time.monotonic() - start))
        replica.start()
        replica.wait_healthy()
        events.append(("healthy again", time.monotonic() - start))
        with lock:
            phase[0] = "after"

    bouncer = threading.Thread(target=bounce, daemon=True)
    bouncer.start()
    workers = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.monotonic() - start
    bouncer.join(300)
    total = sum(counts.values())
    ok = sum(by.get("200", 0) for by in statuses.values())
    return {"requests": total, "concurrency": concurrency, "max_tokens": max_tokens, "failed": total - ok,
            "by_phase": statuses, "errors": errors[:10], "seconds": round(seconds, 2),
            "requests_per_s": round(total / seconds, 2),
            "replica_events": [(what, round(t, 2)) for what, t in events],
            "bounced": len(events) == 3 and counts["after"] >= phase_requests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=100,
                        help="requests answered before the stop, and again after the restart")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests sent at most")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300, help="seconds after which no request is sent")
    parser.add_argument("--endpoint", default=None, help="an S3 endpoint on 127.0.0.1 (default: start moto)")
    parser.add_argument("--no-nginx", action="store_true", help="only check that every replica serves the upload")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.replicas < 2:
        parser.error("--replicas must be >= 2 (one is stopped during the load test)")
    if not args.no_nginx and shutil.which("nginx") is None:
        parser.error("nginx not found (Debian: apt-get install -y nginx), or pass --no-nginx")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log
    env = {**os.environ, **AWS_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    workdir = Path(tempfile.mkdtemp(prefix="lorakit-replicas-"))
    os.chmod(workdir, 0o755)  # nginx workers may run as another user
    endpoint, stop_s3 = start_s3(args.endpoint)
    env["AWS_ENDPOINT_URL"] = endpoint
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL=endpoint)
    replicas = [Replica(i, free_port(), workdir, env) for i in range(args.replicas)]
    nginx = None
    result: dict = {"replicas": args.replicas, "workdir": str(workdir)}
    try:
        from lorakit.serve.object_store import s3_client, upload_adapter

        s3_client().create_bucket(Bucket=BUCKET)
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_healthy()
        upload_adapter(make_adapter(workdir), f"s3://{BUCKET}/adapters", ADAPTER)  # once, after they are up
        answers = [ask(r.url, ADAPTER, "hello", 8) for r in replicas]
        result["served_by_every_replica"] = all(status == 200 for status, _ in answers)
        result["same_text_on_every_replica"] = len({text for _, text in answers}) == 1
        result["answers"] = answers
        if not args.no_nginx:
            port = free_port()
            conf = nginx_config(workdir, port, [r.port for r in replicas])
            nginx = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
            gateway = f"http://127.0.0.1:{port}"
            wait_until(lambda: healthy(gateway), 30, f"nginx on {gateway}")
            result["load"] = load_test(gateway, replicas[0], args.requests, args.concurrency, args.max_tokens,
                                       args.time_limit, args.max_requests)
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(30)
        for replica in replicas:
            replica.kill()
        stop_s3()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = result.get("served_by_every_replica") and result.get("same_text_on_every_replica")
    if "load" in result:
        ok = ok and result["load"]["failed"] == 0 and result["load"]["bounced"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
