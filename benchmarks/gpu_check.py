"""The prepared GPU check: one command that, on a machine with an NVIDIA GPU (an H200 is the
one this project is lent, 15 minutes at a time), tests, sanitizes and times every kernel and
writes everything into one JSON report.

    python3 benchmarks/gpu_check.py            # -> benchmarks/results/gpu-check-<device>-<date>.json
    MINUNET_CUDA_EMULATOR=1 python3 benchmarks/gpu_check.py --smoke --out-dir /tmp/check
                                               # the same flow on the CUDA emulator, no GPU (CI)

Run it from the source tree with the machine's own python3 (CuPy, pytest, pytest-benchmark and
PyTorch with CUDA where installed; a step whose tools are missing is recorded as skipped, with
the reason). Each step is a subprocess with a time budget (seconds, sized for an H200 so that
the whole check ends in under 8 minutes; --budget-scale stretches them all), and a step that
runs out of time is recorded as such, not fatal:

  step        budget  what
  compile        40   NVRTC compiles every kernel of minunet.cuda, one module (a tiled kernel, or
                      a family's others) per process on all CPU cores, into CuPy's kernel
                      cache, so that the steps below (each a process of its own) load binaries
                      instead of compiling (the tiled convolutions take seconds each: a minute
                      and more, one after another)
  tests         120   pytest -m gpu tests: every kernel, every version, float32 and float64,
                      gradient checks, the U-Net step (counts and failing ids)
  memcheck       45   compute-sanitizer --tool memcheck over SANITIZED_TESTS (CuPy's memory
                      pool off, so that every array is an allocation of its own)
  racecheck      45   compute-sanitizer --tool racecheck (shared-memory hazards), same tests
  benches       120   benchmarks/bench_gpu.py: every kernel, v2 and the others first ...
  benches_v1     45   ... then the naive v1 convolutions (slow by design), so that a timeout
                      there loses no other figure; GFLOP/s or GB/s and % of peak per kernel
  train_step     60   benchmarks/bench_train_step.py: minunet's U-Net step, eager and captured
                      as a CUDA graph (--cuda-graph), and PyTorch's (cuDNN) with TF32 off; then
                      minunet with --precision tf32 and PyTorch with TF32 on; each in a process
                      of its own

The report holds: the device (name, compute capability, SMs, memory, the FP32 and DRAM peaks
the percentages divide by), the versions (driver, CUDA runtime, NVRTC, CuPy, NumPy, Python,
PyTorch/CUDA/cuDNN), the git commit and whether kernels/ or minunet/ had uncommitted changes,
the sha256 of kernels/ and of minunet/, each step's status, time and log tail, test counts,
the sanitizers' error counts, one record per kernel bench, and the train step's images/s and
ratios. benchmarks/results/README.md describes the keys.

Without a usable GPU (and without the emulator) it says why and exits with status 2; the exit
status is 1 when a test failed or a sanitizer reported errors, else 0.
"""
import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import isolated  # noqa: E402

isolated.use_cuda_emulator_if_asked()

from minunet import backend  # noqa: E402

BUDGET_S = {"compile": 40, "tests": 120, "memcheck": 45, "racecheck": 45, "benches": 120, "benches_v1": 45,
            "train_step": 60}
