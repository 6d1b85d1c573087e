"""Fixtures for the service tests: apps on the committed MNIST bundle, real MNIST PNGs, real redis-servers."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from pathguard.service.app import create_app
from pathguard.service.settings import Settings
from tests.conftest import ARTIFACTS

MNIST_BUNDLE = ARTIFACTS / "mnist-lenet5"
REDIS_URL = "redis://127.0.0.1:6379"


def png_bytes(x: np.ndarray, mode: str = "L") -> bytes:
    """Encode a float (C, H, W) image in [0, 1] as PNG (grayscale for C = 1)."""
    arr = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    """The committed MNIST LeNet-5 bundle."""
    return MNIST_BUNDLE


@pytest.fixture(scope="session")
def digits(mnist_test) -> list[tuple[bytes, int]]:
    """The first 32 MNIST test images as PNG bytes with their labels."""
    return [(png_bytes(mnist_test.x[i]), int(mnist_test.y[i])) for i in range(32)]


@pytest.fixture
def make_client(tmp_path, bundle_dir) -> Iterator[Callable[..., TestClient]]:
    """``make_client(**settings)`` -> a started ``TestClient`` (lifespan run) on the MNIST bundle."""
    clients: list[TestClient] = []

    def make(**overrides: object) -> TestClient:
        base: dict[str, object] = {
            "bundle": bundle_dir,
            "spool_path": tmp_path / "spool.jsonl",
            "warmup_rounds": 1,
            "redis_url": None,
            "noise_seed": 0,  # the bundle's noise copies seeded: repeated requests compare equal
        }
        client = TestClient(create_app(Settings(**{**base, **overrides})))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in reversed(clients):
        c.__exit__(None, None, None)


@pytest.fixture
def redis_db(request) -> Iterator[tuple[str, redis.Redis]]:
    """A flushed database on the shared redis-server (127.0.0.1:6379), one number per test module."""
    db = 12 + sum(map(ord, request.node.module.__name__)) % 4
    url = f"{REDIS_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on a spare port that a test can stop and restart."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is required for the Redis tests"
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen([*args, "--dir", str(self.workdir)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
