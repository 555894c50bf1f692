"""The ``sharpness`` command: the sharpness report of a saved checkpoint (also ``python -m sharpness``).

``main(argv)`` returns the exit status: 0 on success, 2 for bad input (one line on stderr naming the problem,
no traceback unless ``--debug``), 1 for an unexpected internal error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .arguments import build_parser
from .checkpoint import load_model
from .data import load_dataset
from .demo import DEFAULT_DEMO_PATH, train_demo
from .functional import SharpnessInputError, check_loss, make_loss, private_rng, resolve_device
from .inputs import accuracy, batch_statistics_note, check_fit, loss_description, loss_function
from .memory import describe_products, parse_budget
from .parallel import DistributedSharpnessError, cli_done, cli_ranks, describe
from .report import METRICS, ReportSettings, parse_metrics, run_report, select_metrics
from .results import check_destination, environment, write_json
from .sequence import ATTENTION_KERNEL
from .table import format_table, report_json


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sharpness``; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    threads = torch.get_num_threads()
    status = 1
    try:
        with private_rng(args.seed):  # train-mode dropout follows --seed; a calling process keeps its RNG
            status = run(args)
        return status
    except DistributedSharpnessError as exc:
        print(f"sharpness: error: {_first_line(exc)}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `sharpness ... | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps Python's exit-time flush quiet
        return 0
    except (SharpnessInputError, OSError) as exc:
        if args.debug:
            raise
        print(f"sharpness: error: {_first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sharpness: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line unless --debug
        if args.debug:
            raise
        print(
            f"sharpness: internal error: {type(exc).__name__}: {_first_line(exc)} (rerun with --debug for "
            "the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        torch.set_num_threads(threads)  # --demo lowers it; leave a calling process as it was
        cli_done(getattr(args, "ranks", None), ok=status == 0)


def _arch_kwargs(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SharpnessInputError(
            f"--arch-kwargs is not valid JSON: {exc.msg} at character {exc.pos}"
        ) from exc
    if not isinstance(value, dict):
        raise SharpnessInputError(f"--arch-kwargs must be a JSON object, got {type(value).__name__}")
    return value


def _check_destinations(args: argparse.Namespace) -> None:
    """Before any work: ``--out`` is neither the checkpoint (``--demo``: the one it will save) nor the data
    file, and ``--out``/``--plot`` can be written (a long measurement must not end in an unwritable path)."""
    if args.out:
        out = Path(args.out).expanduser().resolve()
        checkpoint = args.checkpoint or (DEFAULT_DEMO_PATH if args.demo else None)
        data = Path(args.data).expanduser()
        for what, other in (
            ("the checkpoint", checkpoint),
            ("the data file", data if data.exists() else None),
        ):
            if other is not None and Path(other).expanduser().resolve() == out:
                raise SharpnessInputError(
                    f"--out {args.out} is {what} itself: writing the JSON there would overwrite it"
                )
        check_destination(args.out, "--out")
    if args.plot:
        check_destination(args.plot, "--plot", directory=True)


def run(args: argparse.Namespace) -> int:
    """Load, check, measure, print; then plots and JSON if asked. Raises on bad input."""
    started = time.perf_counter()
    device = resolve_device(args.device)
    _check_destinations(args)
    args.ranks, device = cli_ranks(args, device)  # under torchrun: this rank's share of the batches
    if args.demo:
        if args.arch or args.arch_kwargs:
            raise SharpnessInputError("--demo builds its own model: leave out --arch/--arch-kwargs")
        # The demo MLP is tiny: one thread is fastest, and far faster than several on a busy machine.
        torch.set_num_threads(1)
        _, saved, info = train_demo(args.checkpoint or DEFAULT_DEMO_PATH, seed=args.seed)
        print(
            f"demo: trained a tanh MLP on {info['n_train']} digits ({info['epochs']} epochs, {info['steps']} "
            f"SGD steps, {info['train_seconds']} s): train loss {info['train_loss']:.4g}, train accuracy "
            f"{100 * info['train_accuracy']:.2f} %; saved {saved}\n"
        )
        args.checkpoint = str(saved)
    if not args.checkpoint:
        raise SharpnessInputError("no CHECKPOINT given (or use --demo); see sharpness --help")
    requested = parse_metrics(args.metrics, args.per_layer)
    model, info = load_model(
        args.checkpoint,
        arch=args.arch,
        arch_kwargs=_arch_kwargs(args.arch_kwargs),
        trust_pickle=args.trust_pickle,
        trust_checkpoint_arch=args.trust_checkpoint_arch,
        device=device,
        weights_key=args.weights_key,
        prefix=args.prefix,
    )
    first = next(iter(model.parameters()), None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if first is None or not trainable:
        raise SharpnessInputError(f"the model in {args.checkpoint} has no trainable parameters")
    dtype = first.dtype if first.is_floating_point() else torch.float32
    data = load_dataset(args.data, split=args.split, samples=args.samples, seed=args.seed).to(device, dtype)
    outputs = check_fit(
        model, data.x, data.y, args.loss, name=f"data {args.data}", train_mode=args.train_mode
    )
    loss_fn = loss_function(args.loss, outputs)
    batches = data.batches(args.batch_size)
    n_batches = len(batches)
    if args.ranks is not None:
        batches = args.ranks.shard(batches)
    fl = make_loss(model, loss_fn, batches, train_mode=args.train_mode, check=False)
    check_loss(fl, f"checkpoint {args.checkpoint}" + (" (--train-mode)" if args.train_mode else ""))
    del fl
    chosen, skipped = select_metrics(
        requested, info["num_params"], first.element_size(), device, args.per_layer
    )
    if args.ranks is not None:  # free GPU memory may differ between ranks: run what all of them can
        agreed = args.ranks.agree(chosen, list(METRICS))
        skipped.update({m: "left out on another rank (memory)" for m in chosen if m not in agreed})
        chosen = agreed
    settings = ReportSettings(
        probes=args.probes,
        rtol=args.rtol or None,
        max_probes=args.max_probes,
        trace_method=args.trace_method,
        top_k=args.top_k if args.top_k is not None else min(5, trainable),
        sigmas=list(args.sigmas),
        rhos=list(args.rhos),
        seed=args.seed,
        train_mode=args.train_mode,
        graph_memory=parse_budget(args.graph_memory, device),
    )
    rep = run_report(
        model,
        loss_fn,
        batches,
        chosen,
        settings,
        progress=not args.no_progress,
        keep_vectors=args.plot_eigen,
        accuracy=lambda: accuracy(model, batches, train_mode=args.train_mode),
    )
    rep.skipped.update(skipped)
    header = _header(args, info, data, device) + [("HVPs", describe_products(rep.products))]
    bn_note = batch_statistics_note(model, args.train_mode, n_batches)
    if bn_note:
        header.append(("note", bn_note))
    if args.ranks is not None:
        split = describe(args.ranks, n_batches)
        header.append(("ranks", f"{split['world']} processes ({split['backend']}), batches per rank "
                       f"{split['batches_per_rank']}, one all_reduce per product"))  # fmt: skip
    print(format_table(header, rep), flush=True)
    plots: dict[str, Any] = {}
    if args.plot:
        from .plots import report_plots

        plots = report_plots(
            model,
            loss_fn,
            batches,
            rep,
            args.plot,
            seed=args.seed,
            train_mode=args.train_mode,
            eigen=args.plot_eigen,
            progress=not args.no_progress,
        )
        print(f"\nplots: {', '.join(str(p) for p in plots['files'])}")
    if args.out:
        doc = {
            "tool": "sharpness",
            "version": __version__,
            "command": ["sharpness", *args.argv],
            "checkpoint": {k: v for k, v in info.items() if k != "extra"} | {"extra": info.get("extra")},
            "data": {
                "spec": args.data,
                "name": data.name,
                "split": args.split,
                "n_samples": len(data),
                "input_shape": list(data.input_shape),
                "num_classes": data.num_classes,
                "batch_size": args.batch_size,
                "meta": data.meta,
            },
            "loss": args.loss,
            "bn_mode": "train" if args.train_mode else "eval",
            "bn_note": bn_note,
            "data_parallel": describe(args.ranks, n_batches),
            "seed": args.seed,
            "settings": {
                **vars(settings),
                "metrics": chosen,
                "per_layer": args.per_layer,
                "device": str(device),
                "dtype": str(dtype),
                "attention_kernel": ATTENTION_KERNEL,
            },
            "environment": environment(device),
            **report_json(rep),
            "landscape": plots.get("results"),
            "plots": [str(p) for p in plots.get("files", [])],
            "wall_seconds": round(time.perf_counter() - started, 2),
        }
        path = write_json(args.out, doc)
        print(f"{'' if args.plot else chr(10)}wrote {path}")
    return 0


def _header(
    args: argparse.Namespace, info: dict[str, Any], data: Any, device: torch.device
) -> list[tuple[str, str]]:
    arch = f", arch {info['arch']}" if info.get("arch") else ""
    sub = data.meta.get("subset")
    subset = f" (seeded subset of {sub['requested']}, seed {sub['seed']})" if sub else ""
    classes = f", {data.num_classes} classes" if data.num_classes else ""
    split = "" if str(data.meta.get("split", "")).startswith("file") else f", {args.split} split"
    mode = (
        "train: BatchNorm uses batch statistics, dropout on"
        if args.train_mode
        else "eval: BatchNorm uses running statistics, dropout off"
    )
    return [
        (
            "checkpoint",
            f"{info['path']} ({info['format']}{arch}, {info['num_params']:,} parameters, {info['dtype']})",
        ),
        (
            "data",
            f"{data.name}{split}: {len(data)} samples{subset}, inputs {tuple(data.input_shape)}{classes}; "
            f"batch size {args.batch_size}",
        ),
        (
            "loss",
            loss_description(args.loss),
        ),
        ("mode", mode),
        ("device", f"{device}; seed {args.seed}; attention kernel {ATTENTION_KERNEL}"),
    ]
