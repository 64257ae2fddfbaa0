"""Pictures in, words out: the image data, the ViT + projector, the vision stage and the engine's image path."""
import io
import json
import os
import struct
import zlib

import pytest
import torch

from conftest import user_error
from test_browser import browser  # noqa: F401  (the headless Chromium fixture)
from gptlab import runs
from gptlab.errors import GptlabError
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.model.vision import VisionConfig, attach_vision


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    from gptlab.data.images import generate
    out = tmp_path_factory.mktemp("pictures")
    generate(out, seed=3, n=240, heldout=60)
    return out


def _png(width, height, pixels: bytes | None = None) -> bytes:
    """A PNG whose header claims width x height (pixels: one filtered row of zeros each, if not given)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = pixels if pixels is not None else b"".join(b"\0" + b"\0" * 3 * width for _ in range(min(height, 2)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ----- data ----------------------------------------------------------------------------------------
def test_pictures_are_deterministic_and_carry_checkable_questions(pictures, tmp_path):
    from gptlab.data.images import KINDS, generate, load_image_records
    generate(tmp_path, seed=3, n=240, heldout=60)
    for name in ("train.jsonl", "heldout.jsonl", "train/000007.png", "heldout/000003.png"):
        assert (tmp_path / name).read_bytes() == (pictures / name).read_bytes()
    rows = [json.loads(x) for x in (pictures / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 240
    first = rows[0]["messages"][0]["content"]
    assert first[0] == {"type": "image_url", "image_url": {"url": rows[0]["image"]}}
    kinds = {q["kind"] for r in rows for q in r["questions"]}
    assert kinds == set(KINDS)
    counts = {q["answer"] for r in rows for q in r["questions"] if q["kind"] == "count"}
    assert counts == {"1", "2", "3", "4", "5"}
    recs = load_image_records(pictures / "heldout.jsonl")
    assert len(recs) == 60 and recs[0]["image_turn"] == 0 and recs[0]["messages"][1]["role"] == "assistant"
    # held-out pictures are other pictures, not copies of training ones
    train_png = {(pictures / r["image"]).read_bytes() for r in rows}
    assert not any((pictures / "heldout" / f"{i:06d}.png").read_bytes() in train_png for i in range(60))


def test_own_records_and_bad_lines(tmp_path):
    from gptlab.data.images import load_image_records, png_bytes
    from PIL import Image
    (tmp_path / "cat.png").write_bytes(png_bytes(Image.new("RGB", (20, 30), (200, 0, 0))))
    good = {"image": "cat.png", "messages": [{"role": "user", "content": "What colour?"},
                                             {"role": "assistant", "content": "red"}]}
    (tmp_path / "mine.jsonl").write_text(json.dumps(good) + "\n")
    recs = load_image_records(tmp_path / "mine.jsonl")
    assert recs[0]["image_turn"] == 0 and recs[0]["messages"][0]["content"] == "What colour?"
    for bad, says in ((dict(good, image="dog.png"), "not found"), ({"messages": []}, "expected"),
                      (dict(good, messages=[{"role": "user", "content": "hi"}]), "assistant")):
        (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(GptlabError, match=f"bad.jsonl:2: .*{says}"):
            load_image_records(tmp_path / "bad.jsonl")


def test_bad_images_are_refused_with_one_line():
    from gptlab.data.images import decode_image, png_bytes
    from PIL import Image
    assert decode_image(png_bytes(Image.new("RGB", (100, 50))), "x").size == (48, 48)
    assert decode_image(_png(3, 2), "x").size == (48, 48)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    cases = [(b"hello, not a picture", "not a readable image"), (_png(100_000, 100_000), "pixels"),
             (buf.getvalue(), "unsupported image type TIFF"), (b"\x89PNG" + b"\0" * (5 << 20), "bytes"),
             (_png(4, 4)[:40], "not a readable image")]
    for data, says in cases:
        with pytest.raises(GptlabError, match=says) as e:
            decode_image(data, "upload")
        assert "\n" not in str(e.value)


# ----- model ---------------------------------------------------------------------------------------
def _tiny_vlm(tok, arch="gpt2", seed=0, width=32):
    from gptlab.tokenizer import IMAGE
    torch.manual_seed(seed)
    cfg = GPTConfig.preset("tiny", arch, vocab_size=tok.vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=width)
    model = GPT(cfg)
    with torch.no_grad():   # fast starts its blocks as the identity (zero projections): make them mix
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.02)
    attach_vision(model, VisionConfig(image_size=48, patch=12, width=32, layers=1, heads=2, pool=1,
                                      image_token_id=tok.special_id(IMAGE)))
    return model


@pytest.mark.parametrize("arch", ["gpt1", "gpt2", "modern", "fast"])
def test_pictures_reach_every_arch_and_the_run_folder_round_trips(arch, small_tokenizer, tmp_path, one_thread):
    from gptlab.tokenizer.chat_template import render_prompt
    tok = small_tokenizer
    model = _tiny_vlm(tok, arch).eval()
    k = model.vision.config.n_tokens
    ids = render_prompt(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
                        image_tokens=k)
    idx = torch.tensor([ids])
    a, b = torch.zeros(1, 3, 48, 48, dtype=torch.uint8), torch.full((1, 3, 48, 48), 200, dtype=torch.uint8)
    ha, hb = model.hidden(idx, images=a), model.hidden(idx, images=b)   # (fast's head starts at zero)
    assert not torch.allclose(ha[0, -1], hb[0, -1])          # the answer depends on the picture
    assert torch.allclose(ha[0, :1], hb[0, :1])                # ... and nothing before it does
    lb = model(idx, images=b)[0]
    runs.write_run_config(tmp_path, model.config, tok, "vision", extra={"vision": model.vision.config.to_dict()})
    runs.save_tensors(tmp_path / runs.MODEL_FILE, runs.gpt_state(model))
    assert any(k.startswith("vision.") for k in runs.load_tensors(tmp_path / runs.MODEL_FILE))
    back, _, _ = runs.load_run(tmp_path)
    assert torch.equal(back(idx, images=b)[0], lb)
    with pytest.raises(GptlabError, match="image"):           # one picture, but no <|image|> slots for it
        model(idx[:, -3:], images=a)


def test_text_only_models_refuse_pictures(small_tokenizer):
    from gptlab.tokenizer.chat_template import render_prompt
    tok = small_tokenizer
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                         {"type": "text", "text": "hi"}]}]
    with pytest.raises(GptlabError, match="text-only"):
        render_prompt(tok, msgs)
    model = GPT(GPTConfig.preset("tiny", "gpt2", vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_embd=32))
    with pytest.raises(GptlabError, match="text-only"):
        model(torch.tensor([[1, 2, 3]]), images=torch.zeros(1, 3, 48, 48, dtype=torch.uint8))


# ----- a tiny vision run trained here: the learner, chat, the server, export ---------------------------
COLOURS3 = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230)}


def _colour_set(folder, n, seed):
    """Pictures of one coloured square each, and the question which colour it is."""
    import random
    from PIL import Image, ImageDraw
    from gptlab.data.images import image_part, png_bytes
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        colour = rng.choice(list(COLOURS3))
        img = Image.new("RGB", (48, 48), (rng.randint(10, 60),) * 3)
        x, y, s = rng.randint(0, 30), rng.randint(0, 30), rng.randint(10, 18)
        ImageDraw.Draw(img).rectangle([x, y, x + s, y + s], fill=COLOURS3[colour])
        (folder / f"{i}.png").write_bytes(png_bytes(img))
        q = rng.choice(["What colour is it?", "colour?", "Which colour?"])
        rows.append({"image": f"{i}.png", "questions": [{"kind": "colour", "question": q, "answer": colour}],
                     "captions": [f"a {colour} square"],
                     "messages": [{"role": "user", "content": [image_part(f"{i}.png"), {"type": "text", "text": q}]},
                                  {"role": "assistant", "content": colour}]})
    return rows


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory, small_tokenizer):
    """A 1-layer GPT taught to name the colour of a square by `gptlab vision` (a few seconds)."""
    from gptlab.io import atomic_write_jsonl
    from gptlab.cli import main
    root = tmp_path_factory.mktemp("vision_run")
    (root / "data").mkdir()
    atomic_write_jsonl(root / "data" / "train.jsonl", _colour_set(root / "data", 300, 0))
    hold = root / "data" / "h"
    hold.mkdir()
    atomic_write_jsonl(root / "data" / "heldout.jsonl",
                       [dict(r, image=f"h/{r['image']}") for r in _colour_set(hold, 60, 1)])
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", "gpt2", vocab_size=small_tokenizer.vocab_size, block_size=64, n_layer=1,
                           n_head=2, n_embd=64)
    runs.write_run_config(root / "init", cfg, small_tokenizer, "pretrain")
    runs.save_tensors(root / "init" / runs.MODEL_FILE, runs.gpt_state(GPT(cfg)))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["vision", str(root / "init"), "--data", str(root / "data"), "--out", str(root / "run"),
                     "--max-steps", "100", "--align-steps", "10", "--batch-size", "16", "--patch", "12",
                     "--pool", "1", "--vision-width", "32", "--vision-layers", "1", "--vision-heads", "2",
                     "--eval-every", "100", "--eval-questions", "60", "--no-progress", "--lr", "3e-3"]) == 0
    finally:
        torch.set_num_threads(n)
    return root


def test_the_learner_reads_colours_it_was_never_shown(vision_run):
    """Held-out pictures: right far above chance with the picture, at chance with it blanked. A broken
    signal (pictures that never reach the decoder, or reach it out of order) fails the first check."""
    from gptlab.evals.vision import evaluate
    res = evaluate(vision_run / "run", vision_run / "data")
    colour = res["kinds"]["colour"]
    print(colour)
    assert colour["n"] == 60
    assert colour["accuracy"] >= 0.9, res["examples"][:5]
    assert colour["blank"] <= 0.6
    summary = json.loads((vision_run / "run" / "summary.json").read_text())
    assert summary["vision_accuracy"]["colour"] >= 0.9
    cfg = json.loads((vision_run / "run" / "config.json").read_text())
    assert cfg["stage"] == "vision" and cfg["vision"]["patch"] == 12


def _data_url(colour: str, size: int = 48) -> str:
    import base64
    from PIL import Image, ImageDraw
    from gptlab.data.images import png_bytes
    img = Image.new("RGB", (size, size), (30, 30, 30))
    ImageDraw.Draw(img).rectangle([10, 12, 26, 28], fill=COLOURS3[colour])
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def _ask(url, text="What colour is it?"):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vision_server(vision_run, tmp_path_factory):
    from test_serve import LiveServer
    from gptlab.serve.app import Backend, create_app
    from gptlab.serve.store import Store
    backend = Backend.from_run(vision_run / "run", device="cpu", max_batch=4)
    store = Store(tmp_path_factory.mktemp("vdb") / "chat.sqlite3")
    try:
        with LiveServer(create_app(backend, store=store)) as s:
            s.store = store
            yield s
    finally:
        backend.close()
        store.close()


def test_openai_client_sends_a_picture(vision_server):
    """A generated PNG through the official client, non-streaming and streaming: the colour comes back."""
    client = vision_server.client()
    for colour in COLOURS3:
        r = client.chat.completions.create(model="run", messages=_ask(_data_url(colour)), max_tokens=8, temperature=0)
        assert r.choices[0].message.content.strip() == colour
        chunks = list(client.chat.completions.create(model="run", messages=_ask(_data_url(colour)), max_tokens=8,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == colour
        assert r.usage.prompt_tokens > 16   # the picture's 16 positions are part of the prompt


def test_bad_pictures_get_openai_shaped_400s(vision_server):
    import base64
    import openai
    client = vision_server.client()
    tiff = io.BytesIO()
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tiff, format="TIFF")
    cases = {
        "https://example.com/cat.png": "data: URLs",
        "/etc/passwd": "data: URLs",
        "file:///etc/passwd": "data: URLs",
        "data:image/png;base64,!!!!": "base64",
        "data:image/png," + "x" * 10: "base64-encoded",
        "data:image/png;base64," + base64.b64encode(b"not a picture at all").decode(): "not a readable image",
        "data:image/png;base64," + base64.b64encode(_png(60_000, 60_000)).decode(): "pixels",
        "data:image/tiff;base64," + base64.b64encode(tiff.getvalue()).decode(): "TIFF",
    }
    for url, says in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="run", messages=_ask(url), max_tokens=4)
        assert e.value.status_code == 400 and says in e.value.body["message"], (url, e.value.body)
        assert e.value.body["param"].startswith("messages[0].content[0]")
    with pytest.raises(openai.BadRequestError, match="only a user message"):
        client.chat.completions.create(model="run", max_tokens=4, messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _data_url("red")}}]}])


def test_text_only_server_refuses_pictures(small_tokenizer):
    import openai
    from test_serve import LiveServer
    from gptlab.generate.engine import Engine
    from gptlab.serve.app import Backend, create_app
    model = GPT(GPTConfig(vocab_size=small_tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    backend = Backend(Engine(model, small_tokenizer), "text", max_batch=2)
    try:
        with LiveServer(create_app(backend)) as s:
            with pytest.raises(openai.BadRequestError, match="text-only"):
                s.client().chat.completions.create(model="text", messages=_ask(_data_url("red")), max_tokens=4)
    finally:
        backend.close()


def test_web_page_stores_pictures_with_the_conversation(vision_server):
    from test_serve import page_client
    from gptlab.serve.store import Store
    http = page_client(vision_server)
    cid = http.post("/api/conversations", json={}).json()["id"]
    r = http.post(f"/api/conversations/{cid}/messages",
                  json={"content": "What colour is it?", "images": [_data_url("blue")], "temperature": 0})
    assert r.status_code == 200 and '"done"' in r.text
    view = http.get(f"/api/conversations/{cid}").json()
    user, answer = view["messages"]
    assert user["images"] == [_data_url("blue")] and answer["content"].strip() == "blue"
    bad = http.post(f"/api/conversations/{cid}/messages", json={"content": "and this?", "images": ["http://x/y.png"]})
    assert bad.status_code == 400 and len(http.get(f"/api/conversations/{cid}").json()["messages"]) == 2
    # the pictures are in SQLite itself
    db = Store(vision_server.store.path)
    assert db.chat_messages(cid, user["id"], with_images=True)[-1]["content"][0]["type"] == "image"
    db.close()


def test_chat_repl_shows_a_picture(vision_run, capsys):
    from gptlab.chat.repl import ChatSession
    from gptlab.generate.engine import Engine, SamplingParams
    model, tok, _ = runs.load_run(vision_run / "run")
    out = io.StringIO()
    pic = vision_run / "data" / "h" / "0.png"
    truth = [r for r in map(json.loads, (vision_run / "data" / "heldout.jsonl").read_text().splitlines())
             if r["image"] == "h/0.png"][0]["questions"][0]["answer"]
    lines = iter([f"/image {pic}", "What colour is it?", "/image nowhere.png", "/quit"])
    ChatSession(Engine(model, tok), SamplingParams(max_new_tokens=8, temperature=0), input_fn=lambda _: next(lines),
                out=out).run()
    text = out.getvalue()
    assert f"gpt> {truth}" in text and "no such image file" in text


@pytest.mark.browser
def test_page_attaches_a_picture(vision_server, tmp_path, request):
    """Headless Chromium: attach a PNG with the paper clip, ask, see the picture in the thread and the
    model's answer about it."""
    import base64
    import test_browser
    if not (os.path.exists(test_browser.CHROMIUM) and os.path.exists(test_browser.DRIVER)):
        pytest.skip("needs /usr/bin/chromium and chromedriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    wait_for = test_browser.wait_for
    pic = tmp_path / "green.png"
    pic.write_bytes(base64.b64decode(_data_url("green").split(",", 1)[1]))
    d = request.getfixturevalue("browser")
    d.get(vision_server.url + "/")
    wait_for(lambda: "context" in d.find_element(By.ID, "model-info").text)
    d.find_element(By.ID, "temperature").send_keys(Keys.HOME)
    d.find_element(By.ID, "image-input").send_keys(str(pic))
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, "#attachments img.picture"))
    test_browser.shot(d, "vision-01-attached")
    box = d.find_element(By.ID, "input")
    box.send_keys("What colour is it?")
    box.send_keys(Keys.ENTER)
    wait_for(lambda: d.find_elements(By.CSS_SELECTOR, ".row.assistant[data-id] .thumb-up"), timeout=20)
    test_browser.shot(d, "vision-02-answered")
    assert d.find_elements(By.CSS_SELECTOR, ".row.user img.picture")
    assert d.find_element(By.CSS_SELECTOR, ".row.assistant .msg").text.strip() == "green"
    assert not d.find_elements(By.CSS_SELECTOR, "#attachments img.picture")   # sent, no longer pending


