"""Real object servers on 127.0.0.1 for the streaming tests: moto's standalone S3 server (with or without IAM
credential checks), nginx serving a folder (byte ranges on static files), a GCS emulator, and a small HTTP server
that damages one answer on purpose (a fault injector). Each is started by its test and stopped after; a server that
is not installed makes its tests skip, saying what to install (`make test` installs them: .ci/setup_servers.sh and
the dev extra)."""

import collections
import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:g} s")


def moto_command() -> list:
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    return [exe] if exe else []


class MotoServer:
    """moto_server on a free port: an S3 API holding buckets in memory. By default any credentials are accepted.

    With ``iam_auth=True`` it checks them as S3 does: moto authenticates a request against its IAM users and their
    access keys (signature included) once ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have passed unchecked (a
    count read from its environment, unlimited when unset; ``POST /moto-api/reset-auth`` sets it while it runs, as
    moto's own server-mode tests do). We start it with the count unlimited, make an IAM user allowed ``s3:*`` and
    an access key for it (``self.key``, ``self.secret``), then set the count to 0: from then on a request signed
    with anything else is refused (InvalidAccessKeyId, SignatureDoesNotMatch), and ``client()`` uses that key."""

    def __init__(self, iam_auth: bool = False):
        cmd = moto_command()
        if not cmd:
            pytest.skip("moto_server is not installed (pip install 'moto[server]', part of the dev extra)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.key, self.secret = "testing", "testing"
        env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=env)
        wait_listening(self.port, self.proc, "moto_server")
        if iam_auth:
            try:
                self.key, self.secret = self._make_user("rtdist-reader")
                self._set_unchecked_requests(0)
            except BaseException:
                self.stop()
                raise

    def _make_user(self, name: str) -> tuple:
        """An IAM user allowed every S3 action, and an access key of it: (key id, secret)."""
        import json

        import boto3
        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id="testing",
                           aws_secret_access_key="testing", region_name="us-east-1")
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def _set_unchecked_requests(self, count: int) -> None:
        # not a form (urllib's default type): moto reads the raw body, which a form's parsing would leave empty
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=str(count).encode(), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def upload_dir(self, bucket: str, folder: Path, prefix: str = "") -> str:
        """Every file of ``folder`` into ``s3://bucket/prefix``; returns that URL."""
        client = self.client()
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for path in sorted(folder.iterdir()):
            if path.is_file():
                client.upload_file(str(path), bucket, f"{prefix}{path.name}")
        return f"s3://{bucket}/{prefix}"

    def stop(self) -> None:
        stop_process(self.proc)


class GcsEmulator:
    """gcp-storage-emulator (pure Python, from PyPI; part of the dev extra) on a free port, holding buckets in memory:
    the GCS JSON API that gcsfs speaks, ranged downloads included. gcsfs reaches it through ``endpoint_url`` (or
    ``STORAGE_EMULATOR_HOST``) with ``token: anon``: ``options`` are the ``data.storage_options`` that do that."""

    def __init__(self):
        exe = shutil.which("gcp-storage-emulator",
                           path=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
        if not exe:
            pytest.skip("gcp-storage-emulator is not installed (pip install gcp-storage-emulator gcsfs, part of the "
                        "dev extra)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.options = {"endpoint_url": self.endpoint, "token": "anon", "project": "rtdist-test"}
        self.proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
                                      "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, "gcp-storage-emulator")

    def filesystem(self):
        from gcsfs.core import GCSFileSystem  # the JSON API only (see rtdist.data.remote.Store._make_fs)
        return GCSFileSystem(skip_instance_cache=True, **self.options)

    def upload_dir(self, bucket: str, folder: Path, prefix: str = "") -> str:
        """Every file of ``folder`` into ``gs://bucket/prefix``; returns that URL."""
        fs = self.filesystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        for path in sorted(folder.iterdir()):
            if path.is_file():
                fs.put_file(str(path), f"{bucket}/{prefix}{path.name}")
        return f"gs://{bucket}/{prefix}"

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def nginx_binary():
    return shutil.which("nginx", path=os.environ["PATH"] + os.pathsep + "/usr/sbin:/sbin")


class Nginx:
    """nginx serving ``root`` on a free port of 127.0.0.1 (Range requests on static files are nginx's default).
    ``stop()``/``start()`` end and restart it on the same port (a server that goes away and comes back);
    ``freeze()``/``thaw()`` SIGSTOP/SIGCONT it (a server that accepts connections and never answers)."""

    def __init__(self, root: Path, workdir: Path):
        self.binary = nginx_binary()
        if not self.binary:
            pytest.skip("nginx is not installed (apt-get install nginx-light; `make test` does it as root)")
        self.root, self.dir = Path(root), Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.conf = self.dir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""  # tmp folders are 0700: workers must read as us
        temp = "\n".join(f"    {k}_temp_path {self.dir / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                           "scgi"))
        self.conf.write_text(f"""{user}worker_processes 1;
daemon off;
pid {self.dir / 'nginx.pid'};
error_log {self.dir / 'error.log'};
events {{ worker_connections 64; }}
http {{
    access_log off;
{temp}
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
}}
""")
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_listening(self.port, self.proc, "nginx")

    def _group(self, sig) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # master ends its workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._group(signal.SIGKILL)
                self.proc.wait()

    def freeze(self) -> None:
        self._group(signal.SIGSTOP)

    def thaw(self) -> None:
        self._group(signal.SIGCONT)

    def get(self, name: str, headers=None) -> bytes:
        req = urllib.request.Request(f"{self.url}/{name}", headers=headers or {})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read()


class DamagingServer:
    """A fault injector, not a general server: a threaded HTTP server on 127.0.0.1 (in the test's process) serving
    the files of ``root`` with HEAD and single byte ranges, that sends a damaged copy of each object named in
    ``damaged`` (one byte flipped at ``offset``) in answer to the first request for the whole object (no Range, or
    a range from byte 0 to its end), and the true bytes to every other request.

    A shard smaller than the cache's download chunk is downloaded by ``data.cache_dir`` in one such request, while
    the reader's range reads never ask for a whole shard of more than 64 KB from byte 0 (their first window): so
    the download meets the damage once and the range reads never. ``whole_gets[name]`` counts the requests for the
    whole of each object."""

    def __init__(self, root: Path, damaged=(), offset: int = 0):
        self.root, self.damaged, self.offset = Path(root), set(damaged), offset
        self.whole_gets = collections.Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # no line per request on the test's stderr
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool):
                name = self.path.lstrip("/").split("?", 1)[0]
                path = server.root / name
                if "/" in name or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end = 0, len(data)  # [start, end)
                ranged = self.headers.get("Range")
                if ranged:
                    m = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
                    if not m or int(m.group(1)) >= len(data):
                        self.send_error(416)
                        return
                    start = int(m.group(1))
                    end = min(len(data), int(m.group(2)) + 1) if m.group(2) else len(data)
                if body and start == 0 and end == len(data):
                    with server._lock:
                        server.whole_gets[name] += 1
                        first = server.whole_gets[name] == 1
                    if first and name in server.damaged:
                        data = bytearray(data)
                        data[server.offset] ^= 1
                        data = bytes(data)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="damaging-server", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(10)
