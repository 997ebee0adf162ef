"""Replaying a step as one CUDA graph: capture once per key, replay while the key holds.

A sparse step of a FLUX layer is a few milliseconds of GPU work made of dozens of launches; in
eager mode the host (Python, ComfyUI's own per-layer code, launch overhead) takes about as long as
the GPU. A ``StepGraph`` records a callable (e.g. a whole sparse model step) once and replays it
with one launch.

Protocol of ``StepGraph.run(fn, inputs, persistent, settings)``:
1. The key is (shape, dtype, device of every input; ``data_ptr`` of every persistent tensor;
   ``settings``). A call whose key differs from the stored one drops the graph. If the key's
   shapes and settings (its "signature") never ran in this process, it runs ``fn`` eagerly: that
   run is the warm-up (Triton compiles and autotunes, cuBLAS picks its kernels) and its result is
   returned as is. A signature that ran before is captured at once (step 2): its kernels are
   compiled, and only the addresses changed (a new sampling run's caches).
2. The next call with the same key copies the inputs into static buffers, captures ``fn`` on them
   (capture executes nothing on the GPU), replays the graph and returns its static outputs.
3. Later calls with the same key copy the inputs and replay: ``fn``'s Python does not run.
The key is stored as it stands after the call: persistent tensors that ``fn`` itself brought into
being (lazily allocated buffers) belong to it, so the next call finds the same key.

What the caller must guarantee (nothing here can check it):
- ``fn`` reads tensors other than ``inputs`` only at fixed addresses: caches updated in place,
  weights that stay where they are. Every tensor whose address may change between calls (a
  weight cast or patched per call, a cache re-allocated) is listed in ``persistent``, so that a
  new address means a new key. A tensor that is replaced without being listed is read stale.
- ``fn`` makes every decision that can change from one call to the next through ``settings``
  (which layers are dense, which MLPs re-rank their units this step, ...): at a replay its Python
  does not run, so host-side counters do not advance and branches are not re-taken. Host state
  that ``fn`` updates must therefore be updated by the caller, outside ``fn``, on replays too.
- ``fn`` neither synchronises with the host (``.item()``, ``bool(tensor)``, ``nonzero``, boolean
  indexing, pageable host-to-device copies) nor draws from a ``torch.Generator``. What it
  allocates and keeps beyond the call (a lazily made buffer) must be listed in ``persistent``
  afterwards, and work it does only once (a transposed weight it caches) is best done before the
  first call: a capture would bake that work into every replay.
- ``persistent`` is a sequence of tensors or a callable returning one (evaluated before the call
  and again after it).
- The returned tensors are the graph's static outputs, overwritten by the next replay: copy what
  must outlive it. Memory the graph allocates stays reserved until ``reset()``.
- Outputs are a tensor or a (possibly nested) tuple/list of tensors; ``inputs`` a tuple of tensors.

The backend is injectable (``GraphBackend``) so that the keying logic is tested without a GPU;
``CudaGraphBackend`` is the real one.
"""

from __future__ import annotations

import torch


def _static_copies(inputs):
    return tuple(t.detach().clone() for t in inputs)


class CaptureFailed(RuntimeError):
    """Capturing a step failed (something in it cannot be captured, or memory ran out); the
    graph is dropped and nothing was replayed: the caller runs the step eagerly."""


class GraphBackend:
    """Captures a callable and replays it. ``capture(fn, static_inputs) -> (graph, outputs)``:
    ``outputs`` are what ``fn(*static_inputs)`` returned during the capture and what every
    ``replay(graph)`` refreshes."""

    def capture(self, fn, static_inputs):
        raise NotImplementedError

    def replay(self, graph):
        raise NotImplementedError


class CudaGraphBackend(GraphBackend):
    """torch.cuda.CUDAGraph, each graph with its own memory pool (a pool dies with its last graph:
    a handle kept across a dropped graph would point at a freed pool).

    Captured on a side stream that waits for the work queued so far, without what
    ``torch.cuda.graph`` adds around a capture (a device synchronisation and an emptied cache):
    the host then records the step while the GPU still computes the previous one, instead of the
    GPU idling through the capture's Python. Errors are confined to this thread's unsafe calls
    ("thread_local"), so ComfyUI's other threads are not failed by a capture in progress."""

    def __init__(self):
        self._stream = None

    def capture(self, fn, static_inputs):
        graph = torch.cuda.CUDAGraph()
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        current = torch.cuda.current_stream()
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                outputs = fn(*static_inputs)
            finally:
                graph.capture_end()
        current.wait_stream(self._stream)
        return graph, outputs

    def replay(self, graph):
        graph.replay()