def test_cli_errors_are_one_line(tmp_path, capsys, small_tokenizer):
    assert "--n" in user_error(capsys, "data", "images", "--out", tmp_path / "p", "--n", "0")
    assert "no such" in user_error(capsys, "vision", tmp_path / "nope", "--data", tmp_path / "p", "--out", tmp_path / "o")


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_hf_export_of_a_vision_run_loads_back_with_equal_logits(arch, small_tokenizer, tmp_path, one_thread):
    from gptlab.cli import main
    from gptlab.tokenizer.chat_template import render_prompt
    tok = small_tokenizer
    model = _tiny_vlm(tok, arch).eval()
    runs.write_run_config(tmp_path / "run", model.config, tok, "vision", extra={"vision": model.vision.config.to_dict()})
    runs.save_tensors(tmp_path / "run" / runs.MODEL_FILE, runs.gpt_state(model))
    assert main(["export", str(tmp_path / "run"), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "vision.safetensors").is_file()
    assert not any(k.startswith("vision.") for k in runs.load_tensors(tmp_path / "hf" / "model.safetensors"))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _, cfg = runs.load_run(tmp_path / "back")
    assert cfg["vision"] == model.vision.config.to_dict()
    ids = render_prompt(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "colour?"}]}],
                        image_tokens=model.vision.config.n_tokens)
    pic = torch.randint(0, 256, (1, 3, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(model(torch.tensor([ids]), images=pic)[0], back(torch.tensor([ids]), images=pic)[0],
                              atol=1e-5)
    # transformers reads the decoder (the text path) from the same folder
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    text = torch.tensor([tok.encode("the colour")])
    with torch.no_grad():
        assert torch.allclose(hf(text).logits, model(text)[0], atol=1e-4)
