"""`pathguard serve` and `pathguard bench` as real processes on the committed MNIST bundle."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.service.conftest import MNIST_BUNDLE, _free_port


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATHGUARD_") or k.endswith("_DIR")}
    env["PATHGUARD_WARMUP_ROUNDS"] = "1"
    return env


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, "pathguard serve exited early"
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/v2/health/ready")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError("server never became ready")


def test_serve_answers_over_http(digits, tmp_path):
    port = _free_port()
    cmd = [sys.executable, "-m", "pathguard.service.cli", "serve", "--port", str(port), "--log-level", "warning"]
    env = {**_env(), "PATHGUARD_SPOOL_PATH": str(tmp_path / "spool.jsonl")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)  # default bundle: artifacts/mnist-lenet5
    try:
        _wait_ready(proc, port)
        png, label = digits[0]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/detect", body=png, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200
        assert body["prediction"]["class_index"] == label and body["model"]["name"] == "mnist-lenet5"
        assert isinstance(body["verdict"]["adversarial"], bool)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_serve_refuses_a_tampered_bundle(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(MNIST_BUNDLE, bundle)
    victim = sorted(p for p in bundle.iterdir() if p.suffix == ".npz")[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "pathguard.service.cli", "serve", "--bundle", str(bundle), "--port", str(_free_port())]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert victim.name in done.stderr


def test_bench_writes_a_table(tmp_path):
    out, raw = tmp_path / "bench.md", tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pathguard.service.cli", "bench", "--requests", "16", "--concurrency", "1", "4"]
    cmd += ["--checks", "parallel", "graph", "--images", "16", "--warmup", "4", "--rounds", "2"]
    cmd += ["--out", str(out), "--json", str(raw)]
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, timeout=240, capture_output=True)
    report = json.loads(raw.read_text())
    cells = {(r["checks"], r["route"], r["concurrency"]) for r in report["rows"]}
    assert cells == {(m, r, c) for m in ("parallel", "graph") for r in ("predict", "detect") for c in (1, 4)}
    assert all(r["requests"] == 16 and 0 < r["p50_ms"] <= r["p99_ms"] for r in report["rows"])
    assert {(q["checks"], q["concurrency"]) for q in report["ratios"]} == {(m, c) for m in ("parallel", "graph")
                                                                           for c in (1, 4)}  # fmt: skip
    assert all(q["throughput_ratio"] > 0 for q in report["ratios"])
    for r in report["rows"]:  # the server's own stage times, as its responses reported them
        stages = {"decode", "queue", "classify", "total"} | (
            {"checks", "checks_wait", "nic", "effective_path", "consistency"} if r["route"] == "detect" else set()
        )
        assert set(r["server_ms"]) == stages, r
    text = out.read_text()
    assert "| mnist-lenet5 | parallel | /v1/detect | 1 |" in text and "p50(detect) / p50(predict)" in text
    assert "| mnist-lenet5 | graph | /v1/detect | 4 |" in text and "| effective_path |" in text


def test_serve_answers_413_to_a_chunked_body_over_the_limit(digits, tmp_path):
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "pathguard.service.cli", "serve", "--port", str(port), "--log-level", "warning"]
    env = {**_env(), "PATHGUARD_SPOOL_PATH": str(tmp_path / "spool.jsonl"), "PATHGUARD_MAX_BODY_BYTES": "65536"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)

    def chunks(data: bytes):
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    try:
        _wait_ready(proc, port)
        big = b"[" + b"0," * 40_000 + b"0]"  # 80 kB
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            for route, ctype in (("/v1/detect", "image/png"), ("/v2/models/mnist-lenet5/infer", "application/json")):
                r = client.post(route, content=chunks(big), headers={"content-type": ctype})
                assert "content-length" not in r.request.headers, route
                assert r.status_code == 413 and r.json() == {"error": "request body exceeds the limit of 65536 bytes"}
            png, label = digits[0]
            r = client.post("/v1/detect", content=chunks(png), headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["prediction"]["class_index"] == label
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _tampered_bundle(tmp_path) -> str:
    bundle = tmp_path / "tampered"
    shutil.copytree(MNIST_BUNDLE, bundle)
    victim = bundle / "ep_score.npz"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    return str(bundle)


def _classifier_folder(tmp_path, arch: str | None) -> str:
    """A classifier folder: none of its files (arch None), or the real weights with ``arch`` in classifier.json."""
    folder = tmp_path / "classifier"
    folder.mkdir()
    if arch is not None:
        source = ROOT / "artifacts" / "classifiers" / "mnist-lenet5"
        meta = json.loads((source / "classifier.json").read_text())
        meta["config"]["arch"] = arch
        (folder / "classifier.json").write_text(json.dumps(meta))
        shutil.copy(source / "classifier.safetensors", folder)
    return str(folder)


def _build(t, classifier: str | None = None) -> list[str]:
    extra = ["--classifier", classifier] if classifier else []
    return ["build", "--dataset", "mnist", *extra, "--out", str(t / "o")]


USER_MISTAKES = {
    # name: (argv from tmp_path, extra environment from tmp_path, words the message must contain)
    "missing bundle folder": (lambda t: ["score", str(t / "nope")], lambda t: {}, ["does not exist", "build"]),
    "folder without classifier.json": (
        lambda t: _build(t, _classifier_folder(t, None)),
        lambda t: {},
        ["classifier.json", "pathguard train"],
    ),
    "unknown architecture": (
        lambda t: _build(t, _classifier_folder(t, "vgg99")),
        lambda t: {},
        ["unknown architecture 'vgg99'", "lenet5"],
    ),
    "bundle that fails verification": (
        lambda t: ["score", _tampered_bundle(t), "--n", "10"],
        lambda t: {},
        ["ep_score.npz", "sha256", "rebuild"],
    ),
    "missing PATHGUARD_DATA_DIR data": (
        lambda t: _build(t),
        lambda t: {"PATHGUARD_DATA_DIR": str(t / "no-data")},
        ["missing dataset file", "train-images", "PATHGUARD_DATA_DIR", "pathguard download mnist"],
    ),
    "bad setting": (lambda t: ["serve"], lambda t: {"PATHGUARD_MAX_BODY_BYTES": "lots"}, ["PATHGUARD_MAX_BODY_BYTES"]),
}


@pytest.mark.parametrize("mistake", list(USER_MISTAKES))
def test_user_mistakes_are_one_line_and_exit_2(mistake, tmp_path):
    make_argv, env, words = USER_MISTAKES[mistake]
    argv = make_argv(tmp_path)
    cmd = [sys.executable, "-m", "pathguard.service.cli", *argv]
    done = subprocess.run(cmd, cwd=ROOT, env={**_env(), **env(tmp_path)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith(f"pathguard {argv[0]}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "o").exists()  # a failed build writes no bundle


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "pathguard.service.cli", "--debug", "score", str(tmp_path / "nope")]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.returncode != 2
    assert "Traceback (most recent call last)" in done.stderr
    assert "BundleError: bundle folder" in done.stderr


def test_bench_refuses_two_bundles_it_would_label_alike(tmp_path):
    """Rows and ratios are labelled by the bundle's folder name: two folders of one name are refused before any
    server starts."""
    from pathguard.models.evaluation.bench_http import BenchConfig, run_bench

    a, b = tmp_path / "a" / "mnist-lenet5", tmp_path / "b" / "mnist-lenet5"
    with pytest.raises(ValueError, match=r"folders named \['mnist-lenet5'\]"):
        run_bench(BenchConfig(bundles=[a, b], modes=("guarded",)))