# the kernel tests the sanitizers run: every kernel but the naive v1 convolutions, float32
SANITIZED_TESTS = ["tests/test_kernels.py", "-k", "cuda and f32 and not v1"]
TRAIN_STEP = ["--base-channels=16", "--size=128", "--batch=4", "--depth=4", "--rounds=10"]
# --smoke: the same flow on inputs an emulator finishes in a minute (its figures mean nothing)
# the benches' timing: enough rounds for a stable median, few enough for ~120 benches in budget
BENCH_OPTIONS = ["--benchmark-max-time=0.25", "--benchmark-min-rounds=5"]
# run with `python -c` by the compile step: every kernel name's module, in parallel
COMPILE_ALL = """
import concurrent.futures, os, sys
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "benchmarks")]
import isolated
isolated.use_cuda_emulator_if_asked()
from minunet import cuda

def compile_one(family_group):
    cuda._module(*family_group)
    return family_group

if __name__ == "__main__":
    jobs = sorted({(family, cuda._module_group(family, name)) for family, names in cuda.FAMILIES.items()
                   for name in names}, key=str)
    with concurrent.futures.ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        print(len(list(pool.map(compile_one, jobs))), "modules compiled")
"""
SMOKE = {"tests": ["-k", "relu or concat or test_unet_training_step"], "sanitized": ["-k", "relu_forward"],
         "benches": ["-k", "relu_forward or (sgd_update and base4)"], "benches_v1": None,
         "train_step": ["--base-channels=2", "--size=16", "--batch=1", "--depth=1", "--rounds=1"],
         "bench_options": ["--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]}


# ---------------------------------------------------------------------------- what ran where

def tree_sha256(folder):
    """sha256 over (relative path, contents) of the .cu/.cuh/.py files under `folder`, sorted."""
    h = hashlib.sha256()
    for p in sorted(p for p in (ROOT / folder).rglob("*") if p.is_file() and p.suffix in (".cu", ".cuh", ".py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def git_state():
    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "kernels", "minunet"))}


def _cuda_version(v):
    """12090 -> '12.9'."""
    return f"{v // 1000}.{v % 1000 // 10}" if v else None


def versions():
    import cupy
    import numpy
    rt = cupy.cuda.runtime
    out = {"python": platform.python_version(), "numpy": numpy.__version__, "cupy": cupy.__version__,
           "cuda_runtime": _cuda_version(rt.runtimeGetVersion()), "cuda_driver": _cuda_version(rt.driverGetVersion())}
    try:
        from cupy_backends.cuda.libs import nvrtc
        out["nvrtc"] = "%d.%d" % nvrtc.getVersion()
    except Exception as e:  # recorded, not fatal
        out["nvrtc"] = f"unavailable ({type(e).__name__})"
    try:
        import torch
        out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None)
    except ImportError:
        out["torch"] = None
    for tool in ("pytest", "pytest_benchmark"):
        try:
            out[tool] = __import__(tool).__version__
        except ImportError:
            out[tool] = None
    return out


def device_info():
    import cupy
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {"name": name, "id": dev.id, "compute_capability": f"{props['major']}.{props['minor']}",
            "total_memory_gib": round(props["totalGlobalMem"] / 2**30, 2)}
    try:
        from bench_gpu import device_peaks  # the peaks the benches' percentages divide by
        info.update(device_peaks(dev.id))
    except ImportError as e:  # bench_gpu needs pytest
        info["peaks"] = f"unavailable ({e})"
    return info


# ------------------------------------------------------------------------------- the steps

