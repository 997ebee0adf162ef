"""The toy models' language: a small vocabulary, the prompts made from it, and the fixed embedding
of every word (no text encoder is trained).

A prompt is a bag of words. Each known word maps to a fixed vector derived from the word alone
(SHAKE-256 of the word -> uniform numbers -> Box-Muller normals, scaled to unit RMS), so the
vectors never depend on a random-number library's version or on the order of the vocabulary.
A prompt becomes ``CONTEXT_TOKENS`` vectors: its words in order, then the ``<pad>`` vector; an
empty prompt starts with the ``<empty>`` vector (the unconditional input used for CFG). The toy
FLUX also takes a pooled vector: the mean of the prompt's word vectors (``<empty>`` for none).

Image prompts read ``a {size} {name} at the {row} {column} on a {colour} {background|gradient}``;
video prompts ``a {size} {name} {motion} on a {colour} {background|gradient}``, where every
motion is two words. Unknown words are dropped (the caller decides whether to warn).
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass

import numpy as np

CONTEXT_TOKENS = 8
FLUX_CONTEXT_WIDTH = 128  # the toy FLUX's txt_in and vector_in widths
WAN_CONTEXT_WIDTH = 4096  # WanModel's text_dim (model detection does not read it from the weights)
EMPTY, PAD = "<empty>", "<pad>"


@dataclass(frozen=True)
class EmojiClass:
    word: str  # the prompt word
    short_name: str  # emoji-datasource's short_name (picks the image)
    category: str


CLASSES: tuple[EmojiClass, ...] = tuple(EmojiClass(*row) for row in (
    ("apple", "apple", "food"), ("banana", "banana", "food"), ("grapes", "grapes", "food"),
    ("watermelon", "watermelon", "food"), ("pizza", "pizza", "food"), ("carrot", "carrot", "food"),
    ("doughnut", "doughnut", "food"), ("strawberry", "strawberry", "food"),
    ("cat", "cat", "animal"), ("dog", "dog", "animal"), ("frog", "frog", "animal"),
    ("pig", "pig", "animal"), ("penguin", "penguin", "animal"), ("fish", "fish", "animal"),
    ("butterfly", "butterfly", "animal"), ("octopus", "octopus", "animal"), ("snail", "snail", "animal"),
    ("tree", "deciduous_tree", "nature"), ("cactus", "cactus", "nature"), ("mushroom", "mushroom", "nature"),
    ("sunflower", "sunflower", "nature"), ("rainbow", "rainbow", "nature"), ("fire", "fire", "nature"),
    ("snowman", "snowman", "nature"), ("rocket", "rocket", "travel"), ("car", "car", "travel"),
    ("house", "house", "travel"), ("key", "key", "object"), ("guitar", "guitar", "object"),
    ("balloon", "balloon", "object"), ("crown", "crown", "object"), ("ghost", "ghost", "smiley"),
))
CLASS_WORDS = tuple(c.word for c in CLASSES)

# Background colours (RGB 0-255).
COLOURS = {
    "red": (200, 40, 40), "orange": (235, 130, 30), "yellow": (240, 215, 60), "green": (60, 160, 70),
    "teal": (30, 150, 150), "blue": (50, 90, 200), "purple": (120, 60, 170), "pink": (235, 130, 180),
    "white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128),
}
BACKGROUNDS = ("background", "gradient")  # a plain colour, or the colour fading to white downwards
SIZES = {"small": 0.24, "medium": 0.36, "large": 0.5}  # sprite side as a fraction of the image side
ROWS = {"top": 0.27, "middle": 0.5, "bottom": 0.73}
COLUMNS = {"left": 0.27, "center": 0.5, "right": 0.73}
MOTIONS = ("standing still", "moving left", "moving right", "moving up", "moving down", "growing bigger",
           "shrinking away", "spinning around", "fading in", "fading out")
STOPWORDS = frozenset({"a", "an", "the", "at", "on", "in", "of", "and", "with", "is"})

VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(
    (EMPTY, PAD, *CLASS_WORDS, *COLOURS, *BACKGROUNDS, *SIZES, *ROWS, *COLUMNS,
     *(w for m in MOTIONS for w in m.split()))))
WORD_INDEX = {w: i for i, w in enumerate(VOCABULARY)}


def word_vector(word: str, width: int) -> np.ndarray:
    """The fixed float32 vector of ``word`` (unit RMS): a pure function of the word and width."""
    stream = hashlib.shake_256(f"chipmunk-toy-word:{word}".encode()).digest(8 * width)
    u = np.frombuffer(stream, dtype="<u4").astype(np.float64).reshape(2, width)
    u = (u + 0.5) / 2.0 ** 32
    v = np.sqrt(-2.0 * np.log(u[0])) * np.cos(2.0 * np.pi * u[1])
    return (v / np.sqrt(np.mean(v * v))).astype(np.float32)


def embedding_table(width: int) -> np.ndarray:
    """[len(VOCABULARY), width]: row i is ``word_vector(VOCABULARY[i], width)``."""
    return np.stack([word_vector(w, width) for w in VOCABULARY])


def tokenize(text: str) -> tuple[list[str], list[str]]:
    """(known words in order, unknown words) of a prompt; stopwords are dropped."""
    words = [w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS]
    known = [w for w in words if w in WORD_INDEX and w not in (EMPTY, PAD)]
    unknown = [w for w in words if w not in WORD_INDEX]
    return known, unknown


def token_ids(words: list[str]) -> list[int]:
    """``CONTEXT_TOKENS`` vocabulary indices: the words (truncated), padded; no words = unconditional."""
    ids = [WORD_INDEX[w] for w in words[:CONTEXT_TOKENS]] or [WORD_INDEX[EMPTY]]
    return ids + [WORD_INDEX[PAD]] * (CONTEXT_TOKENS - len(ids))


def pooled_weights(ids: list[int]) -> np.ndarray:
    """Weights over the token positions whose average is the pooled vector (pads weigh 0)."""
    mask = np.array([i != WORD_INDEX[PAD] for i in ids], dtype=np.float32)
    return mask / mask.sum()


def image_prompt(cls: int, size: str, row: str, column: str, colour: str, background: str) -> str:
    return f"a {size} {CLASS_WORDS[cls]} at the {row} {column} on a {colour} {background}"


def video_prompt(cls: int, size: str, motion: str, colour: str, background: str) -> str:
    return f"a {size} {CLASS_WORDS[cls]} {motion} on a {colour} {background}"


def class_of_prompt(text: str) -> int | None:
    """Index of the first class word in a prompt (what the classifier should find), or None."""
    known, _ = tokenize(text)
    return next((CLASS_WORDS.index(w) for w in known if w in CLASS_WORDS), None)


FAMILY_WIDTHS = {"flux": FLUX_CONTEXT_WIDTH, "wan": WAN_CONTEXT_WIDTH}


@functools.lru_cache(maxsize=None)
def _table(width: int) -> np.ndarray:
    return embedding_table(width)


def encode(text: str, family: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """(context [CONTEXT_TOKENS, width], pooled [width] for FLUX else None, unknown words) of a prompt."""
    known, unknown = tokenize(text)
    ids = token_ids(known)
    context = _table(FAMILY_WIDTHS[family])[ids]
    pooled = pooled_weights(ids) @ context if family == "flux" else None
    return context, pooled, unknown
