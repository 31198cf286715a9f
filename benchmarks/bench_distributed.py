"""Data parallelism on the CPU: allreduce time per step and scaling efficiency, 1 and 2 processes.

    PYTHONPATH=. python benchmarks/bench_distributed.py                 # the three cases, a table
    PYTHONPATH=. python benchmarks/bench_distributed.py --base-channels 16 --depth 3 --size 64 --batch 8

Three cases, each a fresh `mpiexec` job, timing the U-Net training step of `minunet train`
(forward, loss, backward, gradient allreduce, SGD step) on a fixed GLOBAL batch:

    1 process, every thread     numba's and the BLAS's default: all cores
    1 process, 1 thread         one worker on one core: the reference for efficiency
    N processes, 1 thread each  each rank takes its share of the batch and of the cores
                                (distributed.cpu_threads), and the ranks sum their gradients

Each process times --rounds steps after two warm-up steps, and rank 0 reports medians:

    step_ms         one step as the slowest rank sees it (the allreduce ends it for all ranks)
    exposed_ms      time spent in Reducer.wait(): the communication that backward did not hide
    allreduce_ms    one blocking allreduce of all the gradients in one buffer, timed alone:
                    what the communication would cost with no overlap at all
    busbw_GBps      2 (N-1)/N x gradient bytes / allreduce time: NCCL's "bus bandwidth", the
                    figure that compares allreduces across process counts and machines

and the table adds images/s (global batch / step time) and the scaling efficiency,
images/s of N processes / (N x images/s of one 1-thread process): 1.0 means each worker adds
a whole worker's throughput. Before timing, each N-process case checks its summed gradient
against one process's gradient of the same global batch (float32, relative 1e-4).
"""
import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

CONFIG = dict(base_channels=16, depth=3, size=64, batch=8, in_channels=1, num_classes=3, lr=0.01, momentum=0.9)


def worker(cfg, rounds, threads):
    """Run inside mpiexec: time the steps on this rank; rank 0 prints one JSON line."""
    import contextlib

    import numba

    from minunet import distributed, nn, optim
    from minunet.autograd import tensor
    from minunet.train import TrainConfig, segmentation_loss
    from minunet.unet import UNet

    group = distributed.init()
    limit = contextlib.nullcontext()
    if threads:  # one process held to `threads` (the 1-thread reference)
        from threadpoolctl import threadpool_limits
        numba.set_num_threads(threads)
        limit = threadpool_limits(limits=threads, user_api="blas")
    with limit, distributed.cpu_threads(group):
        rng = np.random.default_rng(0)
        B, S = cfg["batch"], cfg["size"]
        x = rng.standard_normal((B, cfg["in_channels"], S, S)).astype(np.float32)
        y = rng.integers(0, cfg["num_classes"], size=(B, S, S))
        part = distributed.share(B, group.rank, group.size)
        loss_cfg = TrainConfig()

        def build():
            nn.manual_seed(0)
            model = UNet(cfg["in_channels"], cfg["num_classes"], cfg["base_channels"], cfg["depth"], batch_norm=False)
            return model, optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"])

        model, opt = build()
        params = list(model.parameters())
        reducer = distributed.Reducer(group, params)

        def gradients(m, xs, ys, g):
            m.zero_grad()
            segmentation_loss(m(tensor(xs)), ys, loss_cfg, None, None, g).backward()

        # validate at the timed shape: the summed gradient is one process's gradient of the global batch
        gradients(model, x[part], y[part], group)
        reducer.wait()
        if group.rank == 0 and group.size > 1:
            alone, _ = build()  # the same initial weights, without the reducer's hooks
            gradients(alone, x, y, distributed.ProcessGroup())
            for p, q in zip(params, alone.parameters()):
                assert np.abs(p.grad - q.grad).max() <= 1e-4 * (np.abs(q.grad).max() or 1), \
                    "the summed gradient is not one process's"
        group.barrier()

        def step():
            gradients(model, x[part], y[part], group)
            reducer.wait()
            opt.step()

        for _ in range(2):
            step()
        steps, exposed = [], []
        for _ in range(rounds):
            group.barrier()
            before, t0 = reducer.exposed_seconds, time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            exposed.append(reducer.exposed_seconds - before)
        flat = np.concatenate([p.grad.reshape(-1) for p in params])
        alone = []
        for _ in range(rounds if group.size > 1 else 0):
            group.barrier()
            t0 = time.perf_counter()
            group.allreduce(flat)
            alone.append(time.perf_counter() - t0)
        if group.size > 1:  # the slowest rank's figures
            steps = [group.comm.allreduce(t, op=group.MPI.MAX) for t in steps]
            exposed = [group.comm.allreduce(t, op=group.MPI.MAX) for t in exposed]
            alone = [group.comm.allreduce(t, op=group.MPI.MAX) for t in alone]
        step_s = statistics.median(steps)
        allreduce_s = statistics.median(alone) if alone else 0.0
        n = group.size
        record = dict(processes=n, threads_per_process=numba.get_num_threads(), config=cfg, rounds=rounds,
                      grad_bytes=int(flat.nbytes), step_ms=1e3 * step_s,
                      exposed_ms=1e3 * statistics.median(exposed), allreduce_ms=1e3 * allreduce_s,
                      busbw_GBps=(2 * (n - 1) / n * flat.nbytes / allreduce_s / 1e9) if allreduce_s else None,
                      images_per_s=cfg["batch"] / step_s)
    if group.rank == 0:
        print(json.dumps(record), flush=True)


