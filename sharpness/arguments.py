"""The ``sharpness`` command line: its options and the ``--help`` text (metrics, formats, data specs).

Option errors exit with status 2 and one line on stderr, like every other input error of the command.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from . import __version__
from .report import METRICS
from .trace import METHODS as TRACE_METHODS

EPILOG = """\
metrics (--metrics a,b,...; default: all but 'layers', leaving out eigs/density when their Lanczos basis
would not fit in a quarter of the memory; H is the Hessian of the loss at the checkpoint; an HVP (exact
Hessian-vector product) costs about 2-3 gradients):
{metrics}

checkpoint formats (detected from the file):
  toolkit       saved by this toolkit (sharpness.checkpoint.save_checkpoint, e.g. by --demo or dsgd-verify);
                records its architecture, so no --arch is needed when that is one of the toolkit's own
                models; any other recorded MODULE:CALLABLE runs only with --arch or --trust-checkpoint-arch
  state_dict    torch.save(model.state_dict()), also nested under 'state_dict'/'model', with the 'module.'
                prefix of DataParallel/DDP removed; needs --arch
  .safetensors  safetensors weights (pip install safetensors); needs --arch
  TorchScript   torch.jit.save archive; no --arch needed
  HF folder     a HuggingFace save_pretrained folder (config.json + model.safetensors; pytorch_model.bin
                only with --trust-pickle), loaded by transformers from the local files; no --arch
  Lightning     a .ckpt: the state_dict under 'state_dict' with the LightningModule's prefix (e.g. model.)
                stripped (--prefix to choose); EMA weights with --weights-key
  pickle        a whole nn.Module saved with torch.save(model): only with --trust-pickle, because
                unpickling RUNS CODE FROM THE FILE. Everything else loads with weights_only=True.

data specs (--data; --samples N takes a seeded subset):
  digits                 embedded UCI handwritten digits, 8x8, 10 classes (CC BY 4.0); fixed 80/20 split
  synthetic:N            N seeded Gaussian points labelled by a random tanh teacher (20 features, 10 classes;
                         options :d=.., :classes=.., :seed=..)
  FILE.pt | FILE.npz     inputs and targets under keys x/y, inputs/targets or data/labels (no split)
  cifar10:DIR            CIFAR-10 python batches (data_batch_1..5, test_batch), read with a restricted
                         unpickler that accepts only arrays
  fashion-mnist:DIR      the idx files (train-/t10k-images/labels-idx?-ubyte[.gz]), e.g. from the Debian
                         package dataset-fashion-mnist
  tokens:FILE[:seq=T][:pad=ID]
                         token ids in a .npy/.pt file (N x T, or a 1-D stream cut into rows of T); for
                         --loss lm (a bare FILE.npy of integers reads the same)
  text:FILE[:seq=T]      the bytes of a text file as token ids (byte-level tokenizer, vocabulary 256)
  MODULE:CALLABLE        a function returning a Dataset, an (x, y) pair or (x, y) batches

errors exit with status 2 and one line; --debug shows the traceback.
example: sharpness --demo            (trains a small MLP on the digits for a few seconds, then reports)
"""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose option errors are one line and status 2: ``PROG: error: ... (see PROG
    --help)`` (subcommands name themselves, e.g. ``dsgd-verify run``). Shared by every command."""

    def error(self, message: str) -> NoReturn:  # one line, status 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_Parser = OneLineParser


