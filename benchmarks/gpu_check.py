"""One command for a short-lived GPU machine: ``make gpu-check GPU_CHECK_OUT=dir``
(``python -m benchmarks.gpu_check dir``).

From a clean copy of the tree, in under 9 minutes in all (the machines this
project gets are lent for about 15 minutes, start-up included):

1. env        GPU, driver, torch, nvcc, compute-sanitizer, pytest / hypothesis / ninja
2. build      the extension for this GPU's architecture only, all cores
              (``setup.py build_ext --inplace``, TORCH_CUDA_ARCH_LIST=<major.minor>,
              MAX_JOBS=nproc; no venv, nothing installed, no network)
3. tests      every CUDA test (``pytest -k "cuda or different_devices"``: the cuda variants of the op tests,
              the CUDA-only tests, test_cuda_specific.py) as four concurrent pytest processes, junit XML parsed
4. sanitizer  compute-sanitizer memcheck, racecheck, synccheck and initcheck over
              benchmarks/gpu_sanitizer_driver.py (each kernel on odd shapes); the four
              tools run concurrently, and concurrently with the tests
5. bench      the CUDA benchmark matrix in its quick form (``python -m benchmarks
              --quick --only ops``: fused vs the paper's formulation, eager bmm and
              torch.compile, bandwidth as a share of measured copy bandwidth, peak
              memory), CIFAR and ImageNet sizes as two runs, float32

Every log and result table goes into the output folder, with summary.md and
summary.json (step, status, seconds, budget, key numbers). Each step runs under
its own time budget (a step past it is killed and marked "timeout"; the next
steps still run) and never past the overall deadline. Exit status 0 if every
step passed. Without a CUDA GPU it prints the plan and exits 0 (nothing run);
``--dry-run`` prints the plan on any machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 540  # 9 minutes
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
BENCH_SIZES = ("cifar", "imagenet")
#: pytest -k expression of every test that needs a GPU: the "cuda" variants of the
#: device fixture, the tests named ..._cuda_..., test_cuda_specific.py, and the
#: mixed-device error tests (test_dither.py's carry no "cuda" in their id)
CUDA_TESTS = "cuda or different_devices"
#: the tests run as this many concurrent pytest processes (files spread by size):
#: one process would need about as long as the CPU variants take on two cores
TEST_SHARDS = 4


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  #: wall-clock limit of the step
    what: str
    #: steps sharing a group run concurrently; the group's time is the largest budget
    group: Optional[str] = None


#: The plan, in order. Budgets, in seconds, sum (concurrent groups counted once) to
#: at most TOTAL_BUDGET_S; test_gpu_check.py checks it.
STEPS = (
    Step("env", 20, "GPU, driver, torch, nvcc, compute-sanitizer, Python test modules"),
    Step("build", 150, "setup.py build_ext --inplace for this GPU's architecture only, MAX_JOBS=nproc"),
    *(Step(f"tests-{i}", 160, f"pytest -k '{CUDA_TESTS}', shard {i} of {TEST_SHARDS} of the test files, junit XML",
           group="checks") for i in range(1, TEST_SHARDS + 1)),
    *(Step(f"sanitizer-{tool}", 160, f"compute-sanitizer --tool {tool} benchmarks/gpu_sanitizer_driver.py",
           group="checks") for tool in SANITIZER_TOOLS),
    *(Step(f"bench-{size}", 100, f"python -m benchmarks --quick --only ops --sizes {size} --dtypes float32")
      for size in BENCH_SIZES),
)


def plan_seconds(steps=STEPS) -> int:
    """Worst-case wall time of the plan: sequential steps add up, a concurrent group counts its longest step."""
    total, groups = 0, {}
    for s in steps:
        if s.group is None:
            total += s.budget_s
        else:
            groups[s.group] = max(groups.get(s.group, 0), s.budget_s)
    return total + sum(groups.values())


def format_plan(steps=STEPS, arch: Optional[str] = None) -> str:
    lines = [f"gpu-check plan (budget {plan_seconds(steps)} s of at most {TOTAL_BUDGET_S} s; "
             f"architecture {arch or 'detected on the GPU'}):"]
    for i, s in enumerate(steps, 1):
        conc = f" [concurrent: {s.group}]" if s.group else ""
        lines.append(f"  {i:2d}. {s.name:<20} {s.budget_s:4d} s  {s.what}{conc}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- result parsing


def parse_junit(path: str) -> Dict[str, int]:
    """Counts of a pytest junit XML: tests, failures, errors, skipped, passed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


_SUMMARY_RES = (
    re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error"),
    re.compile(r"RACECHECK SUMMARY:\s*(\d+)\s+hazard"),
)


def parse_sanitizer(text: str) -> Optional[int]:
    """Errors (memcheck, synccheck, initcheck) or hazards (racecheck) a compute-sanitizer
    log reports; None if it has no summary line (the run did not finish)."""
    found = None
    for regex in _SUMMARY_RES:
        for m in regex.finditer(text):
            found = (found or 0) + int(m.group(1))
    return found


