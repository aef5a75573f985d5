"""``caft-tl crosscoder ...``: diff a base and a fine-tuned model with a crosscoder.

    caft-tl crosscoder train BASE FINETUNED DATA --hook H --out RUN [--architecture batchtopk]
    caft-tl crosscoder diff RUN --out DIR [--acts PAIRED | --base B --finetuned F --data D]

``train`` caches the paired activations into ``RUN/acts`` and trains (checkpoints in
``RUN/checkpoint``; ``--resume`` continues a killed run). ``diff`` classifies every latent by
relative decoder norm, runs Latent Scaling, and writes ``DIR/diff`` (tables), ``DIR/figures.html``
and, when genuine fine-tune-only latents exist, the ConceptSet ``DIR/concepts`` for
``caft-tl finetune --concepts``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from caft_tl._html import document
from caft_tl._io import write_text_atomic
from caft_tl.cli import common


def cmd_train(args: argparse.Namespace) -> int:
    from caft_tl.directions import CrosscoderConfig, train_crosscoder

    cfg = CrosscoderConfig(
        architecture=args.architecture,
        n_latents=args.n_latents,
        k=args.k,
        l1_coefficient=args.l1_coefficient,
        lr=args.lr,
        training_tokens=args.training_tokens,
        batch_size=args.batch_size,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        device=args.device,
    )
    base = common.load(args.base, args.device, args.dtype)
    finetuned = common.load(args.finetuned, args.device, args.dtype)
    cc = train_crosscoder(
        cfg=cfg, base=base, finetuned=finetuned, data=common.read_data(args.data), hook=args.hook,
        out=args.out, resume=args.resume,
    )  # fmt: skip
    last = cc.meta["log"][-1] if cc.meta.get("log") else {}
    fvu = ", ".join(f"{k} {last[k]:.3f}" for k in ("fvu_base", "fvu_finetuned", "l0") if k in last)
    print(f"wrote {cc!r} to {Path(args.out) / 'crosscoder'} ({fvu})")
    return 0


def _paired(args: argparse.Namespace, hook: str):
    """Paired activations at ``hook``: --acts, a fresh cache from --base/--finetuned/--data,
    or the ``acts/`` folder the training run kept."""
    from caft_tl.activations import activation_diff

    given = [args.base, args.finetuned, args.data]
    if args.acts and any(given):
        raise ValueError("give --acts or --base/--finetuned/--data, not both")
    if args.acts:
        return args.acts
    if any(given):
        if not all(given):
            raise ValueError("--base, --finetuned and --data go together")
        base = common.load(args.base, args.device, args.dtype)
        ft = common.load(args.finetuned, args.device, args.dtype)
        return activation_diff(base, ft, common.read_data(args.data), hook, return_both=True)
    kept = Path(args.crosscoder) / "acts"
    if not (kept / "base" / "meta.json").exists():
        raise ValueError(
            f"{args.crosscoder} holds no paired activations (acts/): pass --acts or "
            "--base/--finetuned/--data"
        )
    return kept


def cmd_diff(args: argparse.Namespace) -> int:
    from caft_tl.directions import (
        DiffThresholds,
        diff_crosscoder,
        latent_examples,
        load_crosscoder,
        paired_activations,
    )

    cc = load_crosscoder(args.crosscoder, device=args.device or "cpu")
    # Paired (and checked token by token) once, for the diff and the pages below.
    pairs = paired_activations(_paired(args, cc.hook), hook=cc.hook)
    thresholds = DiffThresholds(
        base_only=args.base_only, finetuned_only=args.finetuned_only,
        max_nu_eps=args.max_nu_eps, max_nu_r=args.max_nu_r,
    )  # fmt: skip
    diff = diff_crosscoder(cc, pairs, thresholds, max_rows=args.max_rows)
    out = Path(args.out)
    diff.save(out / "diff", overwrite=args.overwrite)
    figures = [diff.norm_figure(), diff.nu_figure(), diff.kept_figure()]
    html = "\n".join(
        f.to_html(full_html=False, include_plotlyjs=i == 0) for i, f in enumerate(figures)
    )
    write_text_atomic(out / "figures.html", document("Crosscoder diff", html))
    print(diff.summary().to_string(index=False))
    print(
        f"FVU: base {diff.meta['fvu']['base']:.3f}, fine-tuned {diff.meta['fvu']['finetuned']:.3f}"
    )
    if not args.latents and int(diff.table["genuine"].sum()) == 0:
        print("no genuine fine-tune-only latent at these thresholds: no ConceptSet written")
        return 0
    concepts = diff.concepts(cc, top=args.top, latents=args.latents)
    concepts.save(out / "concepts", overwrite=args.overwrite)
    print(f"wrote {concepts!r} to {out / 'concepts'}")
    if args.model:
        from caft_tl.directions import report_html
        from caft_tl.directions.sae import latent_id

        model = common.load(args.model, args.device, args.dtype)
        # The interpretation page of PCA / SAE sets, on the fine-tuned side's cached tokens.
        page = report_html(model, concepts, None, out / "latents.html", acts=pairs.finetuned)
        print(f"wrote {page}")
        if args.examples:
            latents = [latent_id(label, "--examples") for label in concepts.labels[cc.hook]]
            examples = latent_examples(
                cc, pairs, latents[: args.top_examples], model, k=args.examples
            )
            examples.to_csv(out / "examples.csv", index=False)
            print(examples.to_string(index=False, max_colwidth=80))
    return 0


def add_parser(sub) -> None:
    """Register ``caft-tl crosscoder train|diff`` on the main parser."""
    top = sub.add_parser("crosscoder", help="model diffing with BatchTopK / L1 crosscoders")
    csub = top.add_subparsers(dest="crosscoder_command", required=True)

    p = csub.add_parser("train", help="train a crosscoder on base / fine-tuned activations")
    p.add_argument("base", help="model name, folder, or 'embedded'")
    p.add_argument("finetuned")
    p.add_argument("data", help="chat JSONL or .txt (one text per line)")
    p.add_argument("--hook", required=True, help="e.g. blocks.12.hook_resid_post")
    p.add_argument("--out", required=True, help="run folder (acts/, checkpoint/, crosscoder/)")
    p.add_argument("--architecture", choices=["batchtopk", "l1"], default="batchtopk")
    p.add_argument("--n-latents", type=int, default=None, help="default 8 x width")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1-coefficient", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--training-tokens", type=int, default=2_000_000)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue a run from its checkpoint")
    p.set_defaults(func=cmd_train)

    p = csub.add_parser("diff", help="classify latents, Latent Scaling, select a ConceptSet")
    p.add_argument("crosscoder", help="a run folder from `train` or a saved crosscoder")
    p.add_argument("--out", required=True)
    p.add_argument("--acts", default=None, help="paired activations folder (default RUN/acts)")
    p.add_argument("--base", default=None)
    p.add_argument("--finetuned", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--base-only", type=float, default=0.1)
    p.add_argument("--finetuned-only", type=float, default=0.9)
    p.add_argument("--max-nu-eps", type=float, default=0.2)
    p.add_argument("--max-nu-r", type=float, default=0.5)
    p.add_argument("--max-rows", type=int, default=None)
    p.add_argument("--top", type=int, default=None, help="keep the N most frequent genuine ones")
    p.add_argument(
        "--latents", type=int, nargs="+", default=None, help="select these latents instead"
    )
    p.add_argument("--examples", type=int, default=0, help="top contexts per selected latent")
    p.add_argument("--top-examples", type=int, default=10, help="latents to show contexts for")
    p.add_argument(
        "--model",
        default=None,
        help="model (e.g. the fine-tuned one) for latents.html / --examples",
    )
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_diff)
