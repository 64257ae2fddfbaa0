"""Pictures with checkable questions: the data a vision-language model learns to see from.

    gptlab data images --out ~/.cache/gptlab/images --seed 0 --n 4000

Every picture is drawn with Pillow from a seeded generator, so the same seed gives the same set on a
machine with the same fonts. Three kinds of picture:

* ``shapes``: 1 to 5 shapes of one kind and colour (circle, square, triangle, diamond, star) of a few
  sizes at random places: questions about the colour, the shape and how many there are.
* ``text``: a digit, a capital letter or a short word, in one of the fonts found on the machine (Pillow's
  built-in font and any DejaVu / Liberation TTF; nothing is downloaded), at a few sizes, rotated a
  little, with pixel noise and clutter lines: "what does it say?".
* ``scene``: two objects of different shapes and colours side by side or one above the other:
  questions about where one is relative to the other, and about each one's colour.

Each record carries the picture's questions (with their kind and checkable answer) and captions, and
``messages``: the questions as one multi-turn conversation whose first user turn holds the picture as
an OpenAI-style content part. ``train.jsonl`` and ``heldout.jsonl`` hold different pictures drawn
from different seeds. The same JSONL format (``{"image": PATH, "messages": [...]}``) is what a user's
own folder of pictures provides (``load_image_records``).
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_bytes, atomic_write_jsonl

SIZE = 48                      # pixels per side: small enough for a CPU, big enough to read a word
MAX_IMAGE_BYTES = 4 << 20      # a picture file or upload larger than this is refused
MAX_PIXELS = 4096 * 4096       # decoded size limit: a tiny PNG may claim a huge canvas (decompression bomb)

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
           "yellow": (235, 215, 40), "purple": (150, 60, 200), "orange": (245, 140, 30)}
SHAPES = ["circle", "square", "triangle", "diamond", "star"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five"]
WORDS = ["cat", "dog", "sun", "box", "car", "hat", "cup", "pen", "map", "bus", "egg", "fox",
         "owl", "key", "bed", "ink", "jam", "leg", "net", "pig", "toy", "zip", "web", "arm"]
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KINDS = ["colour", "shape", "count", "read", "relation"]

# Several ways a person asks the same thing: the model must learn the question, not one string.
ASK = {
    "colour": ["What colour are the shapes?", "what color is it?", "Which colour do you see?",
               "Tell me the colour of the shapes.", "What is the colour here?", "colour?"],
    "shape": ["What shape is this?", "Which shape is in the picture?", "what kind of shape do you see?",
              "Name the shape.", "What are these shapes called?", "shape?"],
    "count": ["How many shapes are there?", "how many are there?", "Count the shapes.",
              "What is the number of shapes in the picture?", "How many things do you see?", "count them"],
    "read": ["What does it say?", "Read the text in the picture.", "what is written here?",
             "What text do you see?", "Can you read this?", "read it"],
}
CAPTION = ["Describe the picture.", "What is in this image?", "Caption this picture.", "describe it"]


# ----- fonts: only what is on this machine ---------------------------------------------------------
_FONT_NAMES = ["DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf", "LiberationSans-Regular.ttf"]
_FONT_DIRS = ["/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/liberation",
              "/usr/share/fonts/TTF", "/usr/share/fonts/dejavu", "/usr/share/fonts/liberation"]


def font_files() -> list[str]:
    """TTFs of the few known families installed here (sorted, so a seed draws the same font)."""
    found = []
    for name in _FONT_NAMES:
        for d in _FONT_DIRS:
            if (Path(d) / name).is_file():
                found.append(str(Path(d) / name))
                break
    return found


def _font(path: str | None, size: int):
    from PIL import ImageFont
    if path is None:
        return ImageFont.load_default(size=size)   # Pillow's own font: always present
    return ImageFont.truetype(path, size)


# ----- drawing -------------------------------------------------------------------------------------
def _background(rng: random.Random):
    """A dark grey canvas with pixel noise (shapes and text are drawn in bright colours on it)."""
    from PIL import Image
    level = rng.randint(15, 70)
    noise = bytes(level - 12 + b % 25 for b in rng.randbytes(SIZE * SIZE))
    grey = Image.frombytes("L", (SIZE, SIZE), noise)
    return Image.merge("RGB", (grey, grey, grey))


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if kind == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    raise ValueError(kind)


def _draw_shape(draw, kind: str, cx: float, cy: float, r: float, rgb) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif kind == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    else:
        draw.polygon(_shape_points(kind, cx, cy, r), fill=rgb)


def _jitter(rng: random.Random, rgb) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in rgb)


def _place(rng: random.Random, n: int, r: float) -> list[tuple[float, float]] | None:
    """``n`` centres at least 2r + 2 apart inside the canvas (None when the draw fails: try again)."""
    out: list[tuple[float, float]] = []
    for _ in range(200):
        c = (rng.uniform(r + 1, SIZE - r - 1), rng.uniform(r + 1, SIZE - r - 1))
        if all(math.dist(c, o) >= 2 * r + 2 for o in out):
            out.append(c)
            if len(out) == n:
                return out
    return None


def _shapes_picture(rng: random.Random):
    from PIL import ImageDraw
    while True:
        n, kind, colour = rng.randint(1, 5), rng.choice(SHAPES), rng.choice(list(COLOURS))
        r = rng.choice([4.5, 5.5, 7.0]) if n > 2 else rng.choice([5.5, 7.0, 9.0])
        centres = _place(rng, n, r)
        if centres:
            break
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    for cx, cy in centres:
        _draw_shape(draw, kind, cx, cy, r, _jitter(rng, COLOURS[colour]))
    plural = kind + "s" if n > 1 else kind
    questions = [q("colour", rng, colour), q("shape", rng, kind), q("count", rng, str(n))]
    captions = [f"{NUMBER_WORDS[n]} {colour} {plural}", f"{n} {colour} {plural}"]
    return img, questions, captions


def _text_picture(rng: random.Random, fonts: list[str | None]):
    from PIL import Image, ImageDraw
    what = rng.choice(["digit", "letter", "word", "word"])
    text = {"digit": lambda: str(rng.randint(0, 9)), "letter": lambda: rng.choice(LETTERS),
            "word": lambda: rng.choice(WORDS)}[what]()
    size = rng.choice([16, 19, 22]) if what == "word" else rng.choice([20, 26, 32])
    font = _font(rng.choice(fonts), size)
    layer = Image.new("L", (SIZE, SIZE), 0)
    d = ImageDraw.Draw(layer)
    left, top, right, bottom = d.textbbox((0, 0), text, font=font)
    w, h = right - left, bottom - top
    x = rng.uniform(1, max(1, SIZE - w - 1)) - left
    y = rng.uniform(1, max(1, SIZE - h - 1)) - top
    d.text((x, y), text, fill=255, font=font)
    layer = layer.rotate(rng.uniform(-12, 12), resample=Image.BILINEAR)
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(0, 3)):   # clutter: thin lines in the background colour range
        draw.line([(rng.randint(0, SIZE), rng.randint(0, SIZE)), (rng.randint(0, SIZE), rng.randint(0, SIZE))],
                  fill=(rng.randint(60, 120),) * 3, width=1)
    ink = _jitter(rng, (235, 235, 235) if rng.random() < 0.5 else rng.choice(list(COLOURS.values())))
    img.paste(Image.new("RGB", (SIZE, SIZE), ink), (0, 0), layer)
    questions = [q("read", rng, text.lower() if what == "word" else text)]
    captions = [f'the {what} "{text}"', f'{what} {text}']
    return img, questions, captions


def _scene_picture(rng: random.Random):
    from PIL import ImageDraw
    (k1, k2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(list(COLOURS), 2)
    r = 7.0
    across = rng.random() < 0.5
    lo, hi = rng.uniform(r + 1, SIZE / 2 - r), rng.uniform(SIZE / 2 + r, SIZE - r - 1)
    other = [rng.uniform(r + 1, SIZE - r - 1) for _ in range(2)]
    # object 1 is left of / above object 2
    p1, p2 = ((lo, other[0]), (hi, other[1])) if across else ((other[0], lo), (other[1], hi))
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    _draw_shape(draw, k1, *p1, r, _jitter(rng, COLOURS[c1]))
    _draw_shape(draw, k2, *p2, r, _jitter(rng, COLOURS[c2]))
    a, b = f"the {c1} {k1}", f"the {c2} {k2}"
    side1, side2 = ("left", "right") if across else ("top", "bottom")
    where = "left of" if across else "above"
    questions = [
        {"kind": "relation", "question": rng.choice([f"Where is {a}?", f"Is {a} on the {side1} or the {side2}?"]),
         "answer": side1},
        {"kind": "relation", "question": rng.choice([f"Where is {b}?", f"Is {b} on the {side1} or the {side2}?"]),
         "answer": side2},
        {"kind": "colour", "question": rng.choice([f"What colour is the {k1}?", f"which colour is the {k1}?"]),
         "answer": c1},
    ]
    rng.shuffle(questions)
    captions = [f"{a[4:]} {where} {b[4:]}"]
    return img, questions, captions


def q(kind: str, rng: random.Random, answer: str) -> dict:
    return {"kind": kind, "question": rng.choice(ASK[kind]), "answer": answer}


def draw_picture(rng: random.Random, fonts: list[str | None]):
    """(PIL image, questions, captions) of one random picture."""
    r = rng.random()
    if r < 0.45:
        return _shapes_picture(rng)
    if r < 0.8:
        return _text_picture(rng, fonts)
    return _scene_picture(rng)


# ----- records -------------------------------------------------------------------------------------
def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def conversation(image: str, turns: list[tuple[str, str]]) -> list[dict]:
    """The (question, answer) turns as one conversation whose first user turn shows the picture."""
    msgs: list[dict] = []
    for i, (question, answer) in enumerate(turns):
        content = [image_part(image), {"type": "text", "text": question}] if i == 0 else question
        msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return msgs


def make_record(image: str, questions: list[dict], captions: list[str], rng: random.Random) -> dict:
    turns = [(x["question"], x["answer"]) for x in questions]
    return {"image": image, "messages": conversation(image, turns),
            "questions": questions, "captions": captions,
            "caption_prompt": rng.choice(CAPTION)}


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _write_picture(path: Path, data: bytes) -> None:
    """Temporary file + rename, without an fsync per file: thousands of fsyncs made drawing the set
    four times slower. A killed run leaves no half-written picture, and a split only exists once its
    JSONL (written last, fsynced) names its pictures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def generate(out: str | Path, seed: int = 0, n: int = 4000, heldout: int = 400) -> dict:
    """Write ``n`` training and ``heldout`` held-out pictures with their records under ``out``."""
    if n < 1 or heldout < 0:
        raise GptlabError("--n must be at least 1 and --heldout at least 0")
    out = Path(out)
    fonts: list[str | None] = [None] + font_files()
    counts = {}
    for split, size, salt in (("train", n, 0), ("heldout", heldout, 1)):
        rng = random.Random(f"images:{seed}:{salt}")
        rows = []
        for i in range(size):
            img, questions, captions = draw_picture(rng, fonts)
            rel = f"{split}/{i:06d}.png"
            _write_picture(out / rel, png_bytes(img))
            rows.append(make_record(rel, questions, captions, rng))
        atomic_write_jsonl(out / f"{split}.jsonl", rows)
        counts[split] = size
    meta = {"seed": seed, "size": SIZE, "fonts": [f or "pillow-default" for f in fonts], **counts}
    atomic_write_bytes(out / "meta.json", json.dumps(meta, indent=1).encode())
    return meta