def _floats(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in [0, 2**64)")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; ``--help`` explains every metric, checkpoint format and data spec."""
    width = max(len(m) for m in METRICS)
    metrics = "\n".join(f"  {m:<{width}}  {text}" for m, text in METRICS.items())
    p = _Parser(
        prog="sharpness",
        description="Sharpness report of a saved PyTorch model: loss and accuracy, Hessian trace, top\n"
        "eigenvalues, spectral density, average-direction and worst-case SAM losses, with standard errors.\n"
        "Exact Hessian-vector products (autograd), never finite differences.",
        epilog=EPILOG.format(metrics=metrics),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument
    a(
        "checkpoint",
        nargs="?",
        metavar="CHECKPOINT",
        help="model file (formats below); with --demo: where to save",
    )
    a(
        "--arch",
        metavar="MODULE:CALLABLE",
        help="function building the model for a state_dict/safetensors file",
    )
    a(
        "--arch-kwargs",
        metavar="JSON",
        help="keyword arguments for --arch as a JSON object, e.g. '{\"width\": 64}'",
    )
    a(
        "--weights-key",
        metavar="KEY",
        help="read the weights stored under KEY (dotted for nesting), e.g. ema_state_dict for EMA weights",
    )
    a(
        "--prefix",
        metavar="PREFIX",
        help="keep only the weights under this module prefix and strip it, e.g. model. in a Lightning .ckpt "
        "(a Lightning checkpoint with one top-level module is stripped without it)",
    )
    a("--data", default="digits", metavar="SPEC", help="data spec (below); default: digits")
    a(
        "--split",
        default="test",
        choices=["test", "train", "all"],
        help="which split of the data (default test)",
    )
    a(
        "--loss",
        default="ce",
        metavar="LOSS",
        help="ce: cross-entropy; mse: squared error, mean over samples and outputs, labels one-hot; lm: "
        "next-token cross-entropy of (N, T, V) logits against token ids, shifted, padding (-100) left out; "
        "MODULE:CALLABLE: your loss_fn(outputs, targets) -> scalar mean (default ce)",
    )
    a("--metrics", metavar="LIST", help=f"comma-separated subset of {','.join(METRICS)} or 'all'")
    a("--samples", type=_positive, metavar="N", help="seeded random subset of N points (default: all)")
    a("--batch-size", type=_positive, default=512, metavar="B", help="points per forward pass (default 512)")
    a(
        "--train-mode",
        action="store_true",
        help="measure with BatchNorm batch statistics and dropout on "
        "(default: eval mode, running statistics); stated in the output",
    )
    a(
        "--graph-memory",
        default="auto",
        metavar="BYTES",
        help="memory the cached gradient graphs may take (one per batch), e.g. 2G; beyond it each batch's "
        "graph is rebuilt per HVP and freed (streamed); 0 streams all (default auto: a quarter of the free "
        "RAM / GPU memory)",
    )
    a(
        "--timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="under torchrun: seconds a rank waits for the others in a collective before it fails, naming "
        "the rank that died or hung (default 300)",
    )
    a("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N (default auto)")
    a(
        "--seed",
        type=_seed,
        default=0,
        help="seed of every random probe, direction, subset and (--train-mode) dropout mask (default 0)",
    )
    a(
        "--out",
        metavar="FILE.json",
        help="write every value, stderr, setting, version and device as JSON (atomically)",
    )
    a(
        "--plot",
        metavar="DIR",
        help="write PNGs: spectral density, 1-D and 2-D loss landscapes around the "
        "checkpoint along filter-normalised random directions (Li et al. 2018)",
    )
    a(
        "--plot-eigen",
        action="store_true",
        help="with --plot: also draw the landscape along the top Hessian "
        "eigenvectors (scaled to the random direction's norm)",
    )
    a(
        "--per-layer",
        action="store_true",
        help="add the 'layers' metric: each layer's Tr H_ll and top eigenvalue lambda_max(H_ll)",
    )
    a(
        "--sigmas",
        type=_floats,
        nargs="+",
        default=[0.01, 0.03],
        metavar="SIGMA",
        help="noise scales of the average-direction SAM loss (default 0.01 0.03)",
    )
    a(
        "--rhos",
        type=_floats,
        nargs="+",
        default=[0.05],
        metavar="RHO",
        help="radii of the worst-case SAM sharpness (default 0.05)",
    )
    a(
        "--top-k",
        type=_positive,
        metavar="K",
        help="number of top eigenvalues, at most the number of parameters (default 5, or all if fewer)",
    )
    a(
        "--probes",
        type=_positive,
        default=100,
        metavar="N",
        help="noise draws of the avg-SAM loss, and trace probes with --rtol 0 (default 100)",
    )
    a(
        "--rtol",
        type=_floats,
        default=0.02,
        metavar="R",
        help="target relative standard error of the traces: stop once stderr < R |Tr| (default 0.02); "
        "0: a fixed --probes",
    )
    a(
        "--max-probes",
        type=_positive,
        default=1000,
        metavar="N",
        help="cap on trace probes when stopping on --rtol (default 1000)",
    )
    a(
        "--trace-method",
        default="auto",
        choices=list(TRACE_METHODS),
        help="auto (default): exact Tr G where Tr H = Tr G is certified (piecewise-linear net, CE/MSE, eval "
        "mode), else exact Tr G + Hutchinson on H - G; or force one",
    )
    a(
        "--trust-pickle",
        action="store_true",
        help="allow a whole pickled nn.Module: this RUNS CODE from the file; use it only for files you trust",
    )
    a(
        "--trust-checkpoint-arch",
        action="store_true",
        help="build the model with the MODULE:CALLABLE a toolkit checkpoint records even when it is not one "
        "of the toolkit's own models: this RUNS CODE named by the file; use it only for files you trust",
    )
    a("--no-progress", action="store_true", help="no progress bars on stderr")
    a("--debug", action="store_true", help="show the full traceback of an error")
    a(
        "--demo",
        action="store_true",
        help="train the demo MLP on the digits for a few seconds, save it "
        "(default runs/demo/model.pt), then report on the test split",
    )
    a("--version", action="version", version=f"sharpness {__version__}")
    return p
