"""``gptlab speedrun``: the whole recipe, one command, with a report card.

corpus -> task mixture + instruction curriculum -> tokenizer -> pre-training -> zero/few-shot eval ->
SFT -> labeler rankings -> reward model -> PPO-ptx (and DPO) -> head-to-head evals -> report.md

Every stage runs the same commands a user would type (through ``gptlab.cli.main``), writes into its own
folder under --out, and counts as finished only when its last file is in place (a run's summary.json,
an eval's results.json, a ``.done`` marker for data stages; all written atomically). A killed speedrun
therefore continues where it stopped: finished stages are skipped and a training stage cut short
resumes from its checkpoint (``--resume``).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptlab.errors import GptlabError
from gptlab.io import atomic_write_json, atomic_write_text, read_json

# Per preset: model shape and per-stage budgets. ``seconds`` are expected durations, used for the ETA.
PRESETS = {
    # The whole run on a 2-core CPU in about 15 minutes.
    # One token per character: a word is the same tokens wherever it stands (after a space, in quotes), so
    # echoing it, copying it from a dictionary or spelling it backwards is plain copying. Against a 4096-token
    # BPE on the same data and seed it copied far more (docs/INSTRUCT.md, "Tokenizer"). Eight rows in
    # thirteen are drills (gptlab/data/drills.py): without copy drills this model hardly copies at all, the
    # sums in the mixed corpus are too few to learn two-digit arithmetic in seven minutes, and the
    # dictionary too thin to learn its words.
    "cpu": dict(arch="fast", preset="tiny", model=["--block-size", "256"], mixture_lines=100_000, per_family=6000,
                tokenizer=["--kind", "char"], exam_n=40,
                corpus_weights=dict(text=1, mixture=2, transcripts=2, copy=3, arithmetic=3, dictionary=2),
                pretrain=["--max-steps", "1400", "--batch-size", "16", "--time-budget", "400",
                          "--eval-every", "250", "--ckpt-every", "250"],
                eval=["--shots", "0,1,4", "--n", "60", "--tasks", "icl"],
                sft=["--max-steps", "600", "--batch-size", "16", "--lr", "1e-3", "--time-budget", "170",
                     "--eval-max-items", "120", "--eval-every", "250", "--ckpt-every", "250"],
                label=["-k", "4", "--max-prompts", "500", "--noise", "0.16", "--max-new-tokens", "56"],
                rm=["--batch-size", "8", "--time-budget", "60", "--ckpt-every", "200"],
                ppo=["--max-steps", "120", "--rollout-batch", "32", "--samples", "8", "--minibatch", "16",
                     "--ppo-epochs", "2", "--lr", "5e-5", "--max-new-tokens", "48", "--eval-n", "60",
                     "--eval-every", "40", "--time-budget", "90", "--kl-target", "0.5", "--kl-horizon", "64",
                     "--ckpt-every", "40"],
                dpo=["--max-steps", "150", "--batch-size", "8", "--lr", "5e-5", "--time-budget", "45",
                     "--eval-max-items", "120", "--ckpt-every", "75"],
                compare_n=400, max_new_tokens=56,
                images=["--n", "4000"], vision=[],   # --vision: the stage's own defaults (docs/VISION.md)
                seconds=dict(data=20, tokenizer=2, pretrain=410, eval_pretrain=25, sft=175, label=60, rm=30,
                             ppo=100, dpo=55, compare=60, exam=20, vision=480, eval_vision=120, report=10)),
    # A GPT-2-124M-class model on one GPU.
    "gpu": dict(arch="gpt2", preset="gpt2-124m", model=["--block-size", "512"], mixture_lines=400_000,
                per_family=12000, tokenizer=["--vocab-size", "16384"],
                corpus_weights=dict(text=2, mixture=2, transcripts=2, copy=0, arithmetic=0, dictionary=0), exam_n=100,
                pretrain=["--max-steps", "6000", "--batch-size", "64", "--grad-accum", "2", "--lr", "6e-4",
                          "--warmup-steps", "300", "--compile", "--eval-every", "500", "--ckpt-every", "1000",
                          "--time-budget", "2700"],
                eval=["--shots", "0,1,4,8", "--n", "200"],
                sft=["--max-steps", "1500", "--batch-size", "32", "--lr", "1e-4", "--eval-max-items", "300"],
                label=["-k", "4", "--max-prompts", "3000", "--noise", "0.16", "--max-new-tokens", "64"],
                rm=["--batch-size", "16", "--lr", "3e-5"],
                ppo=["--max-steps", "400", "--rollout-batch", "64", "--minibatch", "16", "--ppo-epochs", "2",
                     "--lr", "1e-5", "--max-new-tokens", "64", "--eval-n", "200", "--eval-every", "100",
                     "--samples", "8", "--kl-target", "0.5", "--kl-horizon", "128"],
                dpo=["--max-steps", "600", "--batch-size", "16", "--lr", "1e-5", "--eval-max-items", "300"],
                compare_n=500, max_new_tokens=64, images=["--n", "20000"], vision=["--max-steps", "2000"],
                seconds=dict(data=60, tokenizer=60, pretrain=2700, eval_pretrain=120, sft=300, label=200,
                             rm=150, ppo=600, dpo=200, compare=120, exam=60, report=5)),
    # Seconds, not minutes: for tests of the orchestration (stage skipping, resume, report).
    "test": dict(arch="fast", preset="tiny", model=["--n-layer", "2", "--n-head", "2", "--n-embd", "64",
                                                    "--block-size", "128"],
                 mixture_lines=3000, per_family=40,
                 tokenizer=["--kind", "char"], corpus_weights=dict(text=1, mixture=1, transcripts=1, copy=1, arithmetic=1, dictionary=1), exam_n=4,
                 pretrain=["--max-steps", "30", "--batch-size", "8", "--eval-every", "15", "--eval-batches", "2",
                           "--ckpt-every", "10"],
                 eval=["--shots", "0,1", "--n", "6", "--tasks", "add2", "icl_last"],
                 sft=["--max-steps", "10", "--batch-size", "4", "--eval-max-items", "6", "--eval-every", "10"],
                 label=["-k", "4", "--max-prompts", "12", "--max-new-tokens", "24"],
                 rm=["--max-steps", "6", "--batch-size", "2"],
                 ppo=["--max-steps", "4", "--rollout-batch", "4", "--samples", "2", "--minibatch", "2", "--ppo-epochs", "1",
                      "--max-new-tokens", "10", "--eval-n", "4", "--eval-every", "4", "--ptx-batch", "2"],
                 dpo=["--max-steps", "4", "--batch-size", "2", "--eval-max-items", "4"],
                 compare_n=6, max_new_tokens=12, images=["--n", "30", "--heldout", "8"],
                 vision=["--max-steps", "4", "--align-steps", "1", "--batch-size", "4", "--vision-layers", "1",
                         "--eval-questions", "8", "--eval-max-items", "4", "--eval-every", "4"],
                 seconds=dict(data=2, tokenizer=2, pretrain=5, eval_pretrain=3, sft=3, label=3, rm=2, ppo=5,
                              dpo=2, compare=3, exam=2, report=1)),
}

QUIET = ["--no-progress"]


@dataclass
class Stage:
    name: str
    title: str
    done: Callable[[], bool]
    run: Callable[[], None]


def _cli(args: list[str]) -> None:
    from gptlab.cli import main
    print("  $ gptlab " + " ".join(args), flush=True)
    code = main(args)
    if code:
        raise GptlabError(f"stage command failed (exit {code}): gptlab {' '.join(args[:2])} ...")


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Speedrun:
    def __init__(self, out: Path, preset: str, corpus: str | None, device: str, progress: bool, seed: int = 0,
                 tools: bool = False, vision: bool = False):
        if preset not in PRESETS:
            raise GptlabError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
        self.out, self.preset, self.p = out, preset, PRESETS[preset]
        self.corpus = corpus
        self.device = device
        self.seed = seed   # every training stage and the labeler; the data (and its held-out split) stay fixed
        self.quiet = [] if progress else QUIET
        self.tools = tools   # optional: the curriculum's tool families, and a with/without-tools stage
        self.vision = vision   # optional: pictures, a vision stage from the SFT run and its evaluation
        self.d = {k: out / k for k in ["data", "tokenizer", "pretrain", "eval_pretrain", "sft", "rm", "ppo",
                                       "dpo", "compare", "exam", "eval_final", "tools", "images", "vision",
                                       "eval_vision"]}
        self.state_path = out / "speedrun.json"
        self.state = read_json(self.state_path) if self.state_path.is_file() else {"stages": {}}

    # ----- helpers ------------------------------------------------------------------------------
    def _train_flags(self, stage: str) -> list[str]:
        flags = list(self.p[stage]) + ["--device", self.device, "--seed", str(self.seed)] + self.quiet
        if (self.d[stage] / "checkpoint.safetensors").is_file():
            flags.append("--resume")
        return flags

    def _run_done(self, stage: str) -> bool:
        return (self.d[stage] / "summary.json").is_file()

    @property
    def instruct(self) -> Path:
        return self.d["data"] / "instruct"

    def _mixture_path(self) -> Path:
        from gptlab.data.mixture import mixture_path
        return mixture_path(seed=0, n_lines=self.p["mixture_lines"], out_dir=self.d["data"] / "mixture")

    def _corpora(self) -> list[str]:
        """Pre-training sources, each ``path:weight`` (a row picks a source with probability ~ weight)."""
        base = self.corpus or "shakespeare"
        w = self.p["corpus_weights"]
        sources = [f"{base}:{w['text']}", f"{self._mixture_path()}:{w['mixture']}",
                   f"{self.instruct / 'transcripts.txt'}:{w['transcripts']}"]
        sources += [f"{self._drills_path(kind)}:{w[kind]}" for kind in self._drills()]
        return sources

    def _drills(self) -> list[str]:
        """The kinds of drills (gptlab/data/drills.py) this preset pre-trains on."""
        from gptlab.data.drills import KINDS
        return [kind for kind in KINDS if self.p["corpus_weights"][kind]]

    def _drills_path(self, kind: str) -> Path:
        from gptlab.data.drills import drills_path
        return drills_path(self.d["data"] / "drills", kind)

    # ----- stages -------------------------------------------------------------------------------
    def stage_data(self):
        from gptlab.data.mixture import write_mixture
        if self.corpus is None:
            _cli(["data", "shakespeare"])
        write_mixture(self.d["data"] / "mixture", seed=0, n_lines=self.p["mixture_lines"])
        from gptlab.data.drills import write_drills
        for kind in self._drills():
            write_drills(self.d["data"] / "drills", kind)
        inst = ["data", "instruct", "--out", str(self.instruct), "--n-per-family", str(self.p["per_family"])]
        if self.corpus is not None:
            inst.append("--no-shakespeare")
        if self.tools:
            inst.append("--tools")
        _cli(inst)
        atomic_write_json(self.d["data"] / "data.done", {"mixture": str(self._mixture_path())})

    def stage_tokenizer(self):
        _cli(["tokenizer", "train", "--data", *self._corpora(), *self.p["tokenizer"], "--out", str(self.d["tokenizer"])])

    def stage_pretrain(self):
        _cli(["pretrain", "--data", *self._corpora(), "--tokenizer", str(self.d["tokenizer"]),
              "--arch", self.p["arch"], "--preset", self.p["preset"], *self.p["model"],
              "--out", str(self.d["pretrain"]), "--no-sample", *self._train_flags("pretrain")])

    def stage_eval_pretrain(self):
        _cli(["eval", str(self.d["pretrain"]), *self.p["eval"], "--out", str(self.d["eval_pretrain"]),
              "--device", self.device])

    def stage_sft(self):
        _cli(["sft", "--init", str(self.d["pretrain"]), "--data", str(self.instruct / "sft.jsonl"),
              "--eval-items", str(self.instruct / "heldout.jsonl"), "--ptx-fraction", "0.1",
              "--ptx-data", *self._corpora(), "--out", str(self.d["sft"]), *self._train_flags("sft")])

    @property
    def rankings(self) -> Path:
        return self.out / "rankings.jsonl"

    def stage_label(self):
        _cli(["label", "--auto", "--prompts", str(self.instruct / "prompts.jsonl"), "--policy",
              str(self.d["sft"]), "--out", str(self.rankings), "--seed", str(self.seed), *self.p["label"]])
        atomic_write_json(self.out / "rankings.done", {"file": str(self.rankings)})

    def stage_rm(self):
        _cli(["rm", "--init", str(self.d["sft"]), "--data", str(self.rankings), "--demos",
              str(self.instruct / "sft.jsonl"), "--out", str(self.d["rm"]), *self._train_flags("rm")])

    def stage_ppo(self):
        _cli(["ppo", "--init", str(self.d["sft"]), "--reward-model", str(self.d["rm"]), "--prompts",
              str(self.instruct / "prompts.jsonl"), "--eval-prompts", str(self.instruct / "heldout.jsonl"),
              "--ptx-data", *self._corpora(), "--out", str(self.d["ppo"]), *self._train_flags("ppo")])

    def stage_dpo(self):
        _cli(["dpo", "--init", str(self.d["sft"]), "--data", str(self.rankings), "--eval-items",
              str(self.instruct / "heldout.jsonl"), "--out", str(self.d["dpo"]), *self._train_flags("dpo")])

    def comparisons(self) -> list[tuple[str, str, str]]:
        return [("ppo_vs_sft", "ppo", "sft"), ("dpo_vs_sft", "dpo", "sft"), ("ppo_vs_dpo", "ppo", "dpo"),
                ("sft_vs_pretrain", "sft", "pretrain")]

    def stage_compare(self):
        self.d["compare"].mkdir(parents=True, exist_ok=True)
        for name, a, b in self.comparisons():
            out = self.d["compare"] / f"{name}.json"
            if out.is_file():
                continue
            _cli(["compare", str(self.d[a]), str(self.d[b]), "--prompts", str(self.instruct / "heldout.jsonl"),
                  "--n", str(self.p["compare_n"]), "--max-new-tokens", str(self.p["max_new_tokens"]),
                  "--reward-model", str(self.d["rm"]), "--out", str(out)])

    def exam_models(self) -> list[str]:
        return [k for k in ("sft", "ppo", "dpo") if self._run_done(k)]

    def stage_exam(self):
        _cli(["exam", *[str(self.d[k]) for k in self.exam_models()], "--n", str(self.p["exam_n"]),
              "--out", str(self.d["exam"] / "results.json")])

    def stage_tools(self):
        items = self.instruct / "tools_heldout.jsonl"
        if not items.is_file():
            raise GptlabError(f"{items}: missing (the data stage ran without --tools); use a new --out")
        index = self.d["tools"] / "heldout.index"
        _cli(["index", str(self.instruct / "tool_docs" / "heldout"), "--out", str(index)])
        _cli(["eval-tools", str(self.d["sft"]), "--items", str(items), "--index", str(index),
              "--device", self.device, "--out", str(self.d["tools"] / "results.json")])

    def stage_vision(self):
        if not (self.d["images"] / "heldout.jsonl").is_file():
            _cli(["data", "images", "--out", str(self.d["images"]), "--seed", "0", *self.p["images"]])
        _cli(["vision", str(self.d["sft"]), "--data", str(self.d["images"]), "--out", str(self.d["vision"]),
              *self._train_flags("vision")])

    def stage_eval_vision(self):
        e = self.d["eval_vision"]
        _cli(["eval-vision", str(self.d["vision"]), "--data", str(self.d["images"]), "--text",
              "--out", str(e / "results.json"), "--plot", str(e / "accuracy.png")])

    def stages(self) -> list[Stage]:
        d = self.d
        tok_title = "tokenizer, one token per character" if "char" in self.p["tokenizer"] else "byte-level BPE tokenizer"
        tools = [Stage("tools", "held-out answers with and without tools",
                       lambda: (d["tools"] / "results.json").is_file(), self.stage_tools)] if self.tools else []
        return [
            Stage("data", "corpus, task mixture, instruction curriculum",
                  lambda: (d["data"] / "data.done").is_file()
                  and all(self._drills_path(kind).is_file() for kind in self._drills()), self.stage_data),
            Stage("tokenizer", tok_title, lambda: (d["tokenizer"] / "tokenizer.json").is_file(),
                  self.stage_tokenizer),
            Stage("pretrain", "pre-training (next token)", lambda: self._run_done("pretrain"), self.stage_pretrain),
            Stage("eval_pretrain", "zero/few-shot evaluation", lambda: (d["eval_pretrain"] / "results.json").is_file(),
                  self.stage_eval_pretrain),
            Stage("sft", "supervised fine-tuning", lambda: self._run_done("sft"), self.stage_sft),
            Stage("label", "labeler rankings of SFT samples", lambda: (self.out / "rankings.done").is_file(),
                  self.stage_label),
            Stage("rm", "reward model", lambda: self._run_done("rm"), self.stage_rm),
            Stage("ppo", "PPO-ptx", lambda: self._run_done("ppo"), self.stage_ppo),
            Stage("dpo", "DPO", lambda: self._run_done("dpo"), self.stage_dpo),
            Stage("compare", "held-out win rates", lambda: all((d["compare"] / f"{n}.json").is_file()
                                                               for n, _, _ in self.comparisons()),
                  self.stage_compare),
            Stage("exam", "questions in a person's own words", lambda: (d["exam"] / "results.json").is_file(),
                  self.stage_exam),
            *tools,
            *([Stage("vision", "pictures, then a vision encoder trained onto the SFT run", lambda: self._run_done("vision"),
                     self.stage_vision),
               Stage("eval_vision", "held-out questions about pictures, with and without them",
                     lambda: (d["eval_vision"] / "results.json").is_file(), self.stage_eval_vision)]
              if self.vision else []),
            Stage("report", "report card", lambda: False, self.write_report),
        ]

    # ----- driver -------------------------------------------------------------------------------
    def run(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        stages = self.stages()
        expected = self.p["seconds"]
        t_all = time.time()
        for i, st in enumerate(stages, 1):
            remaining = sum(expected.get(s.name, 0) for s in stages[i - 1:] if not s.done())
            head = f"[{i}/{len(stages)}] {st.name}: {st.title}"
            if st.done():
                print(f"{head} - already done, skipped", flush=True)
                continue
            print(f"{head} (elapsed {_fmt(time.time() - t_all)}, ETA {_fmt(remaining)})", flush=True)
            t0 = time.time()
            st.run()
            took = time.time() - t0
            rec = self.state["stages"].setdefault(st.name, {"seconds": 0.0})
            rec["seconds"] = round(rec["seconds"] + took, 1)
            atomic_write_json(self.state_path, self.state)
            print(f"      {st.name} finished in {_fmt(took)}", flush=True)
        print(f"\nspeedrun finished in {_fmt(time.time() - t_all)}: report at {self.out / 'report.md'}")
        return self.out / "report.md"

    def write_report(self):
        from gptlab.report import build_report
        atomic_write_text(self.out / "report.md", build_report(self))


def run(args) -> int:
    out = Path(args.out)
    if args.preset == "gpu" and not torch.cuda.is_available() and args.device == "auto":
        print("note: --preset gpu without a CUDA device will be very slow")
    Speedrun(out, args.preset, args.corpus, args.device, progress=not args.no_progress, seed=args.seed,
             tools=args.tools, vision=args.vision).run()
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "speedrun", help="run every stage end to end and write a report card",
        description="Fetch the corpus, generate the task mixture and instruction curriculum, train the "
        "tokenizer, pre-train, evaluate zero/few-shot, SFT, rank samples with the labeler, train the reward "
        "model, PPO-ptx and DPO, compare them on held-out prompts, and write report.md with plots. "
        "Finished stages are skipped, so a killed speedrun continues where it stopped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="cpu",
                   help="cpu: ~15 min on 2 cores; gpu: GPT-2-124M class on one GPU; test: seconds")
    p.add_argument("--out", default="runs/speedrun", help="folder for every stage's output and report.md")
    p.add_argument("--corpus", default=None,
                   help="use this text corpus instead of downloading Shakespeare (skips the Shakespeare "
                   "questions in the curriculum)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of every training stage and of the labeler's noise "
                   "(the data and its held-out split are the same for every seed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside stages")
    p.add_argument("--tools", action="store_true", help="optional: add the tool families to the curriculum and a "
                   "last stage measuring held-out accuracy with and without tools (off by default)")
    p.add_argument("--vision", action="store_true", help="optional: draw pictures, teach the SFT run to see them "
                   "(`gptlab vision`) and evaluate it with and without the picture (off by default)")
    p.set_defaults(func=run)
