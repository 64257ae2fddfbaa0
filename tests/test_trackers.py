"""Experiment tracking: --log tensorboard writes event files into the run folder that tensorboard's
own reader returns row for row as metrics.jsonl; a resumed run purges the abandoned stretch;
--log wandb logs offline (WANDB_MODE=offline) the same numbers; missing packages and unknown trackers
are one-line errors."""
import json
from pathlib import Path

import pytest

from conftest import user_error
from gptlab.cli import main
from test_pretrain import pretrain_args, rows, tok_dir  # noqa: F401  (tok_dir: fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_mirrors_metrics_and_resume_purges(tmp_path, corpus_file, tok_dir):  # noqa: F811
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    common = ["--batch-size", "4", "--log-every", "2", "--eval-every", "4", "--eval-batches", "1",
              "--ckpt-every", "4", "--log", "tensorboard"]
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "6", *common)) == 0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # The run goes on from its step-4 checkpoint (a crash after step 4): rows 5-6 are written again.
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "8", "--resume", *common)) == 0
    scalars = tensorboard_scalars(out)
    metrics = rows(out)
    for key in ("train_loss", "lr", "val_loss", "tokens_per_s", "grad_norm"):
        want = [(r["step"], r[key]) for r in metrics if key in r]
        got = scalars[f"pretrain/{key}"]
        assert [s for s, _ in got] == [s for s, _ in want], key        # no step twice
        assert all(abs(a - b) <= 1e-6 * max(1, abs(b)) for (_, a), (_, b) in zip(got, want)), key


def wandb_records(path: Path):
    """The protobuf records of a W&B offline log: a 7-byte file header, then LevelDB-style log records
    (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks whose
    tails shorter than a record header are zero padding."""
    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield buf
            buf = b""
        elif kind == 0:
            buf = b""


def test_wandb_offline(tmp_path, corpus_file, tok_dir, monkeypatch):  # noqa: F811
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(pretrain_args(corpus_file, tok_dir, out, "--max-steps", "4", "--batch-size", "4", "--log-every", "2",
                              "--eval-every", "4", "--eval-batches", "1", "--log", "wandb")) == 0
    [log] = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    history = {}
    for data in wandb_records(log):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history[items["_step"]] = items
    for r in rows(out):
        assert history[r["step"]]["pretrain/train_loss"] == pytest.approx(r["train_loss"])
    assert history[4]["pretrain/val_loss"] == pytest.approx(rows(out)[-1]["val_loss"])


def test_tracker_errors(tmp_path, corpus_file, tok_dir, capsys, monkeypatch):  # noqa: F811
    import builtins
    real_import = builtins.__import__

    def no_tensorboard(name, *a, **kw):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    msg = user_error(capsys, *pretrain_args(corpus_file, tok_dir, tmp_path / "r", "--max-steps", "2",
                                            "--log", "tensorboard"))
    assert "pip install 'gptlab[tensorboard]'" in msg
    with pytest.raises(SystemExit):
        main(pretrain_args(corpus_file, tok_dir, tmp_path / "r2", "--log", "mlflow"))
