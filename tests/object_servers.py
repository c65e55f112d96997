"""Real object servers on 127.0.0.1 for the streaming tests: moto's standalone S3 server and nginx serving a folder
(byte ranges on static files). Each is started as its own process and stopped after; a server that is not installed
makes its tests skip, saying what to install (`make test` installs both: .ci/setup_servers.sh)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
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
    """moto_server on a free port: an S3 API (any credentials are accepted) holding buckets in memory."""

    def __init__(self):
        cmd = moto_command()
        if not cmd:
            pytest.skip("moto_server is not installed (pip install 'moto[server]', part of the dev extra)")
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, "moto_server")

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
