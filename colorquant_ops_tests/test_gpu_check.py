"""benchmarks/gpu_check.py (``make gpu-check``) on the CPU: the plan and its time
budget, the parsing of test / sanitizer / build results, the runner's time
limits, and the clean exit without a GPU."""

import os
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_fits_the_budget():
    """Every step has a budget; all of them together (a concurrent group counted
    once, at its longest step) fit in 9 minutes, the build and the benchmarks
    get a real share, and every part the issue asks for is in the plan."""
    assert gpu_check.plan_seconds() <= gpu_check.TOTAL_BUDGET_S == 540
    names = [s.name for s in gpu_check.STEPS]
    assert names[:2] == ["env", "build"]
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert f"sanitizer-{tool}" in names
    assert {f"tests-{i}" for i in range(1, gpu_check.TEST_SHARDS + 1)} <= set(names)
    assert {"bench-cifar", "bench-imagenet"} <= set(names)
    budgets = {s.name: s.budget_s for s in gpu_check.STEPS}
    assert budgets["build"] >= 120 and budgets["tests-1"] >= 120
    assert all(b > 0 for b in budgets.values())
    # the concurrent group: sequential steps + the longest of the group
    seq = sum(s.budget_s for s in gpu_check.STEPS if s.group is None)
    group = max(s.budget_s for s in gpu_check.STEPS if s.group == "checks")
    assert gpu_check.plan_seconds() == seq + group


def test_plan_text_lists_every_step_with_its_budget():
    text = gpu_check.format_plan(arch="9.0")
    assert "architecture 9.0" in text and f"budget {gpu_check.plan_seconds()} s" in text
    for s in gpu_check.STEPS:
        assert f"{s.name:<20} {s.budget_s:4d} s" in text


def test_parse_junit(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" '
                    'skipped="3" tests="10" time="1.0"></testsuite></testsuites>')
    assert gpu_check.parse_junit(str(path)) == {"tests": 10, "failures": 2, "errors": 1, "skipped": 3, "passed": 4}


def test_parse_sanitizer_summaries():
    assert gpu_check.parse_sanitizer("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n") == 0
    assert gpu_check.parse_sanitizer("========= ERROR SUMMARY: 3 errors\n") == 3
    assert gpu_check.parse_sanitizer("========= ERROR SUMMARY: 1 error\n") == 1
    racecheck = "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    assert gpu_check.parse_sanitizer(racecheck) == 2
    assert gpu_check.parse_sanitizer("Traceback (most recent call last):\n  killed\n") is None


def test_parse_build_warnings():
    log = ("csrc/cuda/x.cu(12): warning #177-D: variable \"y\" was declared but never referenced\n"
           "csrc/cpu/a.cpp:3:5: warning: unused variable 'z' [-Wunused-variable]\n"
           "ptxas warning : Registers are spilled\n"
           "building 'colorquant_ops._C' extension\n")
    assert gpu_check.parse_build_warnings(log) == 3
    assert gpu_check.parse_build_warnings("[1/9] c++ -Wall -c a.cpp\n") == 0


def test_cuda_arch_and_cuda_home(monkeypatch):
    assert gpu_check.cuda_arch((9, 0)) == "9.0"
    assert gpu_check.cuda_arch((10, 0)) == "10.0"
    assert gpu_check.find_cuda_home({"CUDA_HOME": "/opt/cuda"}) == "/opt/cuda"


def test_runner_kills_a_step_past_its_budget(tmp_path):
    runner = gpu_check.Runner(str(tmp_path), total_budget_s=60)
    slow = gpu_check.Step("slow", 1, "sleeps")
    fast = gpu_check.Step("fast", 10, "prints")
    t0 = time.monotonic()
    runner.run_group([
        (slow, [sys.executable, "-c", "import time; time.sleep(30)"], gpu_check._ok_if_zero),
        (fast, [sys.executable, "-c", "import os; print('hello', os.environ['GPU_CHECK_TEST'])"],
         gpu_check._ok_if_zero, {"GPU_CHECK_TEST": "extra-env"}),
    ])
    assert time.monotonic() - t0 < 15
    by_name = {o.name: o for o in runner.outcomes}
    assert by_name["slow"].status == "timeout"
    assert by_name["fast"].status == "ok"
    assert "hello extra-env" in (tmp_path / "fast.log").read_text()
    assert "GPU_CHECK_TEST" not in runner.env  # the extra environment is the job's only
    runner.run_group([(gpu_check.Step("skipped", 5, "x"), "not run: reason", gpu_check._ok_if_zero)])
    runner.write_summary("test")
    summary = (tmp_path / "summary.md").read_text()
    assert "| slow | timeout |" in summary and "| skipped | skipped |" in summary


