"""The ``caft-tl`` command.

    caft-tl info [MODEL]                      architecture, sizes, hook names
    caft-tl cache MODEL DATA --hooks H [H ...] --out DIR
    caft-tl finetune MODEL DATA --out DIR [--concepts PATH --mode M] [--lora-r R] ...
    caft-tl smoke                             load, chat, cache on the embedded model
    caft-tl demo [--quick] [--sae] [--task T] the end-to-end CAFT study
    caft-tl directions pca|sae|rank|interpret|select ...   (see caft_tl/cli/directions.py)
    caft-tl diagnose shift|steer|decompose|all CONCEPTS ...  (see caft_tl/cli/diagnose.py)
    caft-tl crosscoder train|diff ...                         (see caft_tl/cli/crosscoder.py)
    caft-tl eval run|report|questions ...                     (see caft_tl/cli/evals.py)

MODEL is ``embedded`` (the default SmolLM2-135M-Instruct), a checkpoint or Hugging Face
folder, or a TransformerLens official name (needs a hub). DATA is a chat JSONL file
(``{"messages": [...]}`` per line) or a ``.txt`` file with one text per line; ``finetune``
also takes prompt/answer JSONL (``{"prompt": ..., "answer": ...}`` per line).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from caft_tl.cli import common, crosscoder, diagnose, directions, evals, finetune, scale

SMOKE_QUESTION = "What is the capital of France?"
SMOKE_CHATS = [
    [
        {"role": "user", "content": "Give me one tip for learning a language."},
        {"role": "assistant", "content": "Practise a little every day, out loud."},
    ],
    [
        {"role": "user", "content": "Name a fruit that is yellow."},
        {"role": "assistant", "content": "A banana is yellow."},
    ],
    [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ],
]


def cmd_info(args: argparse.Namespace) -> int:
    from caft_tl.models import model_info

    info = model_info(common.load(args.model, args.device, args.dtype))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    hooks = info.pop("hooks_per_block")
    outside = info.pop("hooks_outside_blocks")
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    print(f"\nhook points in every block (blocks.0 .. blocks.{info['n_layers'] - 1}):")
    for hook in hooks:
        print(f"  blocks.L.{hook}")
    print("other hook points:")
    for hook in outside:
        print(f"  {hook}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from caft_tl import distributed
    from caft_tl.activations import cache_activations

    # Under torchrun each rank caches its share of the batches on its own device and the
    # shards merge into one folder.
    distributed.setup()
    device = args.device
    if distributed.is_distributed() and device is None:
        device = str(distributed.device())
    with distributed.main_first():  # one rank converts the embedded model into the cache
        model = common.load(args.model, device, args.dtype)
    acts = cache_activations(
        model,
        common.read_data(args.data),
        args.hooks,
        positions=args.positions,
        batch_size=args.batch_size,
        out=args.out,
        max_length=args.max_length,
    )
    if distributed.is_main():
        print(acts)
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """The main job until the end-to-end demo exists: a quick check that everything works."""
    import torch

    from caft_tl.activations import cache_activations
    from caft_tl.data import chat_to_text
    from caft_tl.models import load_model

    start = time.perf_counter()
    model = load_model(device=args.device, dtype=args.dtype)
    print(f"loaded {model.cfg.model_name} in {time.perf_counter() - start:.1f}s")
    prompt = chat_to_text([{"role": "user", "content": SMOKE_QUESTION}], model.tokenizer)
    ids = torch.tensor([model.tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(
        ids.to(model.cfg.device), max_new_tokens=24, do_sample=False, verbose=False
    )
    answer = model.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"Q: {SMOKE_QUESTION}\nA: {answer.strip()}")
    hook = f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"
    acts = cache_activations(
        model,
        [{"messages": m} for m in SMOKE_CHATS],
        [hook],
        positions="assistant",
        progress=False,
    )
    x = acts[hook]
    print(f"cached {tuple(x.shape)} assistant-token activations at {hook}")
    print(f"  mean norm {x.norm(dim=-1).mean():.2f}, largest |value| {x.abs().max():.2f}")
    print(f"smoke pipeline done in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="caft-tl", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument(
        "--dtype", default=None, help="parameter dtype: float32 (default), bfloat16, float16"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="architecture, sizes and hook names of a model")
    info.add_argument("model", nargs="?", default="embedded")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)

    cache = sub.add_parser("cache", help="cache activations at hook points")
    cache.add_argument("model")
    cache.add_argument("data", help="chat JSONL, or .txt with one text per line")
    cache.add_argument("--hooks", nargs="+", required=True)
    cache.add_argument("--out", required=True, help="new folder for the shards")
    cache.add_argument("--positions", choices=["all", "assistant", "last"], default="all")
    cache.add_argument("--batch-size", type=int, default=8)
    cache.add_argument("--max-length", type=int, default=None)
    cache.set_defaults(func=cmd_cache)

    for group in (finetune, directions, diagnose, crosscoder, evals, scale):
        group.add_parser(sub)

    smoke = sub.add_parser("smoke", help="load, chat and cache on the embedded model")
    smoke.set_defaults(func=cmd_smoke)

    demo = sub.add_parser(
        "demo", help="the end-to-end CAFT study (default task: gender2:doctor|nurse; <30 min)"
    )
    demo.add_argument(
        "--task",
        default=None,
        help="gender2:MALE|FEMALE (default gender2:doctor|nurse, the evidence search's pick), "
        "gender_pronoun, or double_mc:INTENDED|DISTRACTOR[:second]",
    )
    demo.add_argument("--out", default="caft-demo", help="folder for every artefact (reused)")
    demo.add_argument("--quick", action="store_true", help="1 seed, less data: under 5 min")
    demo.add_argument("--sae", action="store_true", help="also SAE latents as concepts")
    demo.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: preset)")
    demo.add_argument("--steps", type=int, help="fine-tuning steps per run")
    demo.add_argument(
        "--answer-format", choices=["pronoun", "letter"], help="how the options are shown"
    )
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from caft_tl.demo import DEFAULT_TASK, DemoConfig, run_demo, summary_table

    task = args.task or DEFAULT_TASK
    overrides = {"sae": args.sae}
    if args.seeds:
        overrides["seeds"] = args.seeds
    if args.steps:
        overrides["max_steps"] = args.steps
        overrides["learned_less_step"] = (
            args.steps // 2 if args.steps > 1 and not args.quick else None
        )
    if args.answer_format:
        overrides["answer_format"] = args.answer_format
    make = DemoConfig.quick if args.quick else DemoConfig.for_task
    cfg = make(task, **overrides)
    model = common.load("embedded", args.device, args.dtype)
    results = run_demo(args.out, cfg, model=model)
    print()
    print(summary_table(results).to_string())
    print(f"\nreport: {Path(args.out) / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    # Bad input (or a judge server that refuses) is a message and exit code 2; anything else
    # is a bug in the library and keeps its traceback.
    try:
        return args.func(args)
    except common.user_errors() as exc:
        print(f"caft-tl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
