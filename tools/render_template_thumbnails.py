"""Pictures for the template browser: ``workflows/<name>.jpg`` next to each ``<name>.json``.

ComfyUI's template browser (front end 1.42, ComfyUI v0.19.3) shows a custom node pack's
template with the picture of the same name; without one it shows a blank placeholder.

Two ways to make them:

* ``render``: run the workflow on a running ComfyUI and use its result: the first image cropped
  to a square, or for a video (an animated WEBP or a video file) a 3x3 grid of nine frames spread
  over the clip, first to last, so that the picture shows the motion. A band at the bottom says
  what the template needs (workflows/README.md, the pack's template index). For workflows whose
  models are at hand, e.g. the toy workflows on the server ``tools/start.sh`` starts::

      python tools/render_template_thumbnails.py render --url http://127.0.0.1:8188 \
          "workflows/Chipmunk toy text to image.json" "workflows/Chipmunk toy text to video.json"

* ``illustrate``: a drawn card that says plainly that it is an illustration, not an output, for
  workflows whose model weights are not available to whoever builds the pack (by default every
  workflow that declares model downloads)::

      python tools/render_template_thumbnails.py illustrate

Workflows are converted to API prompts with tests/workflow_convert.py (the front end's own
conversion, checked by the tests); both commands print the files they wrote.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import sys
import time
import uuid
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
SIZE = 512
JPEG_QUALITY = 90
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# Accent colour per model family, matched against the workflow's name (lower case).
ACCENTS = {"flux": (167, 139, 250), "hunyuan": (45, 212, 191), "wan": (251, 146, 60)}
DEFAULT_ACCENT = (96, 165, 250)
ILLUSTRATION_LABEL = "ILLUSTRATION, NOT AN OUTPUT"


# --- shared ------------------------------------------------------------------------------------
def thumbnail_path(workflow_path: Path) -> Path:
    return workflow_path.with_suffix(".jpg")


def save_thumbnail(image: Image.Image, path: Path) -> Path:
    """Centre-crop ``image`` to a square, scale it to SIZE and write it as a JPEG."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)
    image.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return path


def declared_models(workflow: dict) -> list[dict]:
    return [m for node in workflow["nodes"] for m in node.get("properties", {}).get("models", [])]


INDEX = WORKFLOWS_DIR / "README.md"


