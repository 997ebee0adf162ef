"""Cache sizing and placement, decided before any cache is allocated."""

import torch

from chipmunk_pack.chipmunk_core.config import resolve_config
from chipmunk_pack.chipmunk_core.memory import ModelDims, cache_bytes, place_caches

HUNYUAN = ModelDims(60, 24, 128, 12288, 3072)


def test_cache_size_follows_the_method_formula():
    config = resolve_config("hunyuan_video")
    size = cache_bytes(config, HUNYUAN, 1, 119056, torch.bfloat16)
    delta = 58 * 119056 * 24 * 128 * 2  # 58 Chipmunk layers, one bf16 value per head and token
    assert delta < size < 2 * delta
    with_mlp = cache_bytes(config.replace(mlp_sparsity=0.7), HUNYUAN, 1, 119056, torch.bfloat16)
    assert with_mlp - size >= 58 * 119056 * (12288 + 3072) * 2
    assert cache_bytes(config.replace(attention_sparsity=0.0), HUNYUAN, 1, 119056, torch.bfloat16) == 0
    assert cache_bytes(config, HUNYUAN, 2, 1000, torch.bfloat16) == 2 * cache_bytes(config, HUNYUAN, 1, 1000, torch.bfloat16)


def test_caches_leave_the_gpu_only_when_they_do_not_fit():
    gpu = torch.device("cuda", 0)
    assert place_caches(10 * 2**30, 80 * 2**30, gpu) == gpu
    assert place_caches(70 * 2**30, 80 * 2**30, gpu) == torch.device("cpu")
    assert place_caches(70 * 2**30, None, gpu) == gpu
    assert place_caches(70 * 2**30, 1, torch.device("cpu")) == torch.device("cpu")
