"""minunet.distributed: data-parallel training on several processes, over MPI and NCCL.

    mpiexec -n 4 minunet train --batch-size 32

starts four copies of one program. Each is a *rank* (0 to 3) of a *process group* of *size*
4; its *local rank* is its number among the ranks on its own machine, and picks its GPU.
The ranks build the same model and rank 0's parameters are broadcast, so all start equal.
At every step each rank takes its contiguous share of the global batch (items 0-7, 8-15,
16-23, 24-31 of the 32), runs forward and backward on it, and the ranks sum their gradients
(an *allreduce*): every rank then holds the gradient of the whole batch and takes the same
optimizer step, so the parameters stay equal without being sent again. `--batch-size` stays
the global batch, and the learning rate needs no rescaling.

Why the summed gradient is one process's gradient
-------------------------------------------------
The loss of a batch is a mean over its pixels: a sum divided by a count (the number of
pixels that are not `ignore_index`, or their summed class weights). If each rank divided by
its own count, the mean of the ranks' means would weigh pixels unequally whenever the counts
differ. So each rank divides its sum by the count over all ranks (one scalar allreduce per
step, before backward): the ranks' losses then add up to the loss of the global batch, and
their gradients to its gradient, up to the order of the additions. The soft Dice loss is a
ratio of sums over the whole batch: its per-class sums pass through `all_sum`, whose
backward is again a sum over the ranks (the adjoint of "every rank receives the sum"), and
each rank adds 1/N of it. minunet.train.segmentation_loss does both.

Batch norm normalises with statistics of the batch it sees, which a rank's share is not: by
default they stay per-process (each rank normalises over its share, as PyTorch's DDP does),
which is a different model from one process's unless the share is the whole batch. The
running statistics, used in evaluation, are averaged over the ranks before every evaluation
and checkpoint (`average_buffers`: the running-average update is linear, so this is the
running average of the ranks' averaged statistics). `convert_sync_batch_norm` instead makes
every BatchNorm2d normalise with the statistics of the global batch (two small allreduces
per layer and step): then N processes train exactly the one-process model.

Engines
-------
MPI (mpi4py) starts and numbers the processes, and sums host (NumPy) arrays. NCCL, through
CuPy, sums GPU arrays device to device (NVLink, PCIe, InfiniBand); its communicator is made
from a unique id that rank 0 draws and MPI broadcasts, as ChainerMN and llm.c do. Every
collective here takes either kind of array and picks the engine by where it lives.

Buckets and overlap
-------------------
`Reducer` packs the gradients into flat buckets of about BUCKET_MIB MiB, in the order
backward produces them (the last layers first; the order of the first step is recorded and
the buckets rebuilt to follow it), and starts a bucket's allreduce from a gradient hook
(Tensor.register_post_accumulate_grad_hook) as soon as its last gradient is written, while
backward goes on with the layers below. Few large messages cost far less latency than one
per parameter; a bucket much larger would wait too long to start. On the GPU the sum runs on
a stream of its own, ordered after the copies into the bucket by an event, so it overlaps
the next layers' backward kernels. On the CPU, MPICH progresses a non-blocking allreduce
only inside MPI calls (the hook polls it), so the overlap is partial there.

Failure
-------
A collective waits for every rank; a rank that dies of an exception would leave the others
waiting forever. So the command line reports the error on the failing rank (one line, with
its rank) and calls MPI_Abort, which ends every process of the job (minunet.cli).

One process
-----------
`init()` asks the launcher (mpiexec/mpirun from MPICH, Open MPI, MVAPICH or Intel MPI sets an
environment variable with the number of processes it started) and only when there are
several imports mpi4py. Otherwise it returns a ProcessGroup of size 1, whose collectives
return their argument: nothing is imported and nothing changes. Nothing here runs at import.

Threads: several ranks on one machine share its cores, so `cpu_threads` gives each rank its
share of numba's and the BLAS's threads (1 each for 2 ranks on 2 cores) for the duration of
the run and restores them afterwards; it changes nothing in a process of its own.
"""
import contextlib
import os
import sys
import time

import numpy as np

from minunet import backend, nn
from minunet.autograd import Function
from minunet.data import DataLoader

BUCKET_MIB = 4  # gradient bucket size (MiB): large enough to amortise latency, small enough to start early

# What launchers set in each process they start: the number of processes.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")