def template_index(path: Path = INDEX) -> list[dict]:
    """The rows of the template index's table (workflows/README.md), in its order: ``name``,
    ``shows``, ``needs`` and ``badge`` (the few words the thumbnail's band shows)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cells) != 5 or not cells[0].isdigit():
            continue
        rows.append({"name": cells[1], "shows": cells[2], "needs": cells[3], "badge": cells[4]})
    return rows


def badge_of(workflow_path: Path) -> str | None:
    rows = {row["name"]: row for row in template_index()} if INDEX.exists() else {}
    row = rows.get(workflow_path.stem)
    return row["badge"] if row else None


# --- illustrate --------------------------------------------------------------------------------
def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.exists() else ImageFont.load_default(size)


def wrap(draw: ImageDraw.ImageDraw, text: str, face, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=face) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + [line] if line else lines


def title_lines(draw: ImageDraw.ImageDraw, title: str, face, width: int) -> list[str]:
    """The model on one line and the task ("text to video") on the next when both fit."""
    words = title.split()
    split = next((i for i in range(1, len(words) - 1) if words[i + 1] == "to"), None)
    if split is not None:
        lines = [" ".join(words[:split]), " ".join(words[split:])]
        if all(draw.textlength(line, font=face) <= width for line in lines):
            return lines
    return wrap(draw, title, face, width)


def mix(a, b, t: float) -> tuple:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def illustration(title: str, model_count: int, footer: str | None = None) -> Image.Image:
    """A card: the workflow's title, a picture of the method (each block of query rows keeps a
    few key columns, drawn bright; the rest is reused from the cache, drawn dim) and a label
    saying that this is an illustration."""
    accent = next((c for key, c in ACCENTS.items() if key in title.lower()), DEFAULT_ACCENT)
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    top, bottom = (20, 23, 30), mix((20, 23, 30), accent, 0.18)
    for y in range(SIZE):
        draw.line([(0, y), (SIZE, y)], fill=mix(top, bottom, y / SIZE))

    label_face = font(22, bold=True)
    label_width = draw.textlength(ILLUSTRATION_LABEL, font=label_face)
    x0 = (SIZE - label_width) / 2 - 16
    draw.rounded_rectangle([x0, 22, SIZE - x0, 64], radius=21, outline=accent, width=3)
    draw.text((SIZE / 2, 43), ILLUSTRATION_LABEL, font=label_face, fill=accent, anchor="mm")

    rng = random.Random(title)
    columns, row_blocks, cell, gap = 16, 5, 22, 4
    grid_width = columns * cell + (columns - 1) * gap
    gx, gy = (SIZE - grid_width) // 2, 88
    dim = mix(top, (255, 255, 255), 0.10)
    for block in range(row_blocks):
        kept = set(rng.sample(range(columns), 3))
        for column in range(columns):
            x = gx + column * (cell + gap)
            y = gy + block * (cell + gap)
            draw.rounded_rectangle([x, y, x + cell, y + cell], radius=4,
                                   fill=accent if column in kept else dim)
    caption_y = gy + row_blocks * (cell + gap) + 8
    draw.text((SIZE / 2, caption_y), "sparse steps recompute the bright columns",
              font=font(19), fill=(160, 166, 178), anchor="mt")

    title_face = font(46, bold=True)
    lines = title_lines(draw, title, title_face, SIZE - 56)
    y = 262 if len(lines) > 1 else 292
    for line in lines:
        draw.text((SIZE / 2, y), line, font=title_face, fill=(241, 243, 247), anchor="mt")
        y += 56
    footer = footer or (f"needs {model_count} model downloads" if model_count else "Chipmunk Accelerate")
    draw.text((SIZE / 2, SIZE - 28), footer, font=font(22), fill=(190, 196, 208), anchor="mb")
    return image


def illustrate(paths: list[Path]) -> list[Path]:
    written = []
    for path in paths:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        card = illustration(path.stem, len(declared_models(workflow)), badge_of(path))
        written.append(save_thumbnail(card, thumbnail_path(path)))
    return written


# --- render ------------------------------------------------------------------------------------
def workflow_convert():
    """tests/workflow_convert.py, imported by path (it is plain Python, no test framework)."""
    spec = importlib.util.spec_from_file_location(
        "chipmunk_workflow_convert", REPO_ROOT / "tests" / "workflow_convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_prompt(url: str, prompt: dict, timeout: float) -> dict:
    import requests

    response = requests.post(f"{url}/prompt", json={"prompt": prompt, "client_id": uuid.uuid4().hex},
                             timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"/prompt rejected the workflow: {response.text[:2000]}")
    prompt_id = response.json()["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = requests.get(f"{url}/history/{prompt_id}", timeout=60).json().get(prompt_id)
        status = (entry or {}).get("status", {})
        if status.get("completed") is not None:
            if status.get("status_str") != "success":
                raise RuntimeError(f"the run failed: {json.dumps(status.get('messages'))[:2000]}")
            return entry
        time.sleep(1.0)
    raise RuntimeError(f"the run did not finish within {timeout:.0f} s")


GRID = 3  # a video's thumbnail: GRID x GRID frames


def first_result(url: str, entry: dict) -> list[Image.Image]:
    """The frames of the first image or video a run's output nodes reported (one for a still)."""
    import requests

    for output in entry["outputs"].values():
        for record in output.get("images", []) + output.get("gifs", []):
            response = requests.get(f"{url}/view", timeout=60, params={
                "filename": record["filename"], "subfolder": record.get("subfolder", ""),
                "type": record.get("type", "output")})
            response.raise_for_status()
            if Path(record["filename"]).suffix.lower() in (".mp4", ".webm", ".mov", ".mkv"):
                return video_frames(response.content)
            return image_frames(Image.open(io.BytesIO(response.content)))
    raise RuntimeError(f"the run reported no image or video: {json.dumps(entry['outputs'])[:2000]}")


