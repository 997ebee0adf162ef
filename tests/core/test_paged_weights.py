"""The residency check that lets CUDA graphs replay under ComfyUI's dynamic VRAM (PagedWeights),
against an object with comfy-aimdo's three calls that records what was pinned, and the weight
identity that keeps fc2's transposed copy for paged weights."""

import torch

from chipmunk_pack.chipmunk_core.adapters.weights import PagedWeights


class Pages:
    """vbar_fault / vbar_unpin / vbar_signature_compare as comfy.ops calls them; a layer's range is
    resident while its current signature is the one stored on the layer at its last copy-in."""

    def __init__(self):
        self.current = {}   # range -> signature the next fault returns (None: out of memory)
        self.pinned = []

    def vbar_fault(self, alloc):
        signature = self.current[alloc]
        if signature is not None:
            self.pinned.append(alloc)
        return signature

    def vbar_unpin(self, alloc):
        self.pinned.remove(alloc)

    @staticmethod
    def vbar_signature_compare(a, b):
        return a is not None and b is not None and a == b


def paged_layers(pages, n=3):
    layers = []
    for i in range(n):
        layer = torch.nn.Linear(4, 4)
        layer._v = ("vbar", 512 * i, 64)
        layer._v_signature = (i,)
        layer._v_weight = torch.randn(4, 4)
        pages.current[layer._v] = (i,)
        layers.append(layer)
    return layers


def test_resident_when_every_range_holds_its_weight_and_nothing_stays_pinned():
    pages = Pages()
    paged = PagedWeights(paged_layers(pages), pages)
    assert paged.resident() and pages.pinned == []


def test_a_range_paged_out_or_unmappable_fails_the_check_and_unpins_what_was_faulted():
    pages = Pages()
    layers = paged_layers(pages)
    paged = PagedWeights(layers, pages)
    pages.current[layers[1]._v] = (99,)  # paged out and mapped again: the weight must be copied in
    assert not paged.resident() and pages.pinned == []
    pages.current[layers[1]._v] = None   # no memory to map it
    assert not paged.resident() and pages.pinned == []
    pages.current[layers[1]._v] = (1,)
    assert paged.resident()


def test_only_layers_the_model_has_used_are_read_by_graphs():
    pages = Pages()
    layers = paged_layers(pages)
    del layers[2]._v_weight  # never copied in: no call used it
    paged = PagedWeights(layers, pages)
    weights = paged.gpu_weights()
    assert [w.data_ptr() for w in weights] == [layers[0]._v_weight.data_ptr(), layers[1]._v_weight.data_ptr()]
    assert paged.owns(layers[2].weight) and not paged.owns(weights[0])