def test_runner_respects_the_overall_deadline(tmp_path):
    """A step is cut at the overall deadline even inside its own budget, and a
    step that would start within 5 s of the deadline is skipped."""
    runner = gpu_check.Runner(str(tmp_path), total_budget_s=7)
    t0 = time.monotonic()
    runner.run_group([(gpu_check.Step("long", 100, "sleeps"),
                       [sys.executable, "-c", "import time; time.sleep(30)"], gpu_check._ok_if_zero)])
    assert 5 < time.monotonic() - t0 < 15
    runner.run_group([(gpu_check.Step("late", 100, "x"), [sys.executable, "-c", "pass"], gpu_check._ok_if_zero)])
    assert [o.status for o in runner.outcomes] == ["timeout", "skipped"]
    assert runner.outcomes[1].detail == "overall deadline reached"


def test_sanitizer_and_test_evaluation(tmp_path):
    ok = "gpu_sanitizer_driver: done\n========= ERROR SUMMARY: 0 errors\n"
    assert gpu_check._eval_sanitizer(0, ok)[0] == "ok"
    assert gpu_check._eval_sanitizer(0, ok.replace("0 errors", "4 errors"))[0] == "failed"
    assert gpu_check._eval_sanitizer(0, "========= ERROR SUMMARY: 0 errors\n")[0] == "failed"  # driver did not finish
    junit = tmp_path / "t.xml"
    evaluate = gpu_check._eval_tests(str(junit))
    assert evaluate(0, "")[0] == "failed"  # no XML
    junit.write_text('<testsuite tests="3" failures="0" errors="0" skipped="1"/>')
    assert evaluate(0, "") == ("ok", "2 passed, 0 failed, 0 errors, 1 skipped")
    assert evaluate(1, "")[0] == "failed"
    junit.write_text('<testsuite tests="0" failures="0" errors="0" skipped="0"/>')
    assert evaluate(5, "")[0] == "ok"  # no CUDA test in this shard's files