def image_frames(image: Image.Image) -> list[Image.Image]:
    """Every frame of an image file (an animated WEBP or GIF has several)."""
    frames = []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        frames.append(image.convert("RGB"))
    return frames


def video_frames(video: bytes) -> list[Image.Image]:
    import av

    with av.open(io.BytesIO(video)) as container:
        return [frame.to_image() for frame in container.decode(video=0)]


def frame_grid(frames: list[Image.Image], grid: int = GRID) -> Image.Image:
    """GRID x GRID frames spread evenly from the first to the last, each centre-cropped to a square,
    read left to right and top to bottom, with a thin gap between them."""
    count = grid * grid
    picks = [round(i * (len(frames) - 1) / (count - 1)) for i in range(count)]
    gap = 4
    cell = (SIZE - (grid - 1) * gap) // grid
    sheet = Image.new("RGB", (SIZE, SIZE), (16, 18, 24))
    for slot, index in enumerate(picks):
        frame = frames[index]
        side = min(frame.size)
        left, top = (frame.width - side) // 2, (frame.height - side) // 2
        tile = frame.crop((left, top, left + side, top + side)).resize((cell, cell), Image.LANCZOS)
        row, column = divmod(slot, grid)
        sheet.paste(tile, (column * (cell + gap), row * (cell + gap)))
    return sheet


def picture_of(frames: list[Image.Image]) -> Image.Image:
    return frames[0] if len(frames) == 1 else frame_grid(frames)


def with_band(image: Image.Image, text: str | None) -> Image.Image:
    """``image`` (SIZE x SIZE) with ``text`` on a dark band along its bottom edge."""
    if not text:
        return image
    image = image.copy()
    draw = ImageDraw.Draw(image, "RGBA")
    face = font(21, bold=True)
    height = 40
    draw.rectangle([0, SIZE - height, SIZE, SIZE], fill=(12, 14, 20, 215))
    draw.text((SIZE / 2, SIZE - height / 2), text, font=face, fill=(241, 243, 247), anchor="mm")
    return image


def square(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((SIZE, SIZE), Image.LANCZOS)


def render(paths: list[Path], url: str, timeout: float) -> list[Path]:
    import requests

    wc = workflow_convert()
    object_info = requests.get(f"{url}/object_info", timeout=120).json()
    written = []
    for path in paths:
        workflow = json.loads(path.read_text(encoding="utf-8"))
        entry = run_prompt(url, wc.to_prompt(workflow, object_info), timeout)
        picture = with_band(square(picture_of(first_result(url, entry))), badge_of(path))
        written.append(save_thumbnail(picture, thumbnail_path(path)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("render", help="run workflows on a ComfyUI server, keep the result")
    run.add_argument("workflows", nargs="+", type=Path)
    run.add_argument("--url", default="http://127.0.0.1:8188")
    run.add_argument("--timeout", type=float, default=1800.0, help="seconds per workflow")
    draw = commands.add_parser("illustrate", help="draw illustration cards")
    draw.add_argument("workflows", nargs="*", type=Path,
                      help="default: the workflows in workflows/ that declare model downloads")
    args = parser.parse_args(argv)

    if args.command == "render":
        written = render(args.workflows, args.url.rstrip("/"), args.timeout)
    else:
        paths = args.workflows or [
            p for p in sorted(WORKFLOWS_DIR.glob("*.json"))
            if declared_models(json.loads(p.read_text(encoding="utf-8")))]
        written = illustrate(paths)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