def launched_processes(environ=None):
    """(number of processes, variable that says so) as the launcher that started this process
    tells it; (1, None) without one."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARIABLES:
        try:
            n = int(environ.get(name, ""))
        except ValueError:
            continue
        if n > 1:
            return n, name
    return 1, None


class DistributedError(RuntimeError):
    """The processes cannot work together as launched (a missing package, too few GPUs, ...)."""


_group = None


def init():
    """This process's group, made on the first call: an MPIProcessGroup when a launcher
    started several processes, else a ProcessGroup of one (no mpi4py import)."""
    global _group
    if _group is None:
        n, variable = launched_processes()
        _group = MPIProcessGroup(n, variable) if n > 1 else ProcessGroup()
    return _group


def active():
    """The group of several processes init() made, or None (not made, or of one process)."""
    return _group if _group is not None and _group.size > 1 else None


def share(n, rank, size):
    """The slice of n items that `rank` of `size` takes: contiguous, in rank order, the
    shares' lengths differing by at most one."""
    return slice(rank * n // size, (rank + 1) * n // size)


class _Done:
    """The handle of a collective that has already completed."""

    def test(self):
        return True

    def wait(self):
        pass


class ProcessGroup:
    """The group of a process on its own: rank 0 of 1. Every collective returns its input."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce(self, a):
        """Sum the array `a` over the ranks, in place (every rank gets the sum); returns a."""
        return a

    def allreduce_async(self, a):
        """Start allreduce(a); the returned handle's wait() finishes it (test() polls)."""
        return _Done()

    def broadcast(self, a, root=0):
        """Overwrite the array `a` with rank `root`'s, in place; returns a."""
        return a

    def broadcast_object(self, obj, root=0):
        """Rank `root`'s picklable `obj` (the others pass anything, e.g. None)."""
        return obj

    def sum_values(self, values):
        """The sums over the ranks of a few numbers, as a float64 array."""
        return np.asarray(values, dtype=np.float64)

    def barrier(self):
        pass

    def abort(self, status):
        """End every process of the job with exit status `status`."""
        sys.exit(status)

    def use_gpu(self):
        """Make this rank's GPU the current device (before anything is allocated on it)."""

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"


class MPIProcessGroup(ProcessGroup):
    """The processes of an MPI job (MPI.COMM_WORLD): MPI for host arrays, NCCL for GPU arrays."""

    def __init__(self, launched=None, variable=None):
        try:
            from mpi4py import MPI
        except ImportError:
            raise DistributedError(f"this process is one of {launched} started by an MPI launcher ({variable}="
                               f"{launched}), but mpi4py is not installed: pip install 'minunet[mpi]'") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        if launched is not None and self.size != launched:
            raise DistributedError(f"the launcher started {launched} processes ({variable}) but MPI sees {self.size}: "
                               f"mpi4py is built against another MPI than the launcher's mpiexec")
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self._nccl = self._nccl_stream = None

    # ---- host arrays: MPI; GPU arrays: NCCL ------------------------------------------------
    def allreduce(self, a):
        if backend.is_cuda_array(a):
            self._nccl_call("allReduce", a)
        else:
            self.comm.Allreduce(self.MPI.IN_PLACE, _host_buffer(a), op=self.MPI.SUM)
        return a

    def allreduce_async(self, a):
        if backend.is_cuda_array(a):
            return self._nccl_async(a)
        return _MPIRequest(self.comm.Iallreduce(self.MPI.IN_PLACE, _host_buffer(a), op=self.MPI.SUM))

    def broadcast(self, a, root=0):
        if backend.is_cuda_array(a):
            self._nccl_call("bcast", a, root)
        else:
            self.comm.Bcast(_host_buffer(a), root=root)
        return a

    def broadcast_object(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def sum_values(self, values):
        a = np.array(values, dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, a, op=self.MPI.SUM)
        return a

    def barrier(self):
        self.comm.Barrier()

    def abort(self, status):
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.25)  # mpiexec forwards our output through pipes: let it pass the report on first
        self.comm.Abort(status)

    # ---- GPUs ---------------------------------------------------------------------------
    def use_gpu(self):
        import cupy
        count = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > count:
            raise DistributedError(f"{self.local_size} processes on this machine but {count} GPU(s): NCCL needs a GPU "
                               f"of its own for each; start at most {count} per machine, or train with --device cpu")
        cupy.cuda.Device(self.local_rank).use()

    def _communicator(self):
        """The NCCL communicator, made on the first GPU collective (all ranks reach it together)."""
        if self._nccl is None:
            import cupy
            from cupy.cuda import nccl
            if not nccl.available:
                raise DistributedError("GPU arrays are summed over NCCL, which CuPy cannot load here: "
                                   "pip install nvidia-nccl-cu12 (or -cu13, as CuPy)")
            uid = self.broadcast_object(nccl.get_unique_id() if self.rank == 0 else None)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
            self._nccl_stream = cupy.cuda.Stream(non_blocking=True)
        return self._nccl

    def _nccl_call(self, name, a, root=None, stream=None):
        import cupy
        from cupy.cuda import nccl
        comm = self._communicator()
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.int64): nccl.NCCL_INT64, np.dtype(np.int32): nccl.NCCL_INT32}
        if a.dtype not in kinds or not a.flags.c_contiguous:
            raise TypeError(f"NCCL {name}: needs a C-contiguous float32/float64/int32/int64 array, "
                            f"got {a.dtype} of shape {a.shape}")
        stream = (stream or cupy.cuda.get_current_stream()).ptr
        if name == "allReduce":
            comm.allReduce(a.data.ptr, a.data.ptr, a.size, kinds[a.dtype], nccl.NCCL_SUM, stream)
        else:
            comm.bcast(a.data.ptr, a.size, kinds[a.dtype], root, stream)

    def _nccl_async(self, a):
        """allReduce on the communication stream, after the work queued so far on the current one."""
        import cupy
        self._communicator()
        current = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(current)
        self._nccl_stream.wait_event(ready)
        self._nccl_call("allReduce", a, stream=self._nccl_stream)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self._nccl_stream)
        return _GPUEvent(done)