def mpiexec():
    found = shutil.which("mpiexec", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        sys.exit("bench_distributed: no mpiexec found: pip install 'minunet[mpi]'")
    return found


def run_case(processes, threads, cfg, rounds):
    args = [f"--{k.replace('_', '-')}={cfg[k]}" for k in ("base_channels", "depth", "size", "batch")]
    cmd = [mpiexec(), "-n", str(processes), sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
           f"--rounds={rounds}", f"--threads={threads}", *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"bench_distributed: {' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for k in ("base_channels", "depth", "size", "batch"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=CONFIG[k])
    p.add_argument("--rounds", type=int, default=10, help="timed steps per case (the median counts)")
    p.add_argument("--processes", type=int, default=2, help="N for the data-parallel case")
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)  # worker: 0 = as started
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE", help="also write the three records to FILE")
    args = p.parse_args()
    cfg = dict(CONFIG, **{k: getattr(args, k) for k in ("base_channels", "depth", "size", "batch")})
    if args.worker:
        worker(cfg, args.rounds, args.threads)
        return
    n = args.processes
    cases = [("1 process, every thread", 1, 0), ("1 process, 1 thread", 1, 1),
             (f"{n} processes, 1 thread each", n, 0)]
    records = []
    print(f"U-Net train step (SGD), base_channels={cfg['base_channels']} depth={cfg['depth']} "
          f"{cfg['size']}x{cfg['size']}, global batch {cfg['batch']}; medians of {args.rounds} steps; "
          f"{os.cpu_count()} CPUs")
    print(f"{'case':<28} {'threads':>7} {'images/s':>9} {'step ms':>8} {'exposed ms':>10} {'allreduce ms':>12} "
          f"{'bus GB/s':>8}")
    for name, processes, threads in cases:
        r = run_case(processes, threads, cfg, args.rounds)
        records.append(dict(r, case=name))
        busbw = f"{r['busbw_GBps']:8.2f}" if r["busbw_GBps"] else f"{'-':>8}"
        print(f"{name:<28} {r['threads_per_process']:>7} {r['images_per_s']:9.2f} {r['step_ms']:8.1f} "
              f"{r['exposed_ms']:10.2f} {r['allreduce_ms']:12.2f} {busbw}", flush=True)
    one_thread, parallel = records[1], records[2]
    efficiency = parallel["images_per_s"] / (n * one_thread["images_per_s"])
    print(f"gradients: {parallel['grad_bytes'] / 1e6:.2f} MB per step; scaling efficiency ({n} processes vs "
          f"{n} x 1 process, 1 thread each): {efficiency:.2f}; {n} processes vs 1 process on every thread: "
          f"{parallel['images_per_s'] / records[0]['images_per_s']:.2f}x")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(records=records, efficiency=efficiency), indent=2) + "\n")


if __name__ == "__main__":
    main()
