"""minunet.cuda_graph: the whole training step captured once as a CUDA graph, then replayed.

Why
---
An eager training step of a U-Net issues a few hundred kernel launches and as many small
array operations, each prepared by Python, CuPy and the driver: tens of microseconds of
host work apiece, so a step of small images spends much of its time launching rather than
computing. CUDA can record a stream's work into a graph (stream capture) and replay all of
it with one call, graph.launch(): the host prepares nothing and the GPU runs the kernels
back to back. `minunet train --cuda-graph` and benchmarks/bench_train_step.py use it.

What a replay can and cannot do
-------------------------------
A graph replays exactly what was captured: the same kernels with the same arguments, which
are addresses and scalars. Everything a step must vary therefore has to live in device
memory at an address the capture saw:
  - the batch: copied each step into the same input buffers (CudaGraphStep.inputs);
  - the learning rate and Adam's bias corrections: the optimizer's update kernel reads them
    from a row per tensor in device memory, which optimizer.prepare() rewrites on the host
    before each replay (minunet/optim.py), so the schedule goes on working;
  - the state a step changes: parameters, gradients, the optimizer's state, batch norm's
    running statistics and counter are all updated in place (a step that rebound them to
    new arrays would leave the graph writing the old ones);
  - the loss: written into one device scalar (CudaGraphStep.loss).
And nothing in the step may wait for the device, since during the capture nothing has run:
the loss's normalisation stays on the device (minunet.train.segmentation_loss), the
losses skip their checks of the class indices while a capture is on (backend.capturing;
the caller checks each batch on the host instead), and the loss is read after the replay.

How (CudaGraphStep)
-------------------
It works on its own stream (CUDA cannot capture the default one) and allocates the step's
temporaries from its own memory pool. The first call runs the step eagerly (the warm-up),
after giving every parameter a gradient array (kept from then on: the step zeroes it in
place, zero_grad(set_to_none=False); a parameter the loss does not reach is updated with a
zero gradient, weight decay included). Its forward and backward allocate on the pool and
free everything there when they end, so the pool holds a free block of every size the step
needs; its optimizer step, outside the pool, makes the optimizer's state and table of
addresses, which stay. The second call captures the step (zero the gradients, forward, loss,
backward, optimizer.launch) with the same pool: Python frees intermediate arrays as the
capture goes on and their blocks serve later allocations of the same capture, in the order
the replay will run them; the pool is then the graph's and nothing else allocates from it.
That call and every later one launch the graph. Shapes are fixed at the first call.
"""
import gc

import numpy as np

from minunet import backend
from minunet.autograd import Tensor


class CudaGraphStep:
    """One training step of `model` (forward, `loss_fn(model(x), *rest)`, backward, `optimizer`
    update), captured as a CUDA graph at the second call and replayed from then on. Call it with
    the host arrays of a batch, (x, *rest) (e.g. images, targets, pixel weights), always of the
    same shapes; it returns `loss`, the device scalar the step writes its loss into (read it with
    item(), which waits for the step)."""

    def __init__(self, model, optimizer, loss_fn):
        params = list(model.parameters())
        if not params or any(p.device != "cuda" for p in params):
            raise ValueError("CudaGraphStep: a CUDA graph captures GPU work; the model's parameters must be on "
                             "'cuda' (model.to('cuda'))")
        self.cupy = backend.array_module(params[0].data)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.stream = self.cupy.cuda.Stream(non_blocking=True)
        self.pool = self.cupy.cuda.MemoryPool()  # the graph's: only the warm-up and the capture allocate from it
        self.inputs = None  # the device buffers each batch is copied into
        self.loss = None    # the device scalar each step writes its loss into
        self.graph, self._plan, self.steps = None, None, 0

    def __call__(self, *batch):
        batch = [np.ascontiguousarray(a) for a in batch]
        # the stream waits for the work already issued to the default stream (e.g. loading weights)
        self.stream.wait_event(self.cupy.cuda.Stream.null.record())
        with self.stream:
            if self.inputs is None:
                self.inputs = [self.cupy.empty(a.shape, a.dtype) for a in batch]
                self.loss = self.cupy.empty((), self.optimizer.param_groups[0]["params"][0].dtype)
            self._copy_in(batch)
            if self.steps == 0:  # the warm-up: an eager step, its temporaries on the graph's pool
                for group in self.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is None:  # made now, outside the pool: they outlive every step
                            p.grad = self.cupy.zeros_like(p.data)
                with self.cupy.cuda.using_allocator(self.pool.malloc):
                    self._forward_backward()
                self.optimizer.step()  # makes the optimizer's state and address table, outside the pool too
            else:
                plan = self.optimizer.prepare()  # this step's learning rates, into device memory
                if self.graph is None:
                    self._capture(plan)
                else:
                    self._check_plan(plan)
                self.graph.launch(self.stream)
        self.steps += 1
        return self.loss

    def item(self):
        """The loss of the last step, as a Python float (waits for the step to finish)."""
        self.stream.synchronize()
        return float(self.loss.item())

    def _copy_in(self, batch):
        if len(batch) != len(self.inputs):
            raise ValueError(f"CudaGraphStep: called with {len(batch)} arrays, the captured step takes "
                             f"{len(self.inputs)}")
        for i, (a, buffer) in enumerate(zip(batch, self.inputs)):
            if a.shape != buffer.shape or a.dtype != buffer.dtype:
                raise ValueError(f"CudaGraphStep: input {i} has shape {a.shape} and dtype {a.dtype}, the captured "
                                 f"buffer {buffer.shape} and {buffer.dtype}: a CUDA graph replays fixed shapes")
            backend.copy_from_host(buffer, a)

    def _forward_backward(self):
        self.optimizer.zero_grad(set_to_none=False)  # in place: the graph keeps the gradients' addresses
        x, *rest = self.inputs
        loss = self.loss_fn(self.model(Tensor(x)), *rest)
        loss.backward()
        self.loss[...] = loss.data

    def _capture(self, plan):
        gc.collect()  # arrays held only by reference cycles back into the pool, for the capture to reuse
        with self.cupy.cuda.using_allocator(self.pool.malloc):
            self.stream.begin_capture()
            try:
                self._forward_backward()
                self.optimizer.launch(plan)
            except BaseException:
                self.stream.end_capture()  # leave the stream usable; the error says what went wrong
                raise
            self.graph = self.stream.end_capture()
        self._plan = plan

    def _check_plan(self, plan):
        """The arrays the captured update kernel reads must be the ones the optimizer holds now."""
        def arrays(plan):
            return [a for ps, gs, states, hyper in plan for a in (*ps, *gs, *(s for st in states for s in st), hyper)]
        new, old = arrays(plan), arrays(self._plan)
        if len(new) != len(old) or any(a is not b for a, b in zip(new, old)):
            raise RuntimeError("CudaGraphStep: the optimizer's parameters, gradients or state are not the arrays the "
                               "graph captured (a parameter replaced, a checkpoint loaded, a gradient set to None?); "
                               "make a new CudaGraphStep")
