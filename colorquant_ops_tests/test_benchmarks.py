"""Smoke tests of the benchmark harness (``python -m benchmarks``) on tiny shapes, CPU only.

They check that every section runs end to end, that the formulations it
times agree with the fused op (and that a wrong one is caught), that the
measurements are plausible, and that the targets are judged correctly.
"""

import os
import sys

import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # benchmarks/ is a top-level package of the checkout, not installed
    sys.path.insert(0, ROOT)

from benchmarks import bench_colorcnn, bench_ops, bench_quantizers, main  # noqa: E402
from benchmarks.common import NotRun, TimingPolicy, peak_memory, time_calls  # noqa: E402

CPU = torch.device("cpu")
POLICY = TimingPolicy(max_repeats=2, min_repeats=1, budget_s=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads; one thread keeps these tests fast
    where other processes load the CPU (OpenMP barriers stall when a peer is descheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("op,mode", bench_ops.OP_PASSES, ids=["-".join(p) for p in bench_ops.OP_PASSES])
def test_op_case_runs_and_formulations_agree(op, mode, dtype):
    case = bench_ops.OpCase(op, mode, 2, 5, 8, 8, dtype)
    names = ("fused", "paper", "eager", "expanded")
    result = bench_ops.run_case(case, CPU, POLICY, log=lambda msg: None, formulations=names)
    assert result.mismatches == []
    for name in names:
        if not bench_ops.has_formulation(op, name):
            assert result.seconds[name].reason == "n/a"
            continue
        assert isinstance(result.seconds[name], float) and result.seconds[name] > 0
        peak = result.peak_bytes[name]
        assert isinstance(peak, NotRun) or peak >= 0


def test_distance_formulations():
    """palette_distance: eager (broadcast) and expanded (einsum) exist, no paper formulation;
    the expanded form is caught by the check when wrong; min_bytes counts inputs and outputs once."""
    assert [n for n in bench_ops.FORMULATIONS if bench_ops.has_formulation("distance", n)] == [
        "fused", "eager", "compiled", "expanded"]
    assert all(not bench_ops.has_formulation(op, "expanded") for op in ("soft", "hard", "render"))
    with pytest.raises(ValueError, match="formulation of distance"):
        bench_ops.formulation("distance", "paper")
    case = bench_ops.OpCase("distance", "fwd+bwd", 2, 4, 8, 8, torch.float32)
    (image, palette, grad), = bench_ops.make_inputs(case, CPU, 1)
    results = {name: bench_ops._first_image(bench_ops.runner(bench_ops.formulation("distance", name), case.mode)(
        image, palette, grad)) for name in ("fused", "eager", "expanded")}
    for name in ("eager", "expanded"):
        assert bench_ops._compare(name, results[name], results["fused"], torch.float32, "distance") is None
    wrong = (results["expanded"][0], results["expanded"][1] * 1.01)
    assert "grad_palette differs" in bench_ops._compare("expanded", wrong, results["fused"], torch.float32, "distance")
    g_x, g_p = bench_ops.runner(bench_ops.formulation("distance", "fused"), "fwd+bwd")(image, palette, grad)
    out = bench_ops.formulation("distance", "fused")(image, palette)
    assert case.min_bytes() == sum(t.nbytes for t in (image, palette, grad, out, g_x, g_p))


def test_compiled_formulation_is_timed_and_checked(fresh_dynamo):
    case = bench_ops.OpCase("render", "fwd", 2, 3, 8, 8, torch.float32)  # the smallest graph to compile
    result = bench_ops.run_case(case, CPU, POLICY, log=lambda msg: None, formulations=("fused", "compiled"))
    assert result.mismatches == []
    assert isinstance(result.seconds["compiled"], float)


def test_wrong_formulation_is_reported_as_mismatch():
    case = bench_ops.OpCase("soft", "fwd", 2, 4, 8, 8, torch.float32)
    (logits, image), = bench_ops.make_inputs(case, CPU, 1)
    fused = bench_ops._first_image(bench_ops.runner(bench_ops.formulation("soft", "fused"), "fwd")(logits, image))
    paper = bench_ops._first_image(bench_ops.runner(bench_ops.formulation("soft", "paper"), "fwd")(logits, image))
    assert bench_ops._compare("paper", paper, fused, torch.float32) is None
    wrong = (paper[0] * 1.01, *paper[1:])
    assert "output 0 differs" in bench_ops._compare("paper", wrong, fused, torch.float32)


def test_inputs_are_random_and_rotated():
    case = bench_ops.OpCase("soft", "fwd+bwd", 2, 4, 8, 8, torch.float32)
    buffers = bench_ops.make_inputs(case, CPU)
    assert len(buffers) >= 2
    logits, image, *grads = buffers[0]
    assert logits.requires_grad and image.requires_grad and len(grads) == 3
    assert all(t.ne(0).all() for t in (logits, *grads)) and image.gt(0).all()
    assert not torch.equal(buffers[0][0], buffers[1][0])


def test_min_bytes_counts_inputs_and_outputs_once():
    case = bench_ops.OpCase("soft", "fwd", 2, 4, 8, 8, torch.float32)
    logits, image = bench_ops.make_inputs(case, CPU, 1)[0]
    outputs = bench_ops.formulation("soft", "fused")(logits, image)
    assert case.min_bytes() == sum(t.nbytes for t in (logits, image, *outputs))
    render = bench_ops.OpCase("render", "fwd", 2, 4, 8, 8, torch.bfloat16)
    index_map, palette = bench_ops.make_inputs(render, CPU, 1)[0]
    out = bench_ops.formulation("render", "fused")(index_map, palette)
    assert render.min_bytes() == index_map.nbytes + palette.nbytes + out.nbytes


def test_peak_memory_sees_a_large_allocation():
    n = 64 << 20  # bytes
    peak = peak_memory(lambda: torch.ones(n // 4), (), CPU)
    if isinstance(peak, NotRun):
        pytest.skip(f"peak memory not measurable here: {peak.detail}")
    assert n <= peak < 2 * n


def test_time_calls_rotates_buffers_and_passes_the_first_result():
    seen, first = [], []
    time_calls(lambda x: seen.append(x) or x, [(0,), (1,), (2,)], CPU, TimingPolicy(4, 4, 0.0), first_result=first.append)
    assert first == [0] and set(seen) == {0, 1, 2}


def test_time_calls_warms_up_for_the_policys_time():
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(0.01)

    time_calls(fn, [(0,), (1,)], CPU, TimingPolicy(2, 2, 0.0, warmup_s=0.1))
    # first call, at least 0.1 s of warm-up calls (about 10), then the 2 timed ones
    assert 1 + 8 + 2 <= len(calls) <= 1 + 20 + 2
    calls.clear()
    time_calls(fn, [(0,), (1,)], CPU, TimingPolicy(2, 2, 0.0, warmup_s=0.001, warmup_calls=5))
    assert len(calls) == 1 + 5 + 2  # at least that many warm-up calls, however fast
    calls.clear()
    time_calls(fn, [(0,), (1,)], CPU, TimingPolicy(2, 2, 0.0))
    assert len(calls) == 1 + 1 + 2


def test_quantizer_cases_run(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    monkeypatch.setitem(bench_quantizers.BATCH, "cifar", 8)
    n = bench_quantizers.BATCH["cifar"]
    batches = {"cifar": [torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen) for _ in range(2)]}
    cases = [c for c in bench_quantizers.plan(["cifar"], CPU) if c.K == 2]
    assert {c.method for c in cases} == {"pil:median_cut", "pil:octree", "pil:kmeans", "kmeans", "python_dither"}
    results = [bench_quantizers.run_case(c, batches, POLICY) for c in cases]
    assert all(r.images_per_second > 0 for r in results)
    header, rows = bench_quantizers.table(results)
    assert len(rows) == len(cases) and all(len(r) == len(header) for r in rows)
    verdicts = main.quantizer_verdicts(results)
    assert [v.met is not None for v in verdicts] == [True, True]


def test_colorcnn_step_runs_with_both_formulations():
    case = bench_colorcnn.ColorCNNCase("cifar", B=2, H=16, K=3, width=4)
    result = bench_colorcnn.run_case(case, CPU, POLICY, log=lambda msg: None)
    for name in bench_colorcnn.STEP_FORMULATIONS:
        assert result.step_seconds[name] > 0 and result.quant_seconds[name] > 0
    header, rows = bench_colorcnn.table([result])
    assert len(rows[0]) == len(header)


def test_soft_quantizer_replacement_is_used_and_restored():
    original = bench_colorcnn.colorcnn_module.soft_color_quantize
    model = bench_colorcnn.ColorCNN(2, width=4).train()
    x = torch.rand(1, 3, 16, 16)
    torch.manual_seed(0)
    expected = model(x).quantized
    with bench_colorcnn.soft_quantizer(bench_colorcnn.soft_color_quantize_paper) as calls:
        torch.manual_seed(0)
        got = model(x).quantized
    assert len(calls) == 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert bench_colorcnn.colorcnn_module.soft_color_quantize is original


def _op_result(K, dtype, fused, paper, eager, compiled, mem=(1, 8)):
    r = bench_ops.OpResult(bench_ops.OpCase("soft", "fwd+bwd", 128, K, 32, 32, dtype))
    r.seconds = {"fused": fused, "paper": paper, "eager": eager, "compiled": compiled}
    r.peak_bytes = {"fused": mem[0], "paper": mem[1], "eager": 1, "compiled": 1}
    return r


def test_cpu_verdicts():
    results = [_op_result(64, torch.float32, 1.0, 12.0, 2.5, NotRun("compile error")),
               _op_result(2, torch.float32, 1.0, 3.0, 0.9, 1.0)]
    verdicts = {v.target: v for v in main.op_verdicts(results, CPU)}
    assert verdicts["CPU soft fwd+bwd, CIFAR K=64: >= 10x paper"].met is True
    assert verdicts["CPU soft fwd+bwd, CIFAR K=64: >= 2x eager bmm"].met is True
    never = verdicts["CPU soft fwd+bwd: never slower than eager, every shape"]
    assert never.met is False and "0.90x" in never.measured and "128x2x32x32" in never.measured
    assert verdicts["CPU soft fwd: never slower than paper, every shape"].met is None  # no fwd rows


def test_cuda_verdicts():
    fast = _op_result(256, torch.bfloat16, 1.0, 6.0, 3.0, 1.6, mem=(1, 5))
    fast.case = bench_ops.OpCase("soft", "fwd+bwd", 32, 256, 224, 224, torch.bfloat16)
    fast.copy_bandwidth = fast.case.min_bytes() / 0.7  # the fused op (1 s) reaches 70% of it
    slow = _op_result(16, torch.float32, 1.0, 4.0, 3.0, 1.2, mem=(1, 3))
    verdicts = {v.target: v for v in main.op_verdicts([fast, slow], torch.device("cuda"))}
    assert verdicts["CUDA soft fwd+bwd: >= 5x paper, every shape"].met is False
    assert verdicts["CUDA soft fwd+bwd: >= 1.5x torch.compile, every shape"].met is False
    assert verdicts["CUDA soft fwd+bwd, 224x224: >= 60% of copy bandwidth"].met is True
    assert "70%" in verdicts["CUDA soft fwd+bwd, 224x224: >= 60% of copy bandwidth"].measured
    assert verdicts["CUDA soft fwd+bwd, K >= 16: peak memory <= 1/4 of paper"].met is False  # 1/3 at K=16


def test_main_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(bench_ops.SIZES, "cifar", (2, 16, 16, (3,)))
    monkeypatch.setattr(bench_ops, "FORMULATIONS", ("fused", "paper", "eager"))
    out = tmp_path / "report.md"
    argv = ["--device", "cpu", "--quick", "--only", "ops,colorcnn", "--sizes", "cifar", "--dtypes", "float32",
            "--colorcnn-width", "4", "--out", str(out), "--no-progress"]
    assert main.main(argv) == 0
    report = out.read_text()
    for heading in ("# colorquant_ops benchmarks", "## Ops", "## ColorCNN training step", "## Targets",
                    "command: `", "peak memory"):
        assert heading in report
    assert report.count("| soft | fwd+bwd | 2x3x16x16 | float32 |") == 1


def test_ops_filter():
    args = main.parse_args(["--ops", "render,hard", "--sizes", "cifar", "--dtypes", "float32"])
    cases = bench_ops.plan(args.sizes, args.dtypes, args.ops)
    assert {(c.op, c.mode) for c in cases} == {("hard", "fwd"), ("render", "fwd")}
    assert sorted(c.K for c in cases if c.op == "render") == [2, 8, 64]
    assert len(bench_ops.plan(args.sizes, args.dtypes)) == 6 * 3  # every op by default


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        main.parse_args(["--ops", "render,nonsense"])
    with pytest.raises(SystemExit):
        main.parse_args(["--only", "ops,nonsense"])
    with pytest.raises(SystemExit):
        main.parse_args(["--repeats", "0"])


def test_quantize_memory_benchmark_runs_small(tmp_path):
    from benchmarks import bench_quantize_memory

    png = bench_quantize_memory.compressible_png(tmp_path / "bands.png", 1000)
    assert png.stat().st_size < 20_000  # a million pixels in a few KB
    assert main.parse_args(["--only", "quantize-memory"]).only == ["quantize-memory"]
    assert "quantize-memory" not in main.parse_args([]).only  # not part of a plain run
    results = bench_quantize_memory.run(sides=[300], methods=["octree"], log=lambda msg: None)
    assert [r.status for r in results] == ["ok", "ok"] and all(r.peak_mib > 0 for r in results)
    header, rows = bench_quantize_memory.table(results)
    assert len(rows) == 2 and len(rows[0]) == len(header)