def parse_build_warnings(text: str) -> int:
    """Compiler warnings in a build log (gcc 'warning:', nvcc/ptxas 'warning #...' / 'warning :')."""
    return len(re.findall(r"\bwarning\b\s*(?:#\d+-D)?\s*:", text, flags=re.IGNORECASE))


def cuda_arch(capability) -> str:
    major, minor = capability
    return f"{major}.{minor}"


def find_cuda_home(env=os.environ) -> Optional[str]:
    """The toolkit root (with lib64), as the Makefile derives it: CUDA_HOME if set,
    else from nvcc's real location, else /usr/local/cuda."""
    if env.get("CUDA_HOME"):
        return env["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.isdir(os.path.join(root, "lib64")):
            return root
    return "/usr/local/cuda" if os.path.isdir("/usr/local/cuda/lib64") else None


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    name: str
    status: str  #: "ok", "failed", "timeout", "skipped"
    seconds: float
    budget_s: int
    detail: str = ""


def _launch(cmd: List[str], log_path: str, env: Dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "w")
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(proc: subprocess.Popen, deadline: float) -> Optional[int]:
    """Return code, or None after killing the process group at the deadline."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


class Runner:
    def __init__(self, out_dir: str, total_budget_s: int = TOTAL_BUDGET_S):
        self.out = out_dir
        self.t0 = time.monotonic()
        self.deadline = self.t0 + total_budget_s
        self.outcomes: List[Outcome] = []
        self.env = dict(os.environ)

    def log_path(self, name: str) -> str:
        return os.path.join(self.out, f"{name}.log")

    def run_group(self, jobs: List[tuple]) -> None:
        """Runs the jobs concurrently, each within its step's budget and the overall deadline.

        jobs: (Step, command list -- or a string, the reason it is skipped --,
        evaluate(rc, log text) -> (status, detail)[, extra environment])."""
        started = []
        for step, cmd, evaluate, *extra in jobs:
            if isinstance(cmd, str):  # a reason not to run
                self.outcomes.append(Outcome(step.name, "skipped", 0.0, step.budget_s, cmd))
                continue
            if time.monotonic() >= self.deadline - 5:
                self.outcomes.append(Outcome(step.name, "skipped", 0.0, step.budget_s, "overall deadline reached"))
                continue
            env = {**self.env, **(extra[0] if extra else {})}
            started.append((step, evaluate, time.monotonic(), _launch(cmd, self.log_path(step.name), env)))
            print(f"[gpu-check] {step.name}: started ({step.budget_s} s budget)", flush=True)
        for step, evaluate, t_start, proc in started:
            rc = _wait(proc, min(t_start + step.budget_s, self.deadline))
            seconds = time.monotonic() - t_start
            with open(self.log_path(step.name)) as f:
                text = f.read()
            if rc is None:
                status, detail = "timeout", f"killed after {seconds:.0f} s"
            else:
                status, detail = evaluate(rc, text)
            self.outcomes.append(Outcome(step.name, status, seconds, step.budget_s, detail))
            print(f"[gpu-check] {step.name}: {status} in {seconds:.0f} s {detail}", flush=True)

    def write_summary(self, header: str) -> None:
        rows = ["| step | status | seconds | budget s | detail |", "|---|---|---:|---:|---|"]
        rows += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.budget_s} | {o.detail} |" for o in self.outcomes]
        total = time.monotonic() - self.t0
        with open(os.path.join(self.out, "summary.md"), "w") as f:
            f.write(f"# gpu-check\n\n{header}\n\ntotal {total:.0f} s\n\n" + "\n".join(rows) + "\n")
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump({"header": header, "total_s": total, "steps": [dataclasses.asdict(o) for o in self.outcomes]},
                      f, indent=2)


def _ok_if_zero(rc: int, text: str):
    return ("ok" if rc == 0 else "failed"), f"exit {rc}"


def _eval_build(rc: int, text: str):
    warnings = parse_build_warnings(text)
    return ("ok" if rc == 0 else "failed"), f"exit {rc}, {warnings} compiler warning(s)"


def _eval_tests(junit: str) -> Callable:
    def evaluate(rc: int, text: str):
        if not os.path.exists(junit):
            return "failed", f"exit {rc}, no junit XML"
        c = parse_junit(junit)
        detail = f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
        # exit 5: this shard's files hold no CUDA test
        return ("ok" if rc in (0, 5) and c["failures"] == c["errors"] == 0 else "failed"), detail
    return evaluate


def shard_test_files(n: int = TEST_SHARDS, root: str = ROOT) -> List[List[str]]:
    """The test files in n groups of about equal size (largest first, each to the smallest group)."""
    folder = os.path.join(root, "colorquant_ops_tests")
    files = sorted((f for f in os.listdir(folder) if f.startswith("test_") and f.endswith(".py")),
                   key=lambda f: (-os.path.getsize(os.path.join(folder, f)), f))
    shards, sizes = [[] for _ in range(n)], [0] * n
    for f in files:
        i = sizes.index(min(sizes))
        shards[i].append(f"colorquant_ops_tests/{f}")
        sizes[i] += os.path.getsize(os.path.join(folder, f))
    return shards


def _eval_sanitizer(rc: int, text: str):
    n = parse_sanitizer(text)
    driver_ok = "gpu_sanitizer_driver: done" in text
    if n is None:
        return "failed", f"exit {rc}, no sanitizer summary"
    status = "ok" if n == 0 and rc == 0 and driver_ok else "failed"
    return status, f"exit {rc}, {n} error(s)/hazard(s)" + ("" if driver_ok else ", driver did not finish")


def _eval_bench(report: str) -> Callable:
    def evaluate(rc: int, text: str):
        exists = os.path.exists(report)
        status = "ok" if rc == 0 and exists else "failed"
        return status, f"exit {rc}, " + (os.path.basename(report) if exists else "no report")
    return evaluate


def env_commands() -> List[List[str]]:
    py = sys.executable
    return [
        ["nvidia-smi"],
        [py, "-c", "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
                   "torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"],
        ["nvcc", "--version"],
        ["compute-sanitizer", "--version"],
        [py, "-c", "import importlib.util as u; import torch.utils.cpp_extension as c; "
                   "print({m: u.find_spec(m) is not None for m in ('pytest', 'hypothesis', 'torchvision')}, "
                   "'ninja', c.is_ninja_available())"],
    ]


def run_all(out_dir: str, arch: str, total_budget_s: int = TOTAL_BUDGET_S) -> int:
    steps = {s.name: s for s in STEPS}
    runner = Runner(out_dir, total_budget_s)
    py = sys.executable
    jobs = os.cpu_count() or 1
    runner.env.update({"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(jobs), "PYTHONPATH": ROOT,
                       "TORCHINDUCTOR_COMPILE_THREADS": str(jobs)})
    cuda_home = find_cuda_home()
    if cuda_home:
        runner.env["CUDA_HOME"] = cuda_home

    # 1. env: one shell line, every command's output in env.log (failures are informative only).
    script = "; ".join(" ".join(_quote(a) for a in cmd) + " 2>&1" for cmd in env_commands())
    runner.run_group([(steps["env"], ["bash", "-c", script], lambda rc, text: ("ok", "see env.log"))])

    # 2. build
    runner.run_group([(steps["build"], [py, "setup.py", "build_ext", "--inplace"], _eval_build)])
    built = runner.outcomes[-1].status == "ok"
    not_built = "not run: the build failed"

    # 3 + 4. tests and the four sanitizers, concurrently
    have_pytest = _has_module("pytest") and _has_module("hypothesis")
    group = []
    for i, files in enumerate(shard_test_files(), 1):
        junit = os.path.join(out_dir, f"tests-cuda-{i}.xml")
        test_cmd = [py, "-m", "pytest", *files, "-k", CUDA_TESTS, "-ra", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}"]
        group.append((steps[f"tests-{i}"], test_cmd if built and have_pytest else
                      (not_built if not built else "not run: pytest / hypothesis not installed"), _eval_tests(junit)))
    sanitizer = shutil.which("compute-sanitizer") or (
        os.path.join(cuda_home, "bin", "compute-sanitizer") if cuda_home else None)
    for tool in SANITIZER_TOOLS:
        cmd = [sanitizer, "--tool", tool, "--print-limit", "20"]
        if tool == "initcheck":
            cmd += ["--track-unused-memory", "no"]
        cmd += [py, os.path.join("benchmarks", "gpu_sanitizer_driver.py")]
        reason = not_built if not built else ("not run: compute-sanitizer not found" if not sanitizer else None)
        # The sanitizers see every allocation's bounds only without the caching allocator.
        group.append((steps[f"sanitizer-{tool}"], reason or cmd, _eval_sanitizer,
                      {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}))
    runner.run_group(group)

    # 5. benchmarks, alone on the GPU
    for size in BENCH_SIZES:
        report = os.path.join(out_dir, f"bench-ops-{size}-quick.md")
        cmd = [py, "-m", "benchmarks", "--device", "cuda", "--quick", "--only", "ops", "--sizes", size,
               "--dtypes", "float32", "--no-progress", "--out", report]
        runner.run_group([(steps[f"bench-{size}"], cmd if built else not_built, _eval_bench(report))])

    header = f"architecture {arch}; {jobs} CPU cores; budget {total_budget_s} s; tree {ROOT}"
    runner.write_summary(header)
    print(open(os.path.join(out_dir, "summary.md")).read())
    return 0 if all(o.status == "ok" for o in runner.outcomes) else 1


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\"'\"'") + "'"


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for every log and result table (created)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--budget-s", type=int, default=TOTAL_BUDGET_S, help="overall deadline (default %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    has_gpu = torch.cuda.is_available()
    arch = cuda_arch(torch.cuda.get_device_capability(0)) if has_gpu else None
    plan = format_plan(arch=arch)
    print(plan)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "plan.txt"), "w") as f:
        f.write(plan + "\n")
    if args.dry_run:
        return 0
    if not has_gpu:
        print("gpu-check: no CUDA GPU on this machine; nothing run (the plan is above).")
        return 0
    return run_all(args.out, arch, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