def _host_buffer(a):
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise TypeError(f"MPI collective: needs a C-contiguous NumPy array, got {type(a).__name__} "
                        f"{getattr(a, 'shape', '')}")
    return a


class _MPIRequest:
    def __init__(self, request):
        self.request = request

    def test(self):
        return self.request.Test()

    def wait(self):
        self.request.Wait()


class _GPUEvent:
    def __init__(self, event):
        self.event = event

    def test(self):
        return self.event.done

    def wait(self):
        """Order the current stream after the collective (the host does not wait)."""
        import cupy
        cupy.cuda.get_current_stream().wait_event(self.event)


# ---- differentiable sum over the ranks -------------------------------------------------------

class AllSum(Function):
    name = "all_sum"

    def forward(self, x, group):
        # x: (...) -> y: (...), the sum of x over the ranks
        self.group = group
        return group.allreduce(x.copy())

    def backward(self, gy):
        return self.group.allreduce(gy.copy())


def all_sum(x, group):
    """y = the sum of the tensor x over the ranks, on every rank. Its backward sums gy over the
    ranks too: if each rank's loss uses y, every rank's x affects every rank's loss."""
    return x if group.size == 1 else AllSum.apply(x, group=group)


# ---- gradients ------------------------------------------------------------------------------

class _Bucket:
    def __init__(self, params, xp, dtype):
        self.params = params
        self.offsets = np.cumsum([0] + [p.data.size for p in params]).tolist()
        self.buffer = xp.empty(self.offsets[-1], dtype=dtype)
        self.missing, self.handle = len(params), None


