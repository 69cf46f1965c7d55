"""A real Orthanc PACS (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the DICOMweb tests.

Orthanc listens on every interface of its network namespace and has no bind-address setting, so
it runs in a network namespace of its own (``unshare --net``) whose only interface is loopback:
nothing outside this machine can reach it. The tests reach it through a small forwarder that
listens on 127.0.0.1 (a free port) and opens each upstream connection inside that namespace
(``setns`` on the forwarding thread only). Storage is a temporary folder; ``stop()`` ends the
server and the forwarder.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import requests

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
_CLONE_NEWNET = 0x40000000
_INNER_PORT = 8042


def available() -> str | None:
    """None when Orthanc, its DICOMweb plugin and network namespaces are usable, else why not."""
    for path in (ORTHANC, DICOMWEB_PLUGIN):
        if not Path(path).exists():
            return f"{path} is missing; install Debian's orthanc and orthanc-dicomweb (make setup does)"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare/ip missing; install util-linux and iproute2"
    return None


class OrthancServer:
    """One Orthanc in its own loopback-only network namespace, reached on 127.0.0.1:``port``."""

    def __init__(self, folder: Path, user: str = "medsegai", password: str = "test-password", lua: str | None = None) -> None:
        self.folder = Path(folder)
        self.user, self.password = user, password
        self.lua = lua
        self.process: subprocess.Popen | None = None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """DICOMweb service root."""
        return f"http://127.0.0.1:{self.port}/dicom-web"

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "medsegai-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": _INNER_PORT,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
            "HttpDescribeErrors": True,
            "StableAge": 1,
        }
        if self.lua is not None:
            script = self.folder / "filter.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        return path

    def start(self, timeout: float = 30) -> OrthancServer:
        """Start Orthanc (again, on the same storage) and wait until it answers."""
        config = self._config()
        log = open(self.folder / "orthanc.log", "ab")
        self.process = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", f'ip link set lo up && exec "{ORTHANC}" "$0"', str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        if self._thread is None:
            self._thread = threading.Thread(target=self._forward, daemon=True)
            self._thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.rest}/system", auth=(self.user, self.password), timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        """End Orthanc (its storage stays for a later ``start``)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        """Stop Orthanc and the forwarder."""
        self.stop()
        self._stop.set()
        self._listener.close()

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API."""
        for path in files:
            response = requests.post(f"{self.rest}/instances", data=path.read_bytes(), auth=(self.user, self.password), timeout=30)
            response.raise_for_status()

    def get(self, route: str) -> Any:
        response = requests.get(f"{self.rest}{route}", auth=(self.user, self.password), timeout=30)
        response.raise_for_status()
        return response.json()

    def delete_everything(self) -> None:
        for study in self.get("/studies"):
            requests.delete(f"{self.rest}/studies/{study}", auth=(self.user, self.password), timeout=30).raise_for_status()

    # forwarding: 127.0.0.1:port (this namespace) -> 127.0.0.1:8042 (Orthanc's namespace)
    def _upstream(self) -> socket.socket | None:
        process = self.process
        if process is None or process.poll() is not None:
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/proc/{process.pid}/ns/net", os.O_RDONLY)
        except OSError:
            os.close(own)
            return None
        try:
            if libc.setns(target, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns failed")
            try:
                return socket.create_connection(("127.0.0.1", _INNER_PORT), timeout=5)
            except OSError:
                return None
            finally:
                libc.setns(own, _CLONE_NEWNET)
        finally:
            os.close(target)
            os.close(own)

    def _forward(self) -> None:
        self._listener.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
            upstream = self._upstream()
            if upstream is None:
                client.close()  # server down: the client sees the connection dropped
                continue
            upstream.settimeout(None)
            client.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(1 << 16)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
