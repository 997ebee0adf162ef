"""The toy vocabulary, its fixed word vectors, the scene composer and the data-file builder (no ComfyUI)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from chipmunk_pack.lab import data, scenes, vocab


def test_word_vectors_are_a_pure_function_of_the_word():
    a = vocab.word_vector("cat", 128)
    assert a.dtype == np.float32 and a.shape == (128,)
    assert np.allclose(np.sqrt(np.mean(a * a)), 1.0, atol=1e-5)
    assert np.array_equal(a, vocab.word_vector("cat", 128))
    assert not np.allclose(a, vocab.word_vector("dog", 128))
    # The trained toy models depend on these exact numbers: they must never change.
    assert np.allclose(vocab.word_vector("cat", 4), [-1.48316, 0.61294, 1.18152, -0.16896], atol=1e-4)
    table = vocab.embedding_table(16)
    assert np.array_equal(table[vocab.WORD_INDEX["octopus"]], vocab.word_vector("octopus", 16))


def test_prompts_become_fixed_length_token_lists():
    text = vocab.image_prompt(vocab.CLASS_WORDS.index("cat"), "large", "top", "left", "blue", "gradient")
    known, unknown = vocab.tokenize(text + " wearing a hat")
    assert known == ["large", "cat", "top", "left", "blue", "gradient"]
    assert unknown == ["wearing", "hat"]
    ids = vocab.token_ids(known)
    assert len(ids) == vocab.CONTEXT_TOKENS and ids[-1] == vocab.WORD_INDEX[vocab.PAD]
    assert vocab.token_ids([])[0] == vocab.WORD_INDEX[vocab.EMPTY]
    assert vocab.class_of_prompt(text) == vocab.CLASS_WORDS.index("cat")
    video = vocab.video_prompt(3, "small", "spinning around", "red", "background")
    assert len(vocab.tokenize(video)[0]) == 6


def test_encode_gives_the_pooled_mean_for_flux_only():
    context, pooled, unknown = vocab.encode("a small frog on a pink background", "flux")
    assert context.shape == (vocab.CONTEXT_TOKENS, vocab.FLUX_CONTEXT_WIDTH) and not unknown
    assert np.allclose(pooled, context[:4].mean(0), atol=1e-6)  # small, frog, pink, background
    empty, empty_pooled, _ = vocab.encode("", "flux")
    assert np.allclose(empty_pooled, vocab.word_vector(vocab.EMPTY, vocab.FLUX_CONTEXT_WIDTH))
    context, pooled, _ = vocab.encode("frog", "wan")
    assert context.shape == (vocab.CONTEXT_TOKENS, vocab.WAN_CONTEXT_WIDTH) and pooled is None


def _one_sprite_scene(**fields):
    sprites = torch.zeros(1, 4, 64, 64)
    sprites[:, 0] = 1.0  # opaque red square (premultiplied)
    sprites[:, 3] = 1.0
    placement = dict(cls=torch.tensor([0]), size=torch.tensor([0.5]), cx=torch.tensor([0.5]), cy=torch.tensor([0.5]),
                     angle=torch.tensor([0.0]), alpha=torch.tensor([1.0]), colour=torch.tensor([[0.0, 0.0, 1.0]]),
                     gradient=torch.tensor([False]))
    placement.update(fields)
    return scenes.render(sprites, scenes.Placement(**placement), 64)[0]


def test_render_places_the_sprite_on_the_background():
    image = _one_sprite_scene()
    assert torch.allclose(image[:, 32, 32], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(image[:, 2, 2], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(image[:, 32, 14], torch.tensor([0.0, 0.0, 1.0]))  # the square spans 16..48
    right = _one_sprite_scene(cx=torch.tensor([0.73]))
    assert torch.allclose(right[:, 32, 47], torch.tensor([1.0, 0.0, 0.0]))
    faded = _one_sprite_scene(alpha=torch.tensor([0.5]))
    assert torch.allclose(faded[:, 32, 32], torch.tensor([0.5, 0.0, 0.5]), atol=1e-4)
    gradient = _one_sprite_scene(gradient=torch.tensor([True]))
    assert gradient[0, 63, 2] > 0.7 and gradient[0, 0, 2] < 0.05  # fades to white downwards


def test_random_scenes_and_clips_match_their_prompts():
    generator = torch.Generator().manual_seed(0)
    placement, words = scenes.random_images(6, generator)
    assert len(words) == 6 and all(len(w) == 6 for w in words)
    assert [vocab.CLASS_WORDS[c] for c in placement.cls.tolist()] == [w[1] for w in words]
    placement, words = scenes.random_clips(4, 5, torch.Generator().manual_seed(1))
    assert placement.cls.shape == (20,) and all(len(w) == 6 for w in words)
    sprites = torch.rand(len(vocab.CLASSES), 4, 64, 64)
    clips = scenes.render_clips(sprites, placement, 5, 32)
    assert clips.shape == (4, 3, 5, 32, 32)
    again = scenes.random_clips(4, 5, torch.Generator().manual_seed(1))
    assert words == again[1] and torch.equal(placement.cx, again[0].cx)


def test_moving_right_moves_right():
    generator = torch.Generator().manual_seed(3)
    for _ in range(20):
        placement, words = scenes.random_clips(1, 5, generator)
        if words[0][2:4] == ["moving", "right"]:
            assert placement.cx[-1] > placement.cx[0] + 0.3
            return
    pytest.fail("no 'moving right' clip drawn")


def test_dropping_words_keeps_class_words():
    words = [["large", "cat", "top", "left", "blue", "background"]] * 3
    ids = scenes.words_to_ids(words, torch.Generator().manual_seed(0), drop_word=1.0,
                              keep=frozenset(vocab.CLASS_WORDS))
    assert ids[:, 0].tolist() == [vocab.WORD_INDEX["cat"]] * 3
    assert (ids[:, 1:] == vocab.WORD_INDEX[vocab.PAD]).all()
    uncond = scenes.words_to_ids(words, torch.Generator().manual_seed(0), drop_prompt=1.0)
    assert (uncond[:, 0] == vocab.WORD_INDEX[vocab.EMPTY]).all()


def _fake_package(tmp_path):
    from PIL import Image

    entries, files = [], {}
    for i, cls in enumerate(vocab.CLASSES):
        name = f"{i:04x}.png"
        entries.append({"short_name": cls.short_name, "image": name, "unified": f"{i:04X}"})
        buffer = io.BytesIO()
        Image.new("RGBA", (64, 64), (i, 2 * i, 3 * i, 255)).save(buffer, format="PNG")
        files[f"package/img/google/64/{name}"] = buffer.getvalue()
    files["package/emoji.json"] = json.dumps(entries).encode()
    files["package/package.json"] = json.dumps({"name": data.PACKAGE, "version": "0.0.1"}).encode()
    path = tmp_path / "pkg.tgz"
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


def test_data_file_holds_one_sprite_per_class(tmp_path):
    out = tmp_path / "sprites.npz"
    data.save(data.build(_fake_package(tmp_path)), out)
    sprites, meta = data.load_sprites(out)
    assert sprites.shape == (len(vocab.CLASSES), 64, 64, 4) and sprites.dtype == np.uint8
    assert tuple(sprites[5, 0, 0]) == (5, 10, 15, 255)
    assert meta["version"] == "0.0.1" and meta["classes"][0]["word"] == vocab.CLASS_WORDS[0]