class Reducer:
    """Sums the gradients of `params` over the ranks, in buckets started during backward.

    >>> reducer = Reducer(group, model.parameters())
    >>> loss.backward()    # a bucket's allreduce starts as soon as its gradients are all written
    >>> reducer.wait()     # the rest; then every p.grad is the sum over the ranks
    >>> optimizer.step()

    With one process it does nothing. A parameter without a gradient on this rank counts as
    zeros (one process would leave its .grad None). `exposed_seconds` adds up the time wait()
    spent waiting: the part of the communication that backward did not hide.
    """

    def __init__(self, group, params, bucket_mib=BUCKET_MIB):
        self.group, self.bucket_bytes = group, int(bucket_mib * 2**20)
        self.params = [p for p in params if p.requires_grad]
        self.exposed_seconds, self._hooks, self._order = 0.0, [], None
        if group.size == 1:
            return
        self._build(list(range(len(self.params)))[::-1])  # backward meets the last layers first
        self._order = []  # the order of the first backward, recorded by the hooks
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in self.params]

    def _build(self, order):
        """Buckets of consecutive parameters in `order` (indices), one dtype and device each."""
        self.buckets, self._where, self._next = [], {}, 0
        run, size = [], 0
        for i in order + [None]:
            p = None if i is None else self.params[i]
            if run and (p is None or size + p.data.nbytes > self.bucket_bytes or p.dtype != run[0].dtype
                        or p.device != run[0].device):
                xp = backend.array_module(run[0].data)
                self.buckets.append(_Bucket(run, xp, run[0].dtype))
                run, size = [], 0
            if p is not None:
                self._where[id(p)] = (len(self.buckets), len(run))
                run.append(p)
                size += p.data.nbytes
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def _ready(self, p):
        b, j = self._where[id(p)]
        bucket = self.buckets[b]
        bucket.buffer[bucket.offsets[j]:bucket.offsets[j + 1]] = p.grad.data.reshape(-1)
        bucket.missing -= 1
        if self._order is not None:
            self._order.append(self._index[id(p)])
        self._start_ready()

    def _start_ready(self):
        """Start the buckets that are complete, strictly in bucket order (every rank must
        start the same collectives in the same order), and let started ones progress."""
        while self._next < len(self.buckets) and self.buckets[self._next].missing == 0:
            bucket = self.buckets[self._next]
            bucket.handle = self.group.allreduce_async(bucket.buffer)
            self._next += 1
        if self._next:
            self.buckets[self._next - 1].handle.test()

    def wait(self):
        """Finish every bucket's allreduce and point each p.grad at its summed values."""
        if self.group.size == 1:
            return
        start = time.perf_counter()
        for bucket in self.buckets[self._next:]:  # gradients that never came count as zeros
            for j, p in enumerate(bucket.params):
                if p.grad is None:
                    bucket.buffer[bucket.offsets[j]:bucket.offsets[j + 1]] = 0
            bucket.missing = 0
        self._start_ready()
        for bucket in self.buckets:
            bucket.handle.wait()
            for j, p in enumerate(bucket.params):
                p.grad = bucket.buffer[bucket.offsets[j]:bucket.offsets[j + 1]].reshape(p.shape)
            bucket.missing, bucket.handle = len(bucket.params), None
        self._next = 0
        self.exposed_seconds += time.perf_counter() - start
        if self._order is not None:  # after the first step: buckets in the order backward produced
            seen = self.group.broadcast_object(self._order)  # rank 0's, so that all ranks agree
            rest = sorted(set(range(len(self.params))) - set(seen), reverse=True)
            self._order = None
            self._build(seen + rest)

    def remove(self):
        """Take the gradient hooks off the parameters."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


# ---- parameters, buffers and optimizer state ----------------------------------------------------

def broadcast_state(group, model, optimizer=None, scheduler=None, root=0):
    """Make every rank's parameters, buffers, optimizer state and learning-rate schedule rank
    `root`'s: at the start of a run, fresh or resumed (then only `root` reads the checkpoint)."""
    if group.size == 1:
        return
    for t in list(model.parameters()) + list(model.buffers()):
        group.broadcast(t.data, root)
    if optimizer is not None:
        state = optimizer.state_dict() if group.rank == root else None
        # the structure as an object, the arrays as arrays (no pickling of large buffers)
        layout = None if state is None else {
            "param_groups": state["param_groups"],
            "state": {i: {k: (("array", v.shape, v.dtype.str) if hasattr(v, "shape") and v.ndim else v)
                          for k, v in s.items()} for i, s in state["state"].items()}}
        layout = group.broadcast_object(layout, root)
        arrays = {}
        for i, s in layout["state"].items():
            for k, v in s.items():
                if isinstance(v, tuple) and v[:1] == ("array",):
                    a = np.ascontiguousarray(state["state"][i][k]) if state else np.empty(v[1], np.dtype(v[2]))
                    arrays.setdefault(i, {})[k] = group.broadcast(a, root)
        if group.rank != root:
            optimizer.load_state_dict({"param_groups": layout["param_groups"],
                                       "state": {i: {**s, **arrays.get(i, {})} for i, s in layout["state"].items()}})
    if scheduler is not None:
        scheduler.load_state_dict(group.broadcast_object(scheduler.state_dict(), root))


def average_buffers(group, model):
    """Replace every floating buffer (batch norm's running statistics) by its mean over the
    ranks, so that all ranks evaluate, and rank 0 saves, the same model."""
    if group.size == 1:
        return
    for b in model.buffers():
        if b.data.dtype.kind == "f":
            group.allreduce(b.data)
            b.data /= group.size


# ---- batch norm over the global batch ---------------------------------------------------------