def run_step(name, cmd, budget_s, log_path, env_extra=None):
    """Run `cmd` from the repository root within `budget_s` seconds; its output goes to log_path.
    Returns {status, returncode, seconds, budget_s, command, log_tail}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **(env_extra or {}))
    print(f"[{name}] $ {' '.join(cmd)}  (budget {budget_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=budget_s)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and anything it started
            proc.wait()
            rc, status = None, "timed out"
    seconds = round(time.perf_counter() - t0, 1)
    tail = pathlib.Path(log_path).read_text(errors="replace")[-3000:]
    print(f"[{name}] {status} in {seconds} s", flush=True)
    return {"status": status, "returncode": rc, "seconds": seconds, "budget_s": budget_s, "command": " ".join(cmd),
            "log_tail": tail if status != "passed" else tail[-600:]}


def skipped(reason):
    print(f"  skipped: {reason}", flush=True)
    return {"status": "skipped", "reason": reason}


def count_outcomes(junit_path):
    """passed/failed/errors/skipped and the failing ids from a pytest junit file."""
    counts, failing = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}, []
    if not pathlib.Path(junit_path).exists():
        return counts, failing
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "errors" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failing.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failing


def bench_records(bench_json):
    """One record per bench: name, median/min time in ms, rounds, and its extra_info (kernel,
    version, shape, gflops + pct_peak_fp32 or gbytes_per_s + pct_peak_bw, torch_ms, torch_ratio)."""
    if not pathlib.Path(bench_json).exists():
        return []
    records = []
    for b in json.loads(pathlib.Path(bench_json).read_text())["benchmarks"]:
        s = b["stats"]
        records.append({"name": b["name"], "median_ms": round(s["median"] * 1e3, 4), "min_ms": round(s["min"] * 1e3, 4),
                        "rounds": s["rounds"], **b["extra_info"]})
    return records


def find_compute_sanitizer():
    for candidate in (shutil.which("compute-sanitizer"),
                      *(pathlib.Path(d) / "bin" / "compute-sanitizer"
                        for d in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda") if d)):
        if candidate and pathlib.Path(candidate).is_file():
            return str(candidate)
    return None


def train_step(args, tmp, budget_s):
    """minunet's step (eager, then as a CUDA graph) and PyTorch's (TF32 off, then on) in processes of
    their own; images/s and ratios (ratio_minunet_cuda_graph_minunet: the graph's speed-up)."""
    script = str(ROOT / "benchmarks" / "bench_train_step.py")
    config = SMOKE["train_step"] if args.smoke else TRAIN_STEP
    runs = {"minunet": ["--library=minunet"], "minunet_cuda_graph": ["--library=minunet", "--cuda-graph"],
            "pytorch_tf32_off": ["--library=pytorch"], "minunet_tf32": ["--library=minunet", "--precision=tf32"],
            "pytorch_tf32_on": ["--library=pytorch", "--torch-tf32"]}
    out = {"config": config}
    try:
        import torch
        torch_cuda = torch.cuda.is_available()
    except ImportError:
        torch_cuda = False
    t_end = time.perf_counter() + budget_s
    for key, extra in runs.items():
        if key.startswith("pytorch") and not torch_cuda:
            out[key] = skipped("PyTorch with CUDA is not installed here")
            continue
        step = run_step(f"train_step {key}", [sys.executable, script, *extra, "--device=cuda", *config],
                        round(max(1.0, t_end - time.perf_counter()), 1), tmp / f"train_{key}.log")
        if step["status"] == "passed":
            lines = [line for line in step["log_tail"].splitlines() if line.startswith("{")]
            step["images_per_s"] = json.loads(lines[-1])["images_per_s"] if lines else None
        out[key] = step
    for ours_key, key in (("minunet", "pytorch_tf32_off"), ("minunet", "pytorch_tf32_on"),
                          ("minunet_tf32", "pytorch_tf32_on"), ("minunet_cuda_graph", "pytorch_tf32_off"),
                          ("minunet_cuda_graph", "minunet")):
        ours, theirs = out[ours_key].get("images_per_s"), out[key].get("images_per_s")
        if ours and theirs:  # minunet / PyTorch: 1.0 = as fast
            out[f"ratio_{key}" if ours_key == "minunet" else f"ratio_{ours_key}_{key}"] = round(ours / theirs, 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    p.add_argument("--smoke", action="store_true",
                   help="tiny inputs and a few tests: the flow in a minute (on the emulator); figures meaningless")
    p.add_argument("--skip", action="append", default=[], choices=sorted(BUDGET_S), help="leave out a step")
    args = p.parse_args(argv)

    usable, reason = backend.cuda_status()
    if not usable:
        print(f"gpu_check: no usable GPU: {reason}. Run it on a machine with an NVIDIA GPU, its driver and CuPy, "
              f"or with MINUNET_CUDA_EMULATOR=1 to try its plumbing.", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    budget = {k: round(v * args.budget_scale, 1) for k, v in BUDGET_S.items()}
    emulated = os.environ.get("MINUNET_CUDA_EMULATOR") == "1"
    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "emulated": emulated, "smoke": args.smoke, "device": device_info(), "versions": versions(),
              "git": git_state(), "sha256": {"kernels": tree_sha256("kernels"), "minunet": tree_sha256("minunet")},
              "budget_s": budget, "steps": {}}
    print(f"gpu_check: {report['device']['name']}, CuPy {report['versions']['cupy']}, CUDA runtime "
          f"{report['versions']['cuda_runtime']}, driver {report['versions']['cuda_driver']}"
          + (" (emulated: timings meaningless)" if emulated else ""), flush=True)
    steps = report["steps"]
    has_pytest = report["versions"]["pytest"] is not None
    has_benchmark = report["versions"]["pytest_benchmark"] is not None
    pytest_cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = pathlib.Path(tmp)
        if "compile" not in args.skip:
            if args.smoke:  # the emulator compiles with g++, slowly: only what the smoke steps run
                steps["compile"] = skipped("--smoke")
            else:
                steps["compile"] = run_step("compile", [sys.executable, "-c", COMPILE_ALL], budget["compile"],
                                            tmp / "compile.log")
        if "tests" not in args.skip:
            if not has_pytest:
                steps["tests"] = skipped("pytest is not installed")
            else:
                junit = tmp / "tests.xml"
                selection = SMOKE["tests"] if args.smoke else []
                steps["tests"] = run_step("tests", pytest_cmd + ["-m", "gpu", "tests", *selection, f"--junitxml={junit}"],
                                          budget["tests"], tmp / "tests.log")
                counts, failing = count_outcomes(junit)
                steps["tests"].update(counts, failing=failing)

        sanitizer = find_compute_sanitizer()
        for tool in ("memcheck", "racecheck"):
            if tool in args.skip:
                continue
            if not has_pytest:
                steps[tool] = skipped("pytest is not installed")
            elif sanitizer is None:
                steps[tool] = skipped("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
            else:
                selection = SANITIZED_TESTS[:1] + (SMOKE["sanitized"] if args.smoke else SANITIZED_TESTS[1:])
                step = run_step(tool, [sanitizer, f"--tool={tool}", "--error-exitcode=99", "--print-limit=20",
                                       *pytest_cmd, *selection], budget[tool], tmp / f"{tool}.log",
                                env_extra={"MINUNET_CUPY_POOL": "0"})
                m = re.search(r"ERROR SUMMARY: (\d+) error", step["log_tail"])
                step["errors"] = int(m[1]) if m else None
                steps[tool] = step

        bench_files = ["benchmarks/bench_gpu.py"]
        for key, selection in (("benches", ["-k", "not v1"]), ("benches_v1", ["-k", "v1"])):
            if key in args.skip:
                continue
            if not (has_pytest and has_benchmark):
                steps[key] = skipped("pytest-benchmark is not installed")
                continue
            if args.smoke:
                if SMOKE[key] is None:
                    steps[key] = skipped("--smoke")
                    continue
                selection = SMOKE[key] + SMOKE["bench_options"]
            else:
                selection = selection + BENCH_OPTIONS
            out = tmp / f"{key}.json"
            step = run_step(key, pytest_cmd + ["-m", "gpu", *bench_files, "--benchmark-only",
                                               f"--benchmark-json={out}", *selection], budget[key], tmp / f"{key}.log")
            step["results"] = bench_records(out)
            steps[key] = step

        if "train_step" not in args.skip:
            steps["train_step"] = train_step(args, tmp, budget["train_step"])

    report["seconds"] = round(time.perf_counter() - t_start, 1)
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"gpu-check-{slug}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    tests = steps.get("tests", {})
    print(f"gpu_check: tests {', '.join(f'{k} {tests[k]}' for k in ('passed', 'failed', 'errors', 'skipped') if k in tests)}"
          f"; {report['seconds']} s in all; wrote {out}")
    bad = tests.get("status") == "failed" or any(steps.get(t, {}).get("errors") for t in ("memcheck", "racecheck"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