# ----- reading pictures and records ----------------------------------------------------------------
def decode_image(data: bytes, where: str, size: int = SIZE):
    """Bytes of a PNG/JPEG/GIF/WebP/BMP -> an RGB ``size`` x ``size`` PIL image; GptlabError otherwise.

    The header is read before the pixels: a picture that claims more than MAX_PIXELS is refused
    without decoding it (a small file can unpack to gigabytes)."""
    from PIL import Image, UnidentifiedImageError
    if len(data) > MAX_IMAGE_BYTES:
        raise GptlabError(f"{where}: the image is {len(data):,} bytes; the limit is {MAX_IMAGE_BYTES:,}")
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ("PNG", "JPEG", "GIF", "WEBP", "BMP"):
            raise GptlabError(f"{where}: unsupported image type {img.format} (use PNG, JPEG, GIF, WebP or BMP)")
        if img.width * img.height > MAX_PIXELS:
            raise GptlabError(f"{where}: the image is {img.width}x{img.height} pixels; the limit is "
                              f"{MAX_PIXELS:,} pixels")
        img.load()
        img = img.convert("RGB")
    except GptlabError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise GptlabError(f"{where}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return img


_MAGIC = [(b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"), (b"GIF8", "image/gif"), (b"BM", "image/bmp")]


def image_mime(data: bytes) -> str:
    """The MIME type of picture bytes, by their first bytes (what a page needs to show them again)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if data.startswith(magic)), "application/octet-stream")


def pixels_of(img):
    """A decoded RGB PIL image -> a uint8 tensor [3, H, W] (what the vision encoder reads)."""
    import torch
    t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return t.view(img.height, img.width, 3).permute(2, 0, 1).contiguous()


def read_image_file(path: str | Path, size: int = SIZE):
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path}: no such image file")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise GptlabError(f"{path}: the image is larger than {MAX_IMAGE_BYTES:,} bytes")
    return decode_image(path.read_bytes(), str(path), size)


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def load_image_records(path: str | Path) -> list[dict]:
    """Records of a JSONL of pictures; each line ``{"image": PATH, "messages": [...]}`` (PATH relative
    to the JSONL's folder). Messages use OpenAI content parts; the picture goes where the first user
    turn has an ``image_url`` part, or before its text when it has none. Every line is checked first."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path}: no such file (make one with `gptlab data images --out DIR`)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GptlabError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not isinstance(row.get("messages"), list):
            raise GptlabError(f'{where}: expected {{"image": "path.png", "messages": [...]}}')
        image = (path.parent / row["image"]).resolve()
        if not image.is_file():
            raise GptlabError(f"{where}: image {row['image']} not found next to {path.name}")
        msgs = []
        for i, m in enumerate(row["messages"]):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(m.get("content"), (str, list)):
                raise GptlabError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': ...}}")
            msgs.append({"role": m["role"], "content": _text_of(m["content"])})
        first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
        if first_user is None or not any(m["role"] == "assistant" for m in msgs):
            raise GptlabError(f"{where}: a conversation needs a user turn and an assistant answer")
        rows.append({"image": str(image), "messages": msgs, "image_turn": first_user,
                     "questions": row.get("questions") or [], "captions": row.get("captions") or [],
                     "caption_prompt": row.get("caption_prompt") or CAPTION[0]})
    if not rows:
        raise GptlabError(f"{path}: no records")
    return rows


def register_parser(dsub) -> None:
    p = dsub.add_parser("images", help="draw captioned, question-answered pictures (vision training data)",
                        description="Draw pictures with Pillow (shapes, counts, colours, rendered text, "
                        "two-object scenes), each with checkable questions and captions: train.jsonl and "
                        "heldout.jsonl of {\"image\", \"messages\"} records plus the PNGs.")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=4000, help="training pictures")
    p.add_argument("--heldout", type=int, default=400, help="held-out pictures")

    def run(args) -> int:
        meta = generate(args.out, args.seed, args.n, args.heldout)
        print(f"{args.out}: {meta['train']} train + {meta['heldout']} held-out pictures, {SIZE}x{SIZE} px, "
              f"fonts: {', '.join(Path(f).name for f in meta['fonts'])}")
        return 0
    p.set_defaults(func=run)
