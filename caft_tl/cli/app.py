"""The ``caft-tl`` command.

    caft-tl info [MODEL]                      architecture, sizes, hook names
    caft-tl cache MODEL DATA --hooks H [H ...] --out DIR
    caft-tl finetune MODEL DATA --out DIR [--concepts PATH --mode M] [--lora-r R] ...
    caft-tl smoke                             load, chat, cache on the embedded model
    caft-tl demo [--quick] [--sae] [--task T] the end-to-end CAFT study
    caft-tl directions pca|sae|rank|interpret|select ...   (see caft_tl/cli_directions.py)
    caft-tl diagnose shift|steer|decompose|all CONCEPTS ...  (see caft_tl/cli_diagnose.py)
    caft-tl crosscoder train|diff ...                         (see caft_tl/cli_crosscoder.py)
    caft-tl eval run|report|questions ...                     (see caft_tl/cli_eval.py)

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


def _load(name: str, device: str | None, dtype: str | None = None):
    from caft_tl.models import load_model

    return load_model(None if name == "embedded" else name, device=device, dtype=dtype)


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

    info = model_info(_load(args.model, args.device, args.dtype))
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
        model = _load(args.model, device, args.dtype)
    acts = cache_activations(
        model,
        _read_data(args.data),
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


# ---------------------------------------------------------------------------------- finetune

INTERVENTION_MODES = ("zero", "mean", "detached", "gradient", "steer")


def _read_train_data(path: str, what: str):
    """Chat JSONL / .txt (as for ``cache``), or prompt/answer JSONL as a list of dicts."""
    from caft_tl.data import DataError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist")
    first = next((line for line in p.read_text().splitlines() if line.strip()), "")
    try:
        head = json.loads(first) if p.suffix != ".txt" else None
    except json.JSONDecodeError:
        head = None  # load_jsonl reports the bad line with its number
    if not (isinstance(head, dict) and {"prompt", "answer"} <= set(head)):
        return _read_data(path)
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}, line {n}: not valid JSON ({exc})") from None
    return rows


def _lora_config(args: argparse.Namespace):
    from caft_tl.lora import LoraConfig

    given = {
        "r": args.lora_r,
        "alpha": args.lora_alpha,
        "targets": None if args.lora_targets is None else tuple(args.lora_targets),
    }
    given = {k: v for k, v in given.items() if v is not None}
    return LoraConfig(**given) if given else None


def _train_config(args: argparse.Namespace):
    from caft_tl.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        seed=args.seed,
        max_length=args.max_length,
        save_every=args.save_every,
        lora=_lora_config(args),
        keep_checkpoints=args.keep_checkpoints,
        gradient_checkpointing=args.gradient_checkpointing,
        fsdp=args.fsdp,
        progress=not args.quiet,
    )


def _check_intervention_args(args: argparse.Namespace) -> None:
    if args.concepts is None:
        if args.mode is not None or args.coef is not None:
            raise ValueError("--mode and --coef need --concepts (a saved ConceptSet)")
        return
    if not Path(args.concepts).is_dir():
        raise ValueError(f"--concepts {args.concepts}: no such folder")
    if (args.mode == "steer") != (args.coef is not None):
        raise ValueError("--coef goes with --mode steer, and --mode steer needs --coef")


def _intervention(args: argparse.Namespace, model, data):
    """The Ablation / Steering of ``--concepts``; mean and steer fit their mean activation
    on the training data (all real tokens: the hooks act at every position)."""
    from caft_tl.compare import mean_batches
    from caft_tl.directions import ConceptSet
    from caft_tl.interventions import Ablation, Steering

    if args.concepts is None:
        return None
    try:
        concepts = ConceptSet.load(args.concepts)
    except FileNotFoundError as exc:  # a folder without the files: a usage error, not a crash
        raise ValueError(str(exc)) from None
    mode = args.mode or "zero"
    if mode == "steer":
        intervention = Steering(concepts, coef=args.coef)
    else:
        intervention = Ablation(concepts, mode=mode)
    if mode in ("mean", "steer"):
        intervention.fit_mean(
            model, mean_batches(model, data, batch_size=args.batch_size, max_length=args.max_length)
        )
    return intervention


def _finished_step(out: Path) -> int | None:
    """The step of a finished run in ``out`` (its final model exists), else None."""
    state = out / "checkpoint" / "trainer_state.json"
    if not (out / "final").is_dir() or not state.is_file():
        return None
    return json.loads(state.read_text()).get("step")


def cmd_finetune(args: argparse.Namespace) -> int:
    from caft_tl import distributed
    from caft_tl.train import finetune

    distributed.setup()  # under torchrun: join the process group (no-op otherwise)
    out = Path(args.out)
    if (out / "run.json").exists() and not args.resume:
        raise FileExistsError(
            f"{out} already holds a training run; pass --resume to continue it, or choose "
            "another --out"
        )
    _check_intervention_args(args)
    cfg = _train_config(args)
    data = _read_train_data(args.data, "DATA")
    eval_data = None if args.eval_data is None else _read_train_data(args.eval_data, "--eval-data")
    device = args.device
    if args.fsdp and distributed.is_distributed() and device is None:
        device = "cpu"  # FSDP moves each rank's shards to its GPU; the whole may not fit one
    with distributed.main_first():  # one rank converts the embedded model into the cache
        model = _load(args.model, device, args.dtype)
    intervention = _intervention(args, model, data)
    done = _finished_step(out) if args.resume else None
    steps: list[dict] = []
    finetune(
        model,
        data,
        cfg,
        intervention=intervention,
        eval_data=eval_data,
        out=out,
        resume=args.resume,
        callback=steps.append,
    )
    if not distributed.is_main():
        return 0
    if done is not None and not steps:
        print(f"{out} already finished at step {done}; nothing left to train")
    elif steps:
        last = steps[-1]
        extra = f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else ""
        print(f"trained to step {last['step']}: loss {last['loss']:.4f}{extra}")
    print(f"model saved in {out / 'final'}")
    return 0


def _add_finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune, optionally with a concept intervention")
    p.add_argument("model", help="embedded, a checkpoint / HF folder, or a TransformerLens name")
    p.add_argument("data", help="chat JSONL, prompt/answer JSONL, or .txt")
    p.add_argument("--out", required=True, help="folder for metrics, checkpoints, final model")
    p.add_argument("--concepts", default=None, help="saved ConceptSet folder to intervene with")
    p.add_argument(
        "--mode", choices=INTERVENTION_MODES, default=None, help="with --concepts (default zero)"
    )
    p.add_argument("--coef", type=float, default=None, help="steering coefficient (--mode steer)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--eval-data", default=None, help="held-out data, same formats as DATA")
    p.add_argument("--lora-r", type=int, default=None, help="train LoRA adapters of rank R")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale alpha (16)")
    p.add_argument("--lora-targets", nargs="+", default=None, help="weights (W_Q ... W_out)")
    p.add_argument(
        "--keep-checkpoints", type=int, nargs="+", default=None, help="save out/step-N at steps"
    )
    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each block in the backward pass (less activation memory)",
    )
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard weights, gradients and optimiser state over the ranks",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_finetune)


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

    _add_finetune_parser(sub)

    from caft_tl.cli_directions import add_parser as add_directions_parser

    add_directions_parser(sub)

    from caft_tl.cli_diagnose import add_parser as add_diagnose_parser

    add_diagnose_parser(sub)

    from caft_tl.cli_crosscoder import add_parser as add_crosscoder_parser

    add_crosscoder_parser(sub)

    from caft_tl.cli_eval import add_parser as add_eval_parser

    add_eval_parser(sub)

    from caft_tl.cli_scale import add_parser as add_scale_parser

    add_scale_parser(sub)

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
    demo.add_argument("--quick", action="store_true", help="1 seed, less data: about 4 min")
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
    model = _load("embedded", args.device, args.dtype)
    results = run_demo(args.out, cfg, model=model)
    print()
    print(summary_table(results).to_string())
    print(f"\nreport: {Path(args.out) / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    args = build_parser().parse_args(argv)
    from caft_tl.data import DataError
    from caft_tl.evals import JudgeError
    from caft_tl.models import ModelLoadError

    # Bad input (or a judge server that refuses) is a message and exit code 2, not a traceback.
    user_errors = (
        DataError, ModelLoadError, FileExistsError, FileNotFoundError, ValueError, JudgeError
    )  # fmt: skip
    try:
        return args.func(args)
    except (*user_errors, IndexError, KeyError) as exc:
        print(f"caft-tl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
