"""`megagpt prep {char,sentencepiece,shakespeare,chat,shakespeare-qa,preferences}` (also `python -m data_prep`):
arguments -> PrepSettings; chat, shakespeare-qa and preferences bring their own sub-parsers (data_prep/chat.py,
data_prep/shakespeare_qa.py, data_prep/preferences.py). shakespeare-prefs is listed for -h only: it samples a
model, so megagpt/cli.py runs it."""

from __future__ import annotations

import argparse
import sys

from data_prep.prep import PrepSettings, prepare
from megagpt.errors import UserError, check_seed

PREFS = "shakespeare-prefs"  # listed by -h; megagpt/cli.py runs it (it samples a model)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [PREFS]:
        print(f"megagpt prep {PREFS}: error: it samples a model: run it as `megagpt prep {PREFS}`", file=sys.stderr)
        return 2
    args = _parser().parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:  # kinds with their own parser and runner
            out = args.run(args)
        elif args.kind == "shakespeare":
            from data_prep.shakespeare import prepare_shakespeare

            out = prepare_shakespeare(args.out, args.input, force=args.force, workers=args.workers)
        else:
            out = prepare(args.input, args.out, _settings(args), force=args.force)
        if getattr(args, "run", None) is None:  # a token dataset; the other kinds print their own summary
            print(f"megagpt prep {args.kind}: {token_summary(out)}")
    except UserError as e:
        print(f"megagpt prep {args.kind}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


def token_summary(out) -> str:
    """A token dataset's line, from its manifest: like the chat and preference kinds' summaries."""
    from megagpt.dataset import load_manifest

    manifest = load_manifest(out)
    splits = manifest.splits
    shards = sum(s.shards if isinstance(s.shards, int) else len(s.shards) for s in splits.values())
    tokens = ", ".join(f"{name} {info.tokens}" for name, info in splits.items())
    return (f"vocab {manifest.vocab_size} ({manifest.tokenizer.kind}), {sum(s.tokens for s in splits.values())} "
            f"tokens ({tokens}), {shards} shards")


def _settings(args) -> PrepSettings:
    s = PrepSettings(tokenizer=args.kind, val_fraction=args.val_fraction, seed=check_seed(args.seed),
                     text_field=args.text_field, shard_size_mb=args.shard_size_mb,
                     sample_tokens=args.sample_tokens, workers=args.workers)
    if args.kind == "sentencepiece":
        s.vocab_size, s.model_type, s.byte_fallback = args.vocab_size, args.model_type, args.byte_fallback
        s.character_coverage, s.sample_size = args.character_coverage, args.sample_size
        s.sample_chars = args.sample_chars
        s.threads = args.threads
    return s


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagpt prep",
                                description="corpus -> tokenizer + webdataset shards + manifest")
    sub = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    d = PrepSettings()

    def common(q, input_required=True):
        q.add_argument("--out", required=True, help="dataset dir to create (via DIR.partial, then renamed)")
        q.add_argument("--workers", type=int, default=1, help="processes (the output is the same for any N)")
        q.add_argument("--force", action="store_true", help="replace --out when it already exists")
        if input_required:
            q.add_argument("--input", required=True, nargs="+",
                           help="files, directories or globs of .txt / .jsonl, optionally .gz")
            q.add_argument("--val-fraction", type=float, default=d.val_fraction,
                           help="the last F of the token stream is the val split")
            q.add_argument("--seed", type=int, default=d.seed)
            q.add_argument("--text-field", default=d.text_field, help="the text's key in .jsonl records")
            q.add_argument("--shard-size-mb", type=float, default=d.shard_size_mb)
            q.add_argument("--sample-tokens", type=int, default=d.sample_tokens,
                           help="tokens per tar member (a packed run)")

    sh = sub.add_parser("shakespeare", help="Tiny Shakespeare, char level, from the copy shipped in the package",
                        description="Tiny Shakespeare at char level (65-char vocabulary, first 90% train, last "
                                    "10% val). Without --input it reads the copy shipped gzipped inside the "
                                    "package (sha256-checked); nothing is downloaded.")
    common(sh, input_required=False)
    sh.add_argument("--input", default=None,
                    help="another copy (tinyshakespeare/input.txt, .txt or .txt.gz) instead of the shipped one")

    common(sub.add_parser("char", help="character vocabulary (sorted set of the corpus's characters)"))

    sp = sub.add_parser("sentencepiece", help="train sentencepiece (BPE by default) on a corpus sample")
    common(sp)
    sp.add_argument("--vocab-size", type=int, default=d.vocab_size)
    sp.add_argument("--model-type", choices=["bpe", "unigram"], default=d.model_type)
    sp.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=d.byte_fallback,
                    help="unknown characters become UTF-8 bytes (so any text round-trips)")
    sp.add_argument("--character-coverage", type=float, default=d.character_coverage)
    sp.add_argument("--sample-size", type=int, default=d.sample_size, help="lines sampled to train on")
    sp.add_argument("--sample-chars", type=int, default=d.sample_chars,
                    help="at most this many characters sampled to train on (bounds the trainer's memory)")
    sp.add_argument("--threads", type=int, default=d.threads, help="trainer threads (0: all cores)")
    from data_prep import chat, preferences, shakespeare_qa

    chat.add_parser(sub)
    shakespeare_qa.add_parser(sub)
    preferences.add_parser(sub)
    # Listed here for -h; `megagpt prep shakespeare-prefs` runs it (it samples a model: megagpt's, not data_prep's).
    sub.add_parser(PREFS, help="preference pairs sampled from an SFT model and labelled by the real-word rule "
                   "(megagpt prep shakespeare-prefs -h)", add_help=False)
    return p
