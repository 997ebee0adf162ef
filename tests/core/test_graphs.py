"""StepGraph's keying and replay protocol, with a backend that records instead of capturing."""

import torch

from chipmunk_pack.chipmunk_core.graphs import GraphBackend, StepGraph


class RecordingBackend(GraphBackend):
    """A stand-in for CUDA graphs: 'capture' runs the callable once on the static inputs (as the
    capture would trace it) and a replay re-runs that same call, which is what a graph does."""

    def __init__(self):
        self.captured = []

    def capture(self, fn, static_inputs):
        outputs = fn(*static_inputs)
        graph = {"fn": fn, "inputs": static_inputs, "outputs": outputs}
        self.captured.append(graph)
        return graph, outputs

    def replay(self, graph):
        fresh = graph["fn"](*graph["inputs"])
        graph["outputs"].copy_(fresh)


def make_step(calls):
    def step(x, y):
        calls.append("python")
        return x * 2 + y
    return step


def test_first_call_is_eager_second_captures_then_replays():
    calls = []
    graph = StepGraph(RecordingBackend())
    step = make_step(calls)
    x, y = torch.ones(3), torch.zeros(3)
    assert torch.equal(graph.run(step, (x, y)), torch.full((3,), 2.0))
    assert graph.captures == 0 and calls == ["python"]
    second = graph.run(step, (x + 1, y))
    assert graph.captures == 1 and torch.equal(second, torch.full((3,), 4.0))
    third = graph.run(step, (x + 2, y + 1))
    assert graph.captures == 1 and graph.replays == 2
    assert third is second and torch.equal(third, torch.full((3,), 7.0))  # static outputs, refreshed


def test_replays_copy_new_inputs_into_the_static_buffers():
    graph = StepGraph(RecordingBackend())
    step = make_step([])
    x, y = torch.ones(2), torch.ones(2)
    graph.run(step, (x, y))
    graph.run(step, (x, y))
    static = graph._static_inputs
    graph.run(step, (torch.full((2,), 5.0), y))
    assert static[0] is graph._static_inputs[0] and torch.equal(static[0], torch.full((2,), 5.0))


def test_any_key_change_drops_the_graph():
    backend = RecordingBackend()
    graph = StepGraph(backend)
    step = make_step([])
    weight = torch.ones(4)
    x = torch.ones(4)
    base = dict(persistent=(weight,), settings=("sparse", 3))
    graph.run(step, (x, x), **base)
    graph.run(step, (x, x), **base)
    assert graph.captures == 1
    changes = [
        dict(inputs=(torch.ones(5), torch.ones(5))),                                  # shape
        dict(inputs=(x.double(), x.double())),                                        # dtype
        dict(inputs=(torch.ones(8)[::2], x)),                                         # strides
        dict(persistent=(weight.clone(),)),                                           # a moved tensor
        dict(settings=("sparse", 4)),                                                 # a per-step decision
    ]
    for change in changes:
        args = {"inputs": (x, x), **base, **change}
        captures = graph.captures
        graph.run(step, args["inputs"], args["persistent"], args["settings"])
        assert graph.key == StepGraph.make_key(args["inputs"], args["persistent"], args["settings"]), change
        if "persistent" in change:  # only an address moved: the shapes ran before, a new capture at once
            assert graph.captures == captures + 1, change
        else:  # new shapes or settings: an eager warm-up
            assert graph._graph is None, change
            graph.run(step, args["inputs"], args["persistent"], args["settings"])
            assert graph._graph is not None
        captures = graph.captures
        graph.run(step, (x, x), **base)  # back to a key whose shapes ran before: a new capture, no stale graph
        assert graph.captures == captures + 1 and graph.key[1] == (weight.data_ptr(),)


def test_reset_forgets_the_graph():
    graph = StepGraph(RecordingBackend())
    step = make_step([])
    x = torch.ones(2)
    graph.run(step, (x, x))
    graph.run(step, (x, x))
    graph.reset()
    assert graph.key is None and graph._graph is None
    graph.run(step, (x, x))  # the shapes ran before: captured at once
    assert graph.captures == 2 and graph._graph is not None


def test_a_signature_that_ran_before_is_captured_at_once_and_buffers_made_in_the_call_belong_to_its_key():
    """A new run's caches (new addresses, same shapes) need no eager warm-up when the process ran
    those shapes; a buffer the first call brings into being is part of the key that call stores."""
    warm = set()
    first, second = StepGraph(RecordingBackend(), warm), StepGraph(RecordingBackend(), warm)
    x = torch.ones(3)
    first.run(make_step([]), (x, x), persistent=(torch.ones(2),))
    assert first.captures == 0 and len(warm) == 1
    buffers = []

    def lazy_step(a, b):
        if not buffers:
            buffers.append(torch.zeros(3))  # made by the call, kept
        return a + b + buffers[0]

    persistent = lambda: tuple(buffers) or (torch.ones(2),)
    second.run(lazy_step, (x, x), persistent=persistent)
    assert second.captures == 1  # same signature (shapes, settings): captured on its first call
    second.run(lazy_step, (x, x), persistent=persistent)
    assert second.captures == 1 and second.replays == 2  # the key stored after the call holds


def test_the_token_layouts_a_step_reads_are_held_and_keyed():
    """The layouts' index tables come from an LRU cache: a conditioning's caches hold the ones its
    steps read (a graph's tables are never freed) and list them among a graph's fixed addresses."""
    from chipmunk_pack.chipmunk_core.config import resolve_config
    from chipmunk_pack.chipmunk_core.layout import SequenceShape, _layout
    from chipmunk_pack.chipmunk_core.state import SamplingRun

    config = resolve_config("flux")
    run = SamplingRun(config, sample_sigmas=torch.linspace(1, 0, 5), seed=0)
    x = torch.randn(1, 16, 8, 8)
    call = run.begin_call(x, {"sigmas": torch.tensor([1.0])}, SequenceShape(grid=(4, 4), text_len=8, text_first=True))
    layer = call.layer(3, 8, 16)
    layout = layer.layout
    persistent = call.caches.persistent()
    assert any(t is layout.query_order for t in persistent) and any(t is layout.forced_keys for t in persistent)
    _layout.cache_clear()  # evicted from the LRU cache: the caches still hold it
    assert list(call.caches.layouts.values()) == [layout]