# Signatures (a key without its addresses) that ran eagerly in this process: their kernels are
# compiled and tuned, so a new sampling run at the same shapes captures its first call at once.
PROCESS_WARM: set = set()


class StepGraph:
    """One captured callable and the key it was captured for (see the module docstring).

    ``warm``: the set of signatures that ran eagerly, shared by the graphs that share compiled
    kernels (``PROCESS_WARM``, for the CUDA graphs of a process); by default this graph's own."""

    def __init__(self, backend: GraphBackend | None = None, warm: set | None = None):
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.warm = warm if warm is not None else set()
        self.captures = 0
        self.replays = 0
        self.reset()

    def reset(self):
        """Forget the graph (its memory goes back to the pool) and the key."""
        self.key = None
        self._graph = None
        self._static_inputs = None
        self._outputs = None

    @staticmethod
    def make_key(inputs, persistent=(), settings=()):
        shapes = tuple((tuple(t.shape), t.dtype, str(t.device), t.stride()) for t in inputs)
        return shapes, tuple(t.data_ptr() for t in persistent), settings

    def run(self, fn, inputs: tuple, persistent=(), settings=(), before_capture=None):
        """``before_capture()``, where given, is called right before a capture (and only then)."""
        tensors = persistent if callable(persistent) else (lambda: persistent)
        key = self.make_key(inputs, tensors(), settings)
        if key != self.key:
            self.reset()
            signature = (key[0], key[2])
            if signature not in self.warm:
                outputs = fn(*inputs)
                self.warm.add(signature)
                self.key = self.make_key(inputs, tensors(), settings)
                return outputs
        if self._graph is None:
            if before_capture is not None:
                before_capture()
            self._static_inputs = _static_copies(inputs)
            try:
                self._graph, self._outputs = self.backend.capture(fn, self._static_inputs)
            except RuntimeError as error:  # torch's and CUDA's errors, out of memory included
                self.reset()
                raise CaptureFailed(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") \
                    from error
            self.captures += 1
            self.key = self.make_key(inputs, tensors(), settings)
        else:
            for static, new in zip(self._static_inputs, inputs):
                static.copy_(new)
        self.backend.replay(self._graph)
        self.replays += 1
        return self._outputs


class StepReplays:
    """The captured sparse steps of one conditioning, one ``StepGraph`` per ``settings`` (e.g. the
    pattern of which MLPs re-rank their units this step), and the host bookkeeping a replay redoes.

    ``run(fn, inputs, persistent, settings, bookkeeping)``: ``bookkeeping`` is an object with
    ``snapshot() -> state`` and ``delta(before, after) -> change`` and ``restore(before, change)``,
    and ``checkpoint()`` / ``rollback(before, checkpoint)`` (taken right before a capture only: a
    failed capture puts the host state back as it was before the call);
    the change a call that ran ``fn``'s Python made is recorded per settings, and a replay (which
    runs no Python) gets exactly that change applied. Returns (outputs, how) with how one of
    "eager", "captured", "replayed".
    """

    def __init__(self, backend_factory=None, warm: set | None = None):
        self.backend_factory = backend_factory or CudaGraphBackend
        self.warm = PROCESS_WARM if warm is None else warm
        self.graphs: dict = {}
        self.changes: dict = {}

    def run(self, fn, inputs: tuple, persistent, settings, bookkeeping):
        graph = self.graphs.get(settings)
        if graph is None:
            graph = self.graphs[settings] = StepGraph(self.backend_factory(), self.warm)
        captures, replays = graph.captures, graph.replays
        before = bookkeeping.snapshot()
        saved = []
        try:
            outputs = graph.run(fn, inputs, persistent, settings,
                                before_capture=lambda: saved.append(bookkeeping.checkpoint()))
        except CaptureFailed:
            # The capture ran fn's Python (counters, lazily made buffers) but nothing on the GPU:
            # undo all of it, so that the eager rerun is the step an eager run would have made.
            bookkeeping.rollback(before, saved[0])
            raise
        if graph.replays > replays and graph.captures == captures:
            bookkeeping.restore(before, self.changes[settings])
            return outputs, "replayed"
        self.changes[settings] = bookkeeping.delta(before, bookkeeping.snapshot())
        return outputs, "captured" if graph.captures > captures else "eager"

    def reset(self):
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.changes.clear()
