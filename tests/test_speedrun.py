"""The speedrun on its miniature preset: every stage's output, the report, and skipping finished stages."""
import json
from pathlib import Path

import pytest

from gptlab.cli import main
from conftest import SAMPLE_TEXT


@pytest.fixture(scope="module")
def speedrun_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("speedrun")
    corpus = root / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT * 10, encoding="utf-8")
    out = root / "out"
    assert main(["speedrun", "--preset", "test", "--corpus", str(corpus), "--out", str(out), "--no-progress",
                 "--vision"]) == 0
    return out, corpus


def test_every_stage_leaves_its_output(speedrun_dir):
    out, _ = speedrun_dir
    for path in ["data/data.done", "tokenizer/tokenizer.json", "pretrain/summary.json", "pretrain/loss.png",
                 "eval_pretrain/results.json", "eval_pretrain/accuracy_vs_shots.png", "sft/summary.json",
                 "rankings.jsonl", "rm/summary.json", "ppo/summary.json", "ppo/curves.png", "dpo/summary.json",
                 "compare/ppo_vs_sft.json", "exam/results.json", "exam/results.png", "compare/rlhf.png",
                 "data/instruct/transcripts.txt", "report.md", "images/heldout.jsonl", "vision/summary.json",
                 "eval_vision/results.json", "eval_vision/accuracy.png"]:
        assert (out / path).is_file(), path
    report = (out / "report.md").read_text()
    # The report leads with the three results a user came for, before any stage detail.
    heads = ["### 1. It answers questions", "### 2. RLHF against SFT", "### 3. In-context learning", "## Stages"]
    assert [report.index(h) for h in heads] == sorted(report.index(h) for h in heads)
    assert "seed 0" in report.splitlines()[0]
    exam = json.loads((out / "exam" / "results.json").read_text())
    assert {Path(k).name for k in exam["results"]} == {"sft", "ppo", "dpo"}
    assert "Exam questions and the **ppo** model's answers" in report
    for section in ["## Stages", "## Pre-training", "## Zero- and few-shot", "## SFT", "## Reward model",
                    "## PPO-ptx", "## Held-out win rates", "## Pictures", "## Samples", "gptlab chat"]:
        assert section in report, section
    assert "![](images/heldout/" in report   # sample pictures, linked relative to the report
    state = json.loads((out / "speedrun.json").read_text())
    assert set(state["stages"]) >= {"data", "pretrain", "sft", "rm", "ppo", "dpo", "compare"}
    # Pre-training reads the copy and arithmetic drills beside the corpus, the mixture and the transcripts.
    drills = sorted((out / "data" / "drills").iterdir())
    assert [p.name.split("_")[0] for p in drills] == ["arithmetic", "copy", "dictionary"]
    assert all(p.stat().st_size > 100_000 for p in drills)
    sources = json.loads((out / "pretrain" / "config.json").read_text())["data"]
    assert all(f"{p}:1" in sources for p in drills) and len(sources) == 6


def test_rerun_skips_finished_stages_and_redoes_missing_ones(speedrun_dir, capsys):
    out, corpus = speedrun_dir
    # Pretend the run died during PPO: its summary (written last) and everything after it are missing.
    (out / "ppo" / "summary.json").unlink()
    for f in (out / "compare").glob("ppo_*.json"):
        f.unlink()
    capsys.readouterr()
    assert main(["speedrun", "--preset", "test", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 0
    log = capsys.readouterr().out
    for stage in ["data", "tokenizer", "pretrain", "eval_pretrain", "sft", "label", "rm", "dpo"]:
        assert f"] {stage}:" in log and f"{stage}: " in log
        line = next(l for l in log.splitlines() if f"] {stage}:" in l)
        assert "already done, skipped" in line, line
    ppo_line = next(l for l in log.splitlines() if "] ppo:" in l)
    assert "skipped" not in ppo_line
    assert "--resume" in log   # PPO continued from its checkpoint instead of starting over
    assert (out / "ppo" / "summary.json").is_file() and (out / "compare" / "ppo_vs_sft.json").is_file()
