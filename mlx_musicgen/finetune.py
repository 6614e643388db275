"""Fine-tune MusicGen on your own music with LoRA (or the whole decoder), in MLX (the `mlx_musicgen.finetune`
command; finetune.py runs it too).

    mlx_musicgen.finetune --model facebook/musicgen-small --data my_clips --adapter-path my_style --iters 1000
    mlx_musicgen.generate --model facebook/musicgen-small --adapter my_style --text "my style, calm" --output x.wav
    mlx_musicgen.finetune --fuse --adapter-path my_style --mlx-path my_model      # the adapters merged in
    mlx_musicgen.finetune --fuse --adapter-path my_style --hf-path my_model_hf    # ... for transformers

The data folder holds audio files with captions (FILE.txt beside each, or metadata.jsonl with file_name and
text, or --caption for all); OUT gets the adapters in PEFT's format (adapter_model.safetensors and
adapter_config.json, which transformers + PEFT load too; a full fine-tune: adapters.safetensors), mlx_adapter.json
(the settings and the run), metrics.jsonl, loss.png (with matplotlib: pip install "mlx-musicgen[train]") and a
checkpoint/ to --resume from (Ctrl-C saves one).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import mlx.core as mx

from . import cli, lora
from .dataset import load_examples, split
from .trainer import CHECKPOINT, TrainConfig, Trainer, checkpoint_state


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx_musicgen.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub id, Hub-layout folder or converted folder to fine-tune (for --fuse: "
                                   "default the one the adapters were trained on)")
    p.add_argument("--data", help="folder of audio files with captions")
    p.add_argument("--caption", help="the caption of every clip that has none")
    p.add_argument("--adapter-path", required=True, help="output folder (adapters, metrics, checkpoint)")
    p.add_argument("--iters", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default a tenth of --iters, at most 100)")
    p.add_argument("--weight-decay", type=float, help="AdamW's (default 0 for LoRA, 0.1 with --full)")
    p.add_argument("--lora-rank", type=int, default=16, help="default 16")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="default 16 (scale alpha / rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="default 0")
    p.add_argument("--lora-targets", default=",".join(lora.TARGETS),
                   help=f"comma-separated modules to adapt (default all: {','.join(lora.TARGETS)})")
    p.add_argument("--full", action="store_true", help="fine-tune the whole decoder instead of LoRA")
    p.add_argument("--cond-dropout", type=float, default=0.3,
                   help="share of steps' rows trained without their text (so guidance still works; default 0.3)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="windows held out for validation (0.1)")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations (default 100)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default 10)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--resume", nargs="?", const=True, metavar="ADAPTER",
                   help="continue ADAPTER_PATH's run from its checkpoint/ (with none: train the adapters it holds "
                        "further, e.g. a PEFT adapter made elsewhere); --resume ADAPTER: train another adapter "
                        "(a folder or Hub id, PEFT's format too) further, writing to --adapter-path. Adapters "
                        "trained further keep their own kind, rank, alpha, dropout and targets (--full and the "
                        "--lora-* options are for new ones)")
    p.add_argument("--fuse", action="store_true",
                   help="merge --adapter-path into --model, write --mlx-path and/or --hf-path")
    p.add_argument("--mlx-path", help="with --fuse: the converted folder to write")
    p.add_argument("--hf-path", help="with --fuse: a folder in the Hub's transformers layout to write (float32), "
                                     "for MusicgenForConditionalGeneration.from_pretrained")
    p.add_argument("--overwrite", action="store_true", help="with --fuse: replace a non-empty --mlx-path/--hf-path")
    cli.add_checkpoint_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def configs(args: argparse.Namespace) -> tuple[lora.AdapterConfig, TrainConfig]:
    """The adapters' and the training's settings from the options, checked."""
    adapters = lora.AdapterConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                  targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                                  full=args.full)
    adapters.check()
    config = TrainConfig(iters=args.iters, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         learning_rate=args.learning_rate, warmup=args.warmup, weight_decay=args.weight_decay,
                         cond_dropout=args.cond_dropout, val_fraction=args.val_fraction, val_every=args.val_every,
                         log_every=args.log_every, save_every=args.save_every, seed=args.seed,
                         grad_checkpoint=args.grad_checkpoint)
    config.check()
    return adapters, config


def adapters_to_start_from(args: argparse.Namespace, out: Path) -> str | Path | None:
    """What --resume trains further (None: new adapters, or OUT's checkpoint as it is): OUT itself when it holds
    adapters but no checkpoint of ours, or a checkpoint of a run that started from an adapter (its structure is
    OUT's adapters); --resume ADAPTER's folder or Hub id."""
    if not args.resume:
        return None
    state = checkpoint_state(out)
    if args.resume is not True:
        given = Path(args.resume).expanduser()
        if not (given.exists() and out.exists() and given.resolve() == out.resolve()):
            if state is not None:
                raise FileExistsError(f"{out} holds a checkpoint: --resume (without ADAPTER) continues it, or "
                                      f"choose another --adapter-path.")
            return args.resume
        args.resume = True  # --resume OUT: the same as --resume
    if state is not None and state.get("started_from") is None:
        return None
    if state is None and not lora.holds_adapters(out):
        raise FileNotFoundError(f"{out} holds no checkpoint and no adapters to resume: train without --resume "
                                f"first, or give --resume ADAPTER.")
    if state is not None and not lora.holds_adapters(out):  # stopped between its checkpoint and its adapters
        return state["started_from"]
    return out


def run_fuse(args: argparse.Namespace, out: Path) -> None:
    from .convert import fuse

    if not args.mlx_path and not args.hf_path:
        raise ValueError("--fuse writes a converted folder (--mlx-path), a transformers folder (--hf-path) or "
                         "both: give one.")
    for folder in fuse(out, args.mlx_path, args.model, args.overwrite, hf_path=args.hf_path,
                       checkpoint_format=args.checkpoint_format, text_encoder=args.text_encoder):
        print(f"wrote {folder}", file=sys.stderr)


def run(args: argparse.Namespace, may_restart: bool = False) -> None:
    """The command. `may_restart`: this process is the finetune command, which may replace itself with a run of the
    same command line with the variables a CPU trains faster with (_linux.training_environment: OpenBLAS, its
    threads' timeout) before it loads anything."""
    from . import _linux
    from .musicgen import MusicGen

    out = Path(args.adapter_path).expanduser()
    if args.fuse:
        run_fuse(args, out)
        return
    if args.mlx_path or args.hf_path:
        raise ValueError("--mlx-path and --hf-path go with --fuse (after training, to merge the adapters).")
    if not args.model or not args.data:
        raise ValueError("give --model and --data to fine-tune (or --fuse to merge adapters).")
    adapters, config = configs(args)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file: choose another --adapter-path.")
    start_from = adapters_to_start_from(args, out)
    if (not args.resume or start_from not in (None, out)) and lora.holds_adapters(out):
        raise FileExistsError(f"{out} already holds adapters: --resume to continue them, or choose another "
                              f"--adapter-path.")
    variables = _linux.training_environment() if may_restart and mx.default_device() == mx.cpu else {}
    if variables:
        if "MLX_MUSICGEN_BLAS" in variables:
            print(f"MKL has no optimised code for this CPU ({_linux.cpu_vendor()}): running again with OpenBLAS as "
                  f"MLX's BLAS (MLX_MUSICGEN_BLAS=mkl keeps MKL)", file=sys.stderr)
        _linux.restart_with(variables)
    _linux.use_all_cores_for_blas()  # training's products are large: every core helps (generation keeps one free)
    musicgen = MusicGen.from_pretrained(args.model, portable=True, checkpoint_format=args.checkpoint_format,
                                        text_encoder=args.text_encoder)  # the CPU forms are for generation
    musicgen.use_cpu_forms_for_encoding()  # but for the frozen parts that encode the data
    if musicgen.config.magnet is not None:
        raise ValueError(f"{args.model} is a MAGNeT model, which trains with masked spans, not the step-by-step "
                         f"loss finetune.py optimises: fine-tune a MusicGen or AudioGen model instead.")
    mx.random.seed(args.seed)
    examples = load_examples(musicgen, Path(args.data), args.caption, log=lambda m: print(m, file=sys.stderr))
    train, val = split(examples, config.val_fraction, config.seed)
    out.mkdir(parents=True, exist_ok=True)
    from_checkpoint = args.resume is True and checkpoint_state(out) is not None
    if not from_checkpoint:  # what a run stopped before its first save left
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    trainer = Trainer(musicgen.model, train, val, out, config, adapters, str(args.model), start_from)
    if from_checkpoint:
        trainer.resume()
    elif start_from is not None:
        print(f"training the adapters of {start_from} further, from step 0, into {out}", file=sys.stderr)
    with cli.Bar(total=config.iters, initial=trainer.step, desc="training", unit="step", disable=args.quiet,
             dynamic_ncols=True) as bar:

        def progress(step: int, entry: dict) -> None:
            bar.update(step - bar.n)
            shown = {"loss": f"{entry['train_loss']:.3f}", "tok/s": f"{entry['tokens_per_second']:.0f}"}
            if "val_loss" in entry:
                shown["val"] = f"{entry['val_loss']:.3f}"
            bar.set_postfix(shown)

        trainer.run(progress, log=lambda m: bar.write(m, file=sys.stderr))
    print(f"wrote the adapters in {out} (step {trainer.step}); generate with --adapter {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The finetune command; without `argv`, this process is the command (its arguments are sys.argv's)."""
    args = parse_args(argv)
    cli.run_main(lambda: run(args, may_restart=argv is None), args.debug)


if __name__ == "__main__":
    main()