class SyncBatchNorm(Function):
    name = "sync_batch_norm"

    def forward(self, x, gamma, beta, eps, group, stats):
        # x: (N, C, H, W), gamma, beta: (C,) -> y: (N, C, H, W), normalised over every rank's (N, H, W)
        xp, k = backend.array_module(x), backend.kernels_for(x)
        x = xp.ascontiguousarray(x)
        sums = xp.concatenate([xp.asarray([x.size // x.shape[1]], dtype=np.float64),
                               x.sum(axis=(0, 2, 3), dtype=np.float64),
                               (x.astype(np.float64) ** 2).sum(axis=(0, 2, 3))])
        sums = group.allreduce(sums)
        c = x.shape[1]
        m, mean = sums[0], sums[1:1 + c] / sums[0]
        var = xp.maximum(sums[1 + c:] / m - mean * mean, 0)
        mean, var = mean.astype(x.dtype), var.astype(x.dtype)
        y, _, _ = k.batch_norm_forward(x, gamma, beta, mean, var, eps, False)  # with the given statistics
        self.x, self.gamma, self.mean, self.var, self.eps, self.group, self.m = x, gamma, mean, var, eps, group, m
        stats["mean"], stats["var"], stats["count"] = mean, var, float(m)
        return y

    def backward(self, gy):
        # gx = gamma/sigma (gy - mean(gy) - xhat mean(gy xhat)), the means over every rank's (N, H, W)
        xp, k = backend.array_module(gy), backend.kernels_for(gy)
        gy = xp.ascontiguousarray(gy)
        g_eval, ggamma, gbeta = k.batch_norm_backward(gy, self.x, self.gamma, self.mean, self.var, self.eps, False)
        totals = self.group.allreduce(xp.concatenate([gbeta, ggamma]).astype(np.float64))
        c = gy.shape[1]
        inv_std = 1 / xp.sqrt(self.var.astype(np.float64) + self.eps)
        mean_gy, mean_gy_xhat = totals[:c] / self.m, totals[c:] / self.m
        xhat = (self.x - self.mean[None, :, None, None]) * inv_std[None, :, None, None].astype(gy.dtype)
        scale = (self.gamma.astype(np.float64) * inv_std)[None, :, None, None]
        gx = g_eval - (scale * (mean_gy[None, :, None, None] + xhat * mean_gy_xhat[None, :, None, None])).astype(gy.dtype)
        return gx, ggamma, gbeta  # gamma's and beta's gradients: this rank's part (the Reducer sums them)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks);
    made from a BatchNorm2d by convert_sync_batch_norm. Evaluation is as BatchNorm2d's."""

    def forward(self, x):
        # x: (N, C, H, W) -> y: (N, C, H, W)
        if not self.training or self.group.size == 1:
            return super().forward(x)
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm2d({self.num_features}): expected input (N, {self.num_features}, H, W), "
                             f"got {x.shape}")
        self.num_batches_tracked.data += 1
        momentum = self.momentum if self.momentum is not None else 1.0 / int(self.num_batches_tracked.item())
        stats = {}
        y = SyncBatchNorm.apply(x, self.weight, self.bias, eps=self.eps, group=self.group, stats=stats)
        m = stats["count"]
        for buffer, value in ((self.running_mean, stats["mean"]), (self.running_var, stats["var"] * (m / (m - 1)))):
            buffer.data *= 1 - momentum
            buffer.data += momentum * value.astype(buffer.data.dtype)
        return y


def convert_sync_batch_norm(module, group):
    """Replace every BatchNorm2d in `module` by a SyncBatchNorm2d over `group`, keeping its
    Parameter objects and buffers (an optimizer made before still holds them). Returns module."""
    for name, child in list(module.named_children()):
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d.__new__(SyncBatchNorm2d)
            sync.__dict__.update(child.__dict__)
            object.__setattr__(sync, "group", group)
            module._modules[name] = sync  # in its place: a Sequential runs its children in this order
        else:
            convert_sync_batch_norm(child, group)
    return module


# ---- data -----------------------------------------------------------------------------------

class ShardedLoader(DataLoader):
    """A DataLoader that yields this rank's contiguous share of every global batch: the same
    number of batches and the same order as DataLoader(...), each batch cut by share(); only
    the share is loaded. Augmentation is keyed by item, so it is what one process would do."""

    def __init__(self, dataset, *, rank, size, **kwargs):
        super().__init__(dataset, **kwargs)
        self.rank, self.size = int(rank), int(size)

    def batches(self, epoch):
        return [b[share(len(b), self.rank, self.size)] for b in super().batches(epoch)]


# ---- threads --------------------------------------------------------------------------------

@contextlib.contextmanager
def cpu_threads(group):
    """While active, each of the group's ranks on this machine runs numba's kernels and the
    BLAS's GEMMs on its share of the cores (at least one thread); restored on exit. numba's
    setting holds for the calling thread (numba.set_num_threads), the BLAS's through
    threadpoolctl where it is installed. Nothing changes for a process of its own."""
    if group.local_size == 1:
        yield
        return
    import numba
    threads = max(1, numba.config.NUMBA_NUM_THREADS // group.local_size)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            blas = contextlib.nullcontext()
        else:
            blas = threadpool_limits(limits=threads, user_api="blas")
        with blas:
            yield
    finally:
        numba.set_num_threads(previous)
