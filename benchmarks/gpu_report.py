"""The GPU report: on a machine with an NVIDIA GPU, one command runs the GPU tests and the GPU
benchmarks and writes one JSON file with everything needed to compare runs.

    python benchmarks/gpu_report.py                  # -> benchmarks/results/<device>-<date>.json
    python benchmarks/gpu_report.py -k "conv2d"      # only the benches matching a -k expression
    python benchmarks/gpu_report.py --no-tests       # benches only

Steps (each in its own pytest process, from the repository root):
  1. `pytest -m gpu tests`: every GPU-marked test (tests/test_kernels.py on 'cuda',
     tests/test_cuda_backend.py, ...); the pass/fail/skip counts and failing test ids go in.
  2. `pytest -m gpu benchmarks/bench_gpu.py benchmarks/bench_train_step.py --benchmark-only
     --benchmark-json=...`: every kernel version on U-Net shapes, and the training step on
     'cuda' against PyTorch; each bench's median time and its extra_info (GFLOP/s, % of
     peak, torch ratio, ...) go in.
The file also records the device (name, compute capability, SMs, memory, the FP32 and DRAM
peaks the benches divide by), the CuPy / CUDA runtime / driver / NVRTC (and PyTorch, cuDNN)
versions, the git commit (and whether kernels/ or minunet/ had uncommitted changes), and a
sha256 over the sources in kernels/ and minunet/, so a figure can be traced to the exact
code that produced it. See benchmarks/results/README.md.

Without a usable GPU it prints why and exits with status 2. The exit status is 1 when a GPU
test failed (the report is still written), else 0.
"""
import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from minunet import backend  # noqa: E402

BENCH_FILES = ["benchmarks/bench_gpu.py", "benchmarks/bench_train_step.py"]


def source_hash():
    """sha256 over (relative path, contents) of every source file in kernels/ and minunet/, in
    sorted order: it changes exactly when the code that ran changes."""
    h = hashlib.sha256()
    files = sorted(p for folder in ("kernels", "minunet") for p in (ROOT / folder).rglob("*")
                   if p.is_file() and p.suffix in (".cu", ".cuh", ".py"))
    for p in files:
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def git_state():
    def git(*args):
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    return {"commit": git("rev-parse", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "kernels", "minunet"))}


def versions():
    import cupy
    import numpy
    rt = cupy.cuda.runtime
    out = {"python": platform.python_version(), "numpy": numpy.__version__, "cupy": cupy.__version__,
           "cuda_runtime": _cuda_version(rt.runtimeGetVersion()), "cuda_driver": _cuda_version(rt.driverGetVersion())}
    try:
        from cupy_backends.cuda.libs import nvrtc
        out["nvrtc"] = "%d.%d" % nvrtc.getVersion()
    except Exception as e:  # reported, not fatal: the benches would fail loudly on their own
        out["nvrtc"] = f"unavailable ({type(e).__name__})"
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    except ImportError:
        out["torch"] = None
    return out


def _cuda_version(v):
    """12090 -> '12.9'."""
    return f"{v // 1000}.{v % 1000 // 10}"


def device_info():
    import cupy
    from bench_gpu import device_peaks  # the peaks the benches' percentages use
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    return {"name": name, "id": dev.id, "compute_capability": f"{props['major']}.{props['minor']}",
            "total_memory_gib": round(props["totalGlobalMem"] / 2**30, 2), **device_peaks(dev.id)}


def run_pytest(args, log_path):
    """Run pytest from the repository root with the package importable; output goes to a log file."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]
    print(f"$ {' '.join(cmd)}  (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def count_outcomes(junit_path):
    """passed/failed/errors/skipped counts and the failing test ids from a pytest junit file."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failing = []
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        outcome = ("failed" if "failure" in tags else "errors" if "error" in tags
                   else "skipped" if "skipped" in tags else "passed")
        counts[outcome] += 1
        if outcome in ("failed", "errors"):
            failing.append(f"{case.get('classname')}::{case.get('name')}")
    return counts, failing


def bench_figures(bench_json):
    """One record per bench: its name, group, median/min/mean time in ms, rounds, extra_info."""
    data = json.loads(pathlib.Path(bench_json).read_text())
    records = []
    for b in data["benchmarks"]:
        s = b["stats"]
        records.append({"name": b["name"], "group": b["group"], "median_ms": s["median"] * 1e3,
                        "min_ms": s["min"] * 1e3, "mean_ms": s["mean"] * 1e3, "rounds": s["rounds"],
                        **b["extra_info"]})
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-k", dest="keyword", help="only the benches matching this pytest -k expression")
    p.add_argument("--no-tests", action="store_true", help="skip step 1 (the GPU tests)")
    p.add_argument("--no-benches", action="store_true", help="skip step 2 (the GPU benches)")
    p.add_argument("--out-dir", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)

    usable, reason = backend.cuda_status()
    if not usable:
        print(f"gpu_report: no usable GPU, so there is nothing to measure: {reason}.\n"
              f"Run it on a machine with an NVIDIA GPU, its driver and CuPy (pip install 'minunet[cuda12]').",
              file=sys.stderr)
        return 2

    report = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": device_info(), "versions": versions(), "git": git_state(),
              "sources_sha256": source_hash()}
    print(f"gpu_report: {report['device']['name']}, CuPy {report['versions']['cupy']}, "
          f"CUDA runtime {report['versions']['cuda_runtime']}, driver {report['versions']['cuda_driver']}")

    tests_ok = True
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if not args.no_tests:
            rc = run_pytest(["-m", "gpu", "tests", "-q", f"--junitxml={tmp / 'tests.xml'}"], tmp / "tests.log")
            counts, failing = count_outcomes(tmp / "tests.xml")
            report["tests"] = {"command": "pytest -m gpu tests", "returncode": rc, **counts, "failing": failing,
                               "log_tail": (tmp / "tests.log").read_text()[-4000:] if rc else ""}
            tests_ok = rc == 0
            print(f"tests: {counts}")
        if not args.no_benches:
            bench_args = ["-m", "gpu", *BENCH_FILES, "--benchmark-only", f"--benchmark-json={tmp / 'bench.json'}"]
            if args.keyword:
                bench_args += ["-k", args.keyword]
            rc = run_pytest(bench_args, tmp / "bench.log")
            figures = bench_figures(tmp / "bench.json") if (tmp / "bench.json").exists() else []
            report["benchmarks"] = {"command": "pytest -m gpu " + " ".join(BENCH_FILES) + " --benchmark-only",
                                    "keyword": args.keyword, "returncode": rc, "results": figures,
                                    "log_tail": (tmp / "bench.log").read_text()[-4000:] if rc else ""}
            print(f"benchmarks: {len(figures)} results (pytest exit status {rc})")

    slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{slug}-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