def test_shards_are_balanced():
    shards = gpu_check.shard_test_files()
    assert len(shards) == gpu_check.TEST_SHARDS and all(shards)
    sizes = [sum(os.path.getsize(os.path.join(ROOT, f)) for f in shard) for shard in shards]
    biggest = max(os.path.getsize(os.path.join(ROOT, f)) for shard in shards for f in shard)
    assert max(sizes) - min(sizes) <= biggest


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu-check would run for minutes")
def test_without_gpu_prints_the_plan_and_exits_cleanly(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr
    assert "gpu-check plan" in proc.stdout and "no CUDA GPU" in proc.stdout
    assert (out / "plan.txt").read_text().startswith("gpu-check plan")
    assert not (out / "summary.md").exists()  # nothing ran


def test_dry_run(tmp_path):
    assert gpu_check.main([str(tmp_path), "--dry-run"]) == 0
    assert "sanitizer-racecheck" in (tmp_path / "plan.txt").read_text()


def test_sanitizer_driver_needs_a_gpu():
    """The driver is importable everywhere and refuses to run without a GPU."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the driver runs under gpu-check")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "gpu_sanitizer_driver.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 1 and "no CUDA GPU" in proc.stdout


def test_cuda_test_selection_covers_every_gpu_only_test():
    """Every test that skips for want of CUDA here is selected by the tests step's -k
    expression (checked on the collected ids: those skipped with CUDA_SKIP_REASON)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "colorquant_ops_tests/test_dither.py",
                           "colorquant_ops_tests/test_errors.py", "colorquant_ops_tests/test_cuda_specific.py",
                           "--collect-only", "-q", "-k", gpu_check.CUDA_TESTS, "-p", "no:cacheprovider"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    selected = set(line for line in proc.stdout.splitlines() if "::" in line)
    assert "colorquant_ops_tests/test_dither.py::test_different_devices[wrapper]" in selected
    assert sum(s.startswith("colorquant_ops_tests/test_dither.py::test_cuda_matches_cpu[") for s in selected) == 16
    assert "colorquant_ops_tests/test_dither.py::test_matches_loop[cuda-1-1-1]" in selected
    assert "colorquant_ops_tests/test_cuda_specific.py::test_non_default_stream" in selected
    assert not any("[cpu" in s and "cuda" not in s and "different_devices" not in s for s in selected)


def test_run_all_commands(tmp_path, monkeypatch):
    """The commands run_all would run on a GPU machine (recorded, not run): the
    build for the detected architecture with all cores, pytest -k cuda, the four
    sanitizers over the driver (concurrent with the tests, without the caching
    allocator), the two quick benchmark runs writing into the output folder."""
    recorded = []

    def fake_run_group(self, jobs):
        recorded.append([(step.name, cmd, extra) for step, cmd, evaluate, *extra in jobs])
        for step, cmd, evaluate, *extra in jobs:
            self.outcomes.append(gpu_check.Outcome(step.name, "ok", 0.0, step.budget_s, ""))

    monkeypatch.setattr(gpu_check.Runner, "run_group", fake_run_group)
    monkeypatch.setattr(gpu_check, "_has_module", lambda name: True)
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")
    envs = []
    monkeypatch.setattr(gpu_check.Runner, "write_summary", lambda self, header: envs.append(dict(self.env))
                        or (tmp_path / "summary.md").write_text(header))
    assert gpu_check.run_all(str(tmp_path), "9.0") == 0
    groups = [[name for name, _, _ in g] for g in recorded]
    shards = [f"tests-{i}" for i in range(1, gpu_check.TEST_SHARDS + 1)]
    assert groups == [["env"], ["build"], shards + ["sanitizer-memcheck", "sanitizer-racecheck",
                                                    "sanitizer-synccheck", "sanitizer-initcheck"],
                      ["bench-cifar"], ["bench-imagenet"]]
    assert envs[0]["TORCH_CUDA_ARCH_LIST"] == "9.0" and envs[0]["MAX_JOBS"] == str(os.cpu_count())
    build_cmd = recorded[1][0][1]
    assert build_cmd[1:] == ["setup.py", "build_ext", "--inplace"]
    files = []
    for i, (name, tests_cmd, extra) in enumerate(recorded[2][:len(shards)], 1):
        assert tests_cmd[1:3] == ["-m", "pytest"] and tests_cmd[tests_cmd.index("-k") + 1] == gpu_check.CUDA_TESTS
        assert tests_cmd[-1] == f"--junitxml={os.path.join(str(tmp_path), f'tests-cuda-{i}.xml')}"
        files += [a for a in tests_cmd if a.startswith("colorquant_ops_tests/")]
        assert extra == []
    # every test file exactly once over the shards
    want = sorted(f"colorquant_ops_tests/{f}" for f in os.listdir(os.path.join(ROOT, "colorquant_ops_tests"))
                  if f.startswith("test_") and f.endswith(".py"))
    assert sorted(files) == want
    for name, cmd, extra in recorded[2][len(shards):]:
        tool = name.removeprefix("sanitizer-")
        assert cmd[0] == "/usr/bin/compute-sanitizer" and cmd[1:3] == ["--tool", tool]
        assert cmd[-1].endswith("gpu_sanitizer_driver.py")
        assert extra == [{"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}]
    for g, size in zip(recorded[3:], ("cifar", "imagenet")):
        cmd = g[0][1]
        assert cmd[1:3] == ["-m", "benchmarks"] and "--quick" in cmd and cmd[cmd.index("--sizes") + 1] == size
        assert cmd[cmd.index("--out") + 1] == os.path.join(str(tmp_path), f"bench-ops-{size}-quick.md")
