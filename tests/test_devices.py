"""Devices: --device auto picks CUDA, then Apple MPS, then the CPU, each with the precision it
supports; the MPS and CUDA code paths (grouped-query attention by copies, device synchronisation,
the KV-cache engine, a training run) run wherever that hardware exists and skip elsewhere with the
reason; activation checkpointing gives the same gradients for a fraction of the saved activations."""
import pytest
import torch

from gptlab import device as dev
from gptlab.cli import main
from gptlab.generate.engine import Engine, SamplingParams
from gptlab.model.gpt import GPT, GPTConfig
from gptlab.train.memory import checkpoint_blocks
from test_pretrain import pretrain_args, rows, tok_dir  # noqa: F401  (tok_dir: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_MPS = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
needs_mps = pytest.mark.skipif(not HAS_MPS, reason="Apple MPS is not available here (it needs Apple silicon and "
                               "macOS's PyTorch build); these MPS code paths run on a Mac")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.pick_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.pick_device("auto").type == "cpu" and dev.pick_device("cpu").type == "cpu"


def test_precision_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert dev.autocast_dtype(torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)   # e.g. a T4 or V100
    assert dev.autocast_dtype(torch.device("cuda")) is None
    assert dev.autocast_dtype(torch.device("mps")) is None and dev.autocast_dtype(torch.device("cpu")) is None
    assert "fp32" in dev.describe_device(torch.device("cpu"))


def _tiny(arch="modern", **kw):
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("tiny", arch, vocab_size=448, block_size=64, n_layer=2, n_embd=64, **kw)).eval()


def _same_on(device: str, small_tokenizer):
    """Logits and greedy generation on ``device`` equal the CPU's (GQA: MPS/CUDA repeat keys/values)."""
    model = _tiny(n_kv_head=2)
    x = torch.tensor([small_tokenizer.encode("To be, or not to be")])
    with torch.no_grad():
        cpu_logits = model(x)[0]
        other = model.to(device)
        logits = other(x.to(device))[0].cpu()
    assert (logits - cpu_logits).abs().max() < 1e-3
    params = SamplingParams(max_new_tokens=12, temperature=0)
    got = Engine(other, small_tokenizer).generate([x[0].tolist()], params)[0].ids
    want = Engine(model.to("cpu"), small_tokenizer).generate([x[0].tolist()], params)[0].ids
    assert got == want
    assert dev.measure_matmul_peak(torch.device(device), n=256, seconds=0.05) > 0   # synchronised timing


@needs_mps
def test_mps_matches_cpu(small_tokenizer):
    _same_on("mps", small_tokenizer)


@needs_mps
def test_mps_trains(tmp_path, corpus_file, tok_dir):  # noqa: F811
    assert main(pretrain_args(corpus_file, tok_dir, tmp_path / "run", "--device", "mps", "--max-steps", "4",
                              "--eval-every", "4", "--eval-batches", "1")) == 0
    assert rows(tmp_path / "run")[-1]["val_loss"] > 0


@needs_cuda
def test_cuda_matches_cpu(small_tokenizer):
    _same_on("cuda", small_tokenizer)


def _saved_bytes(model, x, y) -> int:
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return total[0]


@pytest.mark.parametrize("arch", ["gpt2", "fast"])
def test_activation_checkpointing_same_gradients_less_memory(arch):
    model = _tiny(arch).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 448, (4, 64), generator=g), torch.randint(0, 448, (4, 64), generator=g)
    plain = _saved_bytes(model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    restore = checkpoint_blocks(model)
    ckpt = _saved_bytes(model, x, y)
    assert ckpt < 0.5 * plain
    for p, want in zip(model.parameters(), grads):
        assert torch.allclose(p.grad, want, atol=1e-6)
    restore()
    model.zero_grad()
    assert _saved_bytes(model, x, y) == plain


def test_activation_checkpointing_flag(tmp_path, corpus_file, tok_dir):  # noqa: F811
    args = ["--max-steps", "6", "--batch-size", "4", "--eval-every", "6", "--eval-batches", "1", "--log-every", "2"]
    assert main(pretrain_args(corpus_file, tok_dir, tmp_path / "a", *args)) == 0
    assert main(pretrain_args(corpus_file, tok_dir, tmp_path / "b", *args, "--activation-checkpointing")) == 0
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], rel=1e-5)


def test_the_device_comparison_itself_runs_on_cpu(small_tokenizer):
    _same_on("cpu", small_tokenizer)   # the helper the MPS and CUDA tests use, exercised here
