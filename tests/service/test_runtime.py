"""Classifier engines, parallel vs serial layer checks and the micro-batcher."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from pathguard.models.nic import layer_activation
from pathguard.service.errors import Overloaded
from pathguard.service.runtime import DetectionRuntime, MicroBatcher, OnnxEngine, TorchEngine


@pytest.fixture(scope="module")
def bundle(bundle_dir):
    from pathguard.models.bundle import load_bundle

    return load_bundle(bundle_dir, seed=0)  # the noise copies seeded: runs compare equal


def test_engines_agree_and_report_taps_in_forward_order(bundle, mnist_test):
    x = mnist_test.x[:4]
    split = bundle.pipeline.checked_taps
    onnx_engine = OnnxEngine(bundle.onnx_bytes, split)
    assert len(onnx_engine.stages) >= len(split)  # one stage per cut (+ the tail)
    torch_engine = TorchEngine(bundle.classifier)
    with torch.no_grad():
        ref_logits, ref_taps = bundle.classifier.forward_with_taps(torch.from_numpy(x))
    for engine in (onnx_engine, torch_engine):
        seen: list[str] = []
        logits, taps = engine.forward(x, lambda name, act, seen=seen: seen.append(name))
        assert seen == list(ref_taps) == list(taps)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
        for name in ref_taps:
            torch.testing.assert_close(taps[name], ref_taps[name], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(engine.logits(x), ref_logits.numpy(), atol=1e-4)
        serial_logits, _ = engine.forward(x)
        torch.testing.assert_close(serial_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_onnx_stage_checks_start_before_the_forward_pass_ends(bundle, mnist_test):
    """Each checked tap is handed out before the next stage runs."""
    engine = OnnxEngine(bundle.onnx_bytes, bundle.pipeline.checked_taps)
    events: list[str] = []

    class Recorder:
        def __init__(self, stage):
            self.stage = stage

        def run(self, outputs, feeds):
            events.append(f"run:{self.stage.input_name}")
            return self.stage_session.run(outputs, feeds)

    for stage in engine.stages:
        rec = Recorder(stage)
        rec.stage_session = stage.session
        object.__setattr__(stage, "session", rec)
    engine.forward(mnist_test.x[:1], lambda name, act: events.append(f"tap:{name}"))
    first_cut = bundle.pipeline.checked_taps[0]
    assert events.index(f"tap:{first_cut}") < events.index(f"run:{first_cut}") < len(events) - 1


def test_parallel_and_serial_checks_give_identical_results(bundle, mnist_test):
    x = mnist_test.x[:8]
    results = {}
    for parallel in (True, False):
        for engine in (OnnxEngine(bundle.onnx_bytes, bundle.pipeline.checked_taps), TorchEngine(bundle.classifier)):
            runtime = DetectionRuntime(engine, bundle.pipeline, worker_threads=2, parallel=parallel)
            try:
                det = runtime.detect(x)
            finally:
                runtime.close()
            results[(parallel, engine.name)] = det
    ref = bundle.pipeline.detect(torch.from_numpy(x))
    for key, det in results.items():
        for i in range(len(x)):
            assert _numbers(det.result.row(i)) == pytest.approx(_numbers(ref.row(i)), abs=1e-4), key
        np.testing.assert_allclose(det.probabilities, ref.probabilities, atol=1e-5)
        assert det.classify_s > 0 and det.checks_s > 0


def test_onnx_engine_returns_nic_scores_beside_the_logits(bundle, mnist_test):
    x = mnist_test.x[:16]
    nic = bundle.pipeline.nic
    engine = OnnxEngine(bundle.onnx_bytes, [], nic=nic)
    plain = OnnxEngine(bundle.onnx_bytes, [])
    assert engine.computes_nic and not plain.computes_nic and not TorchEngine(bundle.classifier).computes_nic
    logits, taps, scores = engine.forward_with_nic(x)
    ref_logits, ref_taps = plain.forward(x)
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)  # the classifier part is the same graph
    assert list(taps) == list(ref_taps)
    for name in taps:
        torch.testing.assert_close(taps[name], ref_taps[name], atol=0, rtol=0)
    np.testing.assert_array_equal(engine.logits(x), plain.logits(x))
    acts = {n: layer_activation(n, torch.from_numpy(x), logits, taps) for n in nic.layers_}
    value = nic.raw_scores(acts)[0]
    assert scores.value.shape == (16, len(nic.layers_)) and scores.value.dtype == torch.float64
    torch.testing.assert_close(scores.value, value, atol=1e-4, rtol=1e-5)
    assert scores.head_logits.shape == (16, len(nic.layers_), nic.n_classes_)
    for j, name in enumerate(nic.layers_):
        probs = nic.head_probs(name, nic.reduce(name, acts[name]))
        # float32 in two runtimes (onnxruntime's kernels split their sums by its thread pool): a few 1e-5 apart
        torch.testing.assert_close(torch.softmax(scores.head_logits[:, j], -1), probs, atol=5e-5, rtol=0)
    assert scores.provenance is None and scores.final is None  # the provenance checks run in the pipeline
    with pytest.raises(RuntimeError):
        plain.forward_with_nic(x)


def test_nic_in_the_graph_gives_the_per_layer_checks_results(bundle, mnist_test):
    """300 real test images, batches of 100: equal verdicts; every reported number within 1e-5 except on the few
    images where float32 rounding moves a score across a calibration score (a step of 1/(n+1) in a violation
    probability); the softmax layer's check (torch's in both) exactly equal."""
    pipe = bundle.pipeline
    classic = DetectionRuntime(OnnxEngine(bundle.onnx_bytes, pipe.checked_taps), pipe, 2, parallel=True)
    graph = DetectionRuntime(OnnxEngine(bundle.onnx_bytes, [], nic=pipe.nic), pipe, 2, parallel=True)
    off, worst, step = 0, 0.0, 1.0 / (pipe.nic.calibration_size + 1)
    try:
        for lo in range(0, 300, 100):
            a, g = classic.detect(mnist_test.x[lo : lo + 100]), graph.detect(mnist_test.x[lo : lo + 100])
            np.testing.assert_array_equal(g.result.adversarial, a.result.adversarial)
            np.testing.assert_array_equal(g.result.value_violation["softmax"], a.result.value_violation["softmax"])
            np.testing.assert_array_equal(g.probabilities, a.probabilities)
            for i in range(100):
                d = np.abs(np.subtract(_numbers(g.result.row(i)), _numbers(a.result.row(i)))).max()
                off, worst = off + int(d > 1e-5), max(worst, float(d))
    finally:
        classic.close()
        graph.close()
    # measured: 7 of these 300 on the retrained LeNet-5's bundle (10 of 2000 on the earlier one), each by one step
    assert off <= 9 and worst <= 2 * step
    assert graph.pipeline is pipe and "nic" in g.result.timings_s


def test_nic_in_the_graph_in_shadow_mode(bundle, mnist_test):
    x = mnist_test.x[:4]
    runtime = DetectionRuntime(OnnxEngine(bundle.onnx_bytes, [], nic=bundle.pipeline.nic), bundle.pipeline, 2, True)
    try:
        started = runtime.detect_shadow(x)
        assert started.detection is not None
        shadow, enforced = started.detection.result(timeout=30), runtime.detect(x)
    finally:
        runtime.close()
    np.testing.assert_array_equal(shadow.result.score, enforced.result.score)
    np.testing.assert_array_equal(started.classified.probabilities, enforced.probabilities)


def _numbers(row: dict) -> list[float]:
    ep, nic, v = row["effective_path"], row["nic"], row["verdict"]
    return [
        *ep["rank1_similarity"],
        *ep["rank2_similarity"],
        ep["score"],
        *nic["value_violation"].values(),
        *nic["provenance_violation"].values(),
        nic["score"],
        v["score"],
        v["p_value"],
        float(v["adversarial"]),
    ]


def _run(coro):
    return asyncio.run(coro)


def test_micro_batcher_batches_queued_requests_and_splits_results():
    calls: list[int] = []
    gate = threading.Event()

    def work(x: np.ndarray) -> np.ndarray:
        gate.wait(5)
        calls.append(len(x))
        return x[:, 0, 0, 0] * 10

    async def scenario():
        batcher = MicroBatcher("t", work, max_batch=4, max_wait_s=0.0, queue_size=16)
        batcher.start()
        xs = [np.full((1, 1, 1, 1), i, np.float32) for i in range(7)]
        tasks = [asyncio.create_task(batcher.submit(xs[0]))]
        await asyncio.sleep(0.05)  # the first request is running (blocked) ...
        tasks += [asyncio.create_task(batcher.submit(x)) for x in xs[1:]]
        await asyncio.sleep(0.05)  # ... while the other six wait in the queue
        gate.set()
        slices = await asyncio.gather(*tasks)
        await batcher.stop()
        return slices

    slices = _run(scenario())
    assert calls[0] == 1 and calls[1:] == [4, 2]  # never above max_batch, in arrival order
    for i, sl in enumerate(slices):
        assert sl.count == 1 and sl.batch[sl.start] == i * 10


def test_micro_batcher_rejects_when_queue_is_full():
    gate = threading.Event()

    async def scenario():
        batcher = MicroBatcher("t", lambda x: (gate.wait(5), x)[1], 8, 0.0, queue_size=2, retry_after_s=3)
        batcher.start()
        first = asyncio.create_task(batcher.submit(np.zeros((1, 1, 1, 1), np.float32)))
        await asyncio.sleep(0.05)  # running
        queued = [asyncio.create_task(batcher.submit(np.zeros((1, 1, 1, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as err:
            await batcher.submit(np.zeros((1, 1, 1, 1), np.float32))
        gate.set()
        await asyncio.gather(first, *queued)
        await batcher.stop()
        return err.value

    err = _run(scenario())
    assert err.status_code == 503 and err.headers() == {"Retry-After": "3"}


def test_micro_batcher_waits_for_more_when_asked():
    sizes: list[int] = []

    async def scenario():
        batcher = MicroBatcher("t", lambda x: sizes.append(len(x)) or x, 8, max_wait_s=0.2, queue_size=8)
        batcher.start()
        t1 = asyncio.create_task(batcher.submit(np.zeros((1, 1, 1, 1), np.float32)))
        await asyncio.sleep(0.05)
        t2 = asyncio.create_task(batcher.submit(np.zeros((2, 1, 1, 1), np.float32)))
        start = time.perf_counter()
        await asyncio.gather(t1, t2)
        await batcher.stop()
        return time.perf_counter() - start

    _run(scenario())
    assert sizes == [3]


def test_execution_providers_follow_the_setting_with_the_cpu_as_fallback(caplog):
    from pathguard.service.runtime.engines import resolve_providers

    gpu = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["auto"], available=gpu) == gpu
    assert resolve_providers(["auto"], available=["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert not caplog.records  # auto on a CPU-only build: nothing to warn about
    asked = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert resolve_providers(asked, available=gpu) == gpu  # CPU appended as the fallback
    assert "TensorrtExecutionProvider" in caplog.text  # asked for by name and missing: said
    assert resolve_providers(["CPUExecutionProvider"], available=gpu) == ["CPUExecutionProvider"]


def test_the_engine_reports_the_providers_it_runs_on(bundle):
    import onnxruntime as ort

    engine = OnnxEngine(bundle.onnx_bytes, bundle.pipeline.checked_taps, providers=["auto"])
    assert engine.providers[-1] == "CPUExecutionProvider"
    assert set(engine.providers) <= set(ort.get_available_providers())


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
    reason="needs onnxruntime-gpu and a GPU",
)
def test_the_gpu_engine_gives_the_cpu_engines_logits_and_taps(bundle, mnist_test):
    x = mnist_test.x[:32]
    gpu = OnnxEngine(bundle.onnx_bytes, bundle.pipeline.checked_taps, providers=["CUDAExecutionProvider"])
    cpu = OnnxEngine(bundle.onnx_bytes, bundle.pipeline.checked_taps, providers=["CPUExecutionProvider"])
    assert gpu.providers[0] == "CUDAExecutionProvider"
    (lg, tg), (lc, tc) = gpu.forward(x), cpu.forward(x)
    np.testing.assert_allclose(lg.numpy(), lc.numpy(), atol=1e-4)
    for name in tc:
        np.testing.assert_allclose(tg[name].numpy(), tc[name].numpy(), atol=1e-4)


def test_the_providers_setting_reads_a_json_list(monkeypatch):
    from pathguard.service.settings import Settings

    assert Settings().onnx_providers == ["auto"]
    monkeypatch.setenv("PATHGUARD_ONNX_PROVIDERS", '["CUDAExecutionProvider", "CPUExecutionProvider"]')
    assert Settings().onnx_providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setenv("PATHGUARD_ONNX_PROVIDERS", "[]")
    with pytest.raises(ValueError, match="onnx_providers"):
        Settings()
