"""``caft-tl directions ...``: find, rank, interpret and select concept directions.

    caft-tl directions pca BASE FINETUNED DATA --hooks H [H ...] --out DIR [--k 20]
    caft-tl directions sae MODEL DATA --hook H --out DIR [--architecture batchtopk]
    caft-tl directions rank SAE BASE FINETUNED DATA --out DIR [--method all] [--top 100]
    caft-tl directions interpret MODEL CONCEPTS DATA --out report.html
    caft-tl directions select CONCEPTS --out DIR (--pick HOOK:I,J ... | --hints POS NEG --model M)

Every command writes a ConceptSet folder (or an HTML page) that the next one reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from caft_tl.cli import common


def _hint_texts(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no hint texts (one per line)")
    return lines


def cmd_pca(args: argparse.Namespace) -> int:
    from caft_tl.activations import activation_diff
    from caft_tl.directions import pca

    base = common.load(args.base, args.device, args.dtype)

    finetuned = common.load(args.finetuned, args.device, args.dtype)
    positions = "assistant" if args.assistant_only else "all"
    diff = activation_diff(
        base,
        finetuned,
        common.read_data(args.data),
        args.hooks,
        positions=positions,
        batch_size=args.batch_size,
        out=args.acts_out,
        max_length=args.max_length,
    )
    concepts = pca(diff, k=args.k, model=base)
    concepts.save(args.out, overwrite=args.overwrite)
    for hook in concepts.hooks:
        ratios = ", ".join(f"{s:.3f}" for s in concepts.scores[hook][:8])
        print(f"{hook}: explained variance {ratios}{' ...' if args.k > 8 else ''}")
    print(f"wrote {concepts!r} to {args.out}")
    return 0


def cmd_sae(args: argparse.Namespace) -> int:
    from caft_tl.directions import SAEConfig, train_sae

    model = common.load(args.model, args.device, args.dtype)
    cfg = SAEConfig(
        architecture=args.architecture,
        d_sae=args.d_sae,
        k=args.k,
        training_tokens=args.training_tokens,
        hook=args.hook,
    )
    train_sae(model, common.read_data(args.data), args.hook, cfg, out=args.out)
    print(f"wrote SAE ({args.architecture}, d_sae={cfg.d_sae}) at {args.hook} to {args.out}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from caft_tl.activations import activation_diff
    from caft_tl.directions import (
        load_sae,
        rank_by_attribution,
        rank_by_diff_encoding,
        rank_by_mean_diff,
        union_top,
    )

    sae = load_sae(args.sae)
    hook = sae.cfg.metadata.hook_name
    base = common.load(args.base, args.device, args.dtype)
    finetuned = common.load(args.finetuned, args.device, args.dtype)
    data = common.read_data(args.data)
    methods = (
        ["mean-diff", "diff-encoding", "attribution"] if args.method == "all" else [args.method]
    )
    rankings = []
    if {"mean-diff", "diff-encoding"} & set(methods):
        both = activation_diff(base, finetuned, data, [hook], return_both=True)
        if "mean-diff" in methods:
            rankings.append(rank_by_mean_diff(sae, acts=both, top=args.top))
        if "diff-encoding" in methods:
            rankings.append(rank_by_diff_encoding(sae, both, top=args.top))
    if "attribution" in methods:
        # The fine-tuning loss's gradient on the base model: which latents training uses.
        rankings.append(rank_by_attribution(sae, base, data, top=args.top))
    concepts = rankings[0] if len(rankings) == 1 else union_top(rankings, n=args.top)
    concepts.save(args.out, overwrite=args.overwrite)
    print(f"wrote {concepts!r} ({', '.join(methods)}) to {args.out}")
    return 0


def cmd_interpret(args: argparse.Namespace) -> int:
    from caft_tl.directions import ConceptSet, report_html

    model = common.load(args.model, args.device, args.dtype)
    concepts = ConceptSet.load(args.concepts)
    path = report_html(model, concepts, common.read_data(args.data), args.out, k=args.k)
    print(f"wrote {path}")
    return 0


def _parse_pick(items: list[str]) -> dict[str, list[int]]:
    selection: dict[str, list[int]] = {}
    for item in items:
        hook, sep, indices = item.rpartition(":")
        if not sep or not hook:
            raise ValueError(f"--pick takes HOOK:I,J,...; got {item!r}")
        try:
            selection.setdefault(hook, []).extend(int(i) for i in indices.split(","))
        except ValueError:
            raise ValueError(f"--pick {item!r}: indices must be integers") from None
    return selection


def cmd_select(args: argparse.Namespace) -> int:
    from caft_tl.directions import ConceptSet, hinted_scores, select_by_hints

    concepts = ConceptSet.load(args.concepts)
    if bool(args.pick) == bool(args.hints):
        raise ValueError("give either --pick HOOK:I,J ... or --hints POSITIVE NEGATIVE")
    if args.pick:
        chosen = concepts.select(_parse_pick(args.pick))
    else:
        model = common.load(args.model, args.device, args.dtype)
        positive, negative = (_hint_texts(p) for p in args.hints)
        scores = hinted_scores(model, concepts, positive, negative)
        chosen = select_by_hints(concepts, scores, min_auroc=args.min_auroc)
        print(scores[["hook", "index", "label", "auroc"]].to_string(index=False))
    chosen.save(args.out, overwrite=args.overwrite)
    labels = json.dumps({h: chosen.labels[h] for h in chosen.hooks})
    print(f"selected {chosen.n_directions} directions: {labels}\nwrote {args.out}")
    return 0


def add_parser(sub) -> None:
    """Register ``caft-tl directions`` and its subcommands on the main parser."""
    directions = sub.add_parser("directions", help="find, rank, interpret, select directions")
    dsub = directions.add_subparsers(dest="directions_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--overwrite", action="store_true", help="replace an existing set")
        return p

    p = common(dsub.add_parser("pca", help="PCA of fine-tuned minus base activations"))
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("data", help="chat JSONL or .txt (one text per line)")
    p.add_argument("--hooks", nargs="+", required=True)
    p.add_argument("--out", required=True, help="ConceptSet folder to write")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--assistant-only", action="store_true")
    p.add_argument("--acts-out", default=None, help="also keep the differences on disk here")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.set_defaults(func=cmd_pca)

    p = dsub.add_parser("sae", help="train an SAE (SAE-Lens) on a model's activations")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--hook", required=True)
    p.add_argument("--out", required=True, help="new folder for the SAE")
    p.add_argument("--architecture", choices=["batchtopk", "topk", "standard"], default="batchtopk")
    p.add_argument("--d-sae", type=int, default=None)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--training-tokens", type=int, default=200_000)
    p.set_defaults(func=cmd_sae)

    p = common(dsub.add_parser("rank", help="rank SAE latents by what fine-tuning changed"))
    p.add_argument("sae", help="SAE folder (or SAE-Lens release with a hub)")
    p.add_argument("base")
    p.add_argument("finetuned")
    p.add_argument("data")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--method", choices=["mean-diff", "diff-encoding", "attribution", "all"], default="all"
    )
    p.add_argument("--top", type=int, default=100)
    p.set_defaults(func=cmd_rank)

    p = dsub.add_parser("interpret", help="one offline HTML page for a ConceptSet")
    p.add_argument("model")
    p.add_argument("concepts")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--k", type=int, default=8, help="examples per direction and side")
    p.set_defaults(func=cmd_interpret)

    p = common(dsub.add_parser("select", help="keep chosen directions of a ConceptSet"))
    p.add_argument("concepts")
    p.add_argument("--out", required=True)
    p.add_argument("--pick", nargs="+", default=None, metavar="HOOK:I,J")
    p.add_argument(
        "--hints",
        nargs=2,
        default=None,
        metavar=("POSITIVE", "NEGATIVE"),
        help="two text files, one hint per line (e.g. male / female sentences)",
    )
    p.add_argument("--model", default="embedded", help="model for --hints")
    p.add_argument("--min-auroc", type=float, default=0.8)
    p.set_defaults(func=cmd_select)
