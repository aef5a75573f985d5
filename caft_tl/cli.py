"""The ``caft-tl`` command.

    caft-tl info [MODEL]                      architecture, sizes, hook names
    caft-tl cache MODEL DATA --hooks H [H ...] --out DIR
    caft-tl smoke                             load, chat, cache on the embedded model

MODEL is ``embedded`` (the default SmolLM2-135M-Instruct), a checkpoint or Hugging Face
folder, or a TransformerLens official name (needs a hub). DATA is a chat JSONL file
(``{"messages": [...]}`` per line) or a ``.txt`` file with one text per line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

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


def _load(name: str, device: str | None):
    from caft_tl.models import load_model

    return load_model(None if name == "embedded" else name, device=device)


def _read_data(path: str):
    from caft_tl.data import as_dataset, load_jsonl

    p = Path(path)
    if not p.exists():
        raise SystemExit(f"caft-tl: {p} does not exist")
    if p.suffix == ".txt":
        lines = [line for line in p.read_text().splitlines() if line.strip()]
        return as_dataset(lines)
    return load_jsonl(p)


def cmd_info(args: argparse.Namespace) -> int:
    from caft_tl.models import model_info

    info = model_info(_load(args.model, args.device))
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
    from caft_tl.activations import cache_activations

    model = _load(args.model, args.device)
    acts = cache_activations(
        model,
        _read_data(args.data),
        args.hooks,
        positions=args.positions,
        batch_size=args.batch_size,
        out=args.out,
        max_length=args.max_length,
    )
    print(acts)
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    """The main job until the end-to-end demo exists: a quick check that everything works."""
    import torch

    from caft_tl.activations import cache_activations
    from caft_tl.data import chat_to_text
    from caft_tl.models import load_model

    start = time.perf_counter()
    model = load_model(device=args.device)
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

    smoke = sub.add_parser("smoke", help="load, chat and cache on the embedded model")
    smoke.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    from caft_tl.data import DataError
    from caft_tl.models import ModelLoadError

    try:
        return args.func(args)
    except (DataError, ModelLoadError, FileExistsError, ValueError) as exc:
        print(f"caft-tl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
