"""The three presets: what the figures read (runs, suite checks, or T11's saved lockstep runs), and how big.

A preset's ``runs_kind`` says what its data are, and so which figures it draws
(:func:`figures.catalog.applies`):

- ``engine``: the design of the paper's Figure 1 (paper.md s.4.1) trained with :func:`verify.engine.run`,
  one run directory per :class:`RunSpec` under ``--runs`` (default ``runs/figures-<preset>``), plus the
  suite report: C-SGD and ring D-SGD at a small and a large total batch with the linear scaling rule (the
  local batch and the learning rate both grow 8x, like the paper's 64 -> 512 and 0.1 -> 0.8), plus grid
  and exponential D-SGD at the large batch; m = 16 workers, plain SGD without momentum or weight decay,
  warm-up ``max(0.1, t/warmup)`` and decays x0.1 at 2/5 and 4/5 of training. Seed 0 of each run also logs
  Tr(H Xi) and, where the preset says so, Tr H and lambda_max along training. Figures fig1-fig8.
- ``t11``: the saved runs of T11's large-batch experiment (:mod:`verify.claims.largebatch`, one lockstep
  run of ring D-SGD, C-SGD, C-SGD + avg-SAM(Xi) and C-SGD + isotropic noise per seed and batch, from one
  initialisation on one batch stream), in the folder ``python -m verify.claims.largebatch --scale S --out
  DIR`` writes. No engine runs, no suite. Figure fig9.

The presets:

- ``quick`` (engine): the embedded digits (8x8, 1437 training images), a tanh MLP (64-32-10), local batch
  8 and 64, lr 0.1 and 0.8, 1000 steps, 3 seeds; the quick suite. Everything, runs and suite included, in
  well under 15 minutes on 2 CPU cores.
- ``fmnist`` (t11): T11's own fmnist runs, ``results/t11-fmnist`` by default, with the protocol of
  ``verify.claims.largebatch.PROTOCOLS["fmnist"]`` (Fashion-MNIST, a GELU MLP, the linear scaling rule's
  pair of batches; its ``why`` says why; ``--list`` prints the numbers): the figures and T11 describe one
  set of runs, and a folder whose ``report.json`` records another protocol is refused. ``--rerun`` runs the
  missing seeds and batches with :func:`verify.claims.largebatch.run_protocol` (resume), the code path of
  ``python -m verify.claims.largebatch --scale fmnist``; ``--data DIR`` (or ``DSGD_FMNIST``) names the idx
  folder, default Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
- ``paper`` (engine): CIFAR-10 from a local folder of the python pickles (``--data DIR``), ResNet-18
  micro, local batch 64 and 512, lr 0.1 and 0.8, 6000 iterations, warm-up 60, decays at 2400 and 4800: the
  paper's settings except that it trains from scratch at 32x32 (the paper: ImageNet-pretrained, images
  resized to 56x56) and uses 1 seed like the paper. Meant for a GPU (``expected_time``); the full suite.

Every preset trains in fp32 by default; :func:`get_preset` takes the speed options of :mod:`verify.speed`
(``precision``, ``channels_last``, ``compile``) and puts them in every run's settings (engine presets only:
T11's runs are what they are). ``precision`` makes other runs (a bf16 run is not accepted for an fp32
figure, nor the reverse); ``channels_last`` and ``compile`` change rounding only and do not
(``figures.context.IGNORED_SETTINGS``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from verify.speed import Speed, precision_error

from .sources import FiguresError

#: The checks of the suite the figures read (figure -> check ids).
ALL_CHECKS = ("T1", "T1b", "T1c", "T5", "T6", "T7", "T8", "T10")
KEYS = ("csgd", "ring", "grid", "exponential")
#: What a preset's data are (``Preset.runs_kind``) -> how a message names them.
RUNS_KINDS = {
    "engine": "engine runs and the suite report",
    "t11": "T11's saved lockstep runs (python -m verify.claims.largebatch)",
}


@dataclass(frozen=True)
class RunSpec:
    """One training run: its directory name ``label`` under ``--runs``, its role (``key``: csgd / ring /
    grid / exponential; ``batch``: small / large; ``seed``) and the :class:`verify.config.RunConfig`
    settings."""

    label: str
    key: str
    batch: str
    seed: int
    config: dict[str, Any]

    @property
    def total_batch(self) -> int:
        return int(self.config["workers"]) * int(self.config["local_batch"])


@dataclass
class Preset:
    """A preset: its engine runs, the suite mode and checks, the landscape/sharpness sizes and the expected
    time; ``runs_kind`` (:data:`RUNS_KINDS`): what its data are; ``runs_dir``: the default ``--runs``
    (``runs/figures-<name>`` when empty); ``protocol``: for ``runs_kind == "t11"``, the
    :class:`verify.claims.largebatch.Protocol` of its runs."""

    name: str
    description: str
    runs: list[RunSpec]
    suite_mode: str
    suite_checks: tuple[str, ...] = ALL_CHECKS
    landscape: dict[str, Any] = field(default_factory=dict)
    expected_time: str = ""
    device: str = "auto"
    #: the ``dsgd-figures`` options that give its speed settings (empty for the default fp32)
    flags: str = ""
    runs_kind: str = "engine"
    runs_dir: str = ""
    protocol: Any = None

    def __post_init__(self) -> None:
        if self.runs_kind not in RUNS_KINDS:
            raise FiguresError(f"unknown runs_kind {self.runs_kind!r}; choose from {', '.join(RUNS_KINDS)}")
        if self.runs_kind == "t11" and (self.runs or self.protocol is None):
            raise FiguresError(f"preset {self.name}: T11 runs come with a protocol and no engine RunSpecs")
        self.runs_dir = self.runs_dir or f"runs/figures-{self.name}"

    def find(self, key: str, batch: str, seed: int | None = None) -> list[RunSpec]:
        """The runs with this role (all seeds when ``seed`` is None)."""
        return [
            r for r in self.runs if r.key == key and r.batch == batch and (seed is None or r.seed == seed)
        ]

    def first(self, key: str, batch: str) -> RunSpec | None:
        found = sorted(self.find(key, batch), key=lambda r: r.seed)
        return found[0] if found else None


def design(
    base: dict[str, Any],
    small: tuple[int, float],
    large: tuple[int, float],
    seeds: int,
    seed0_extra: dict[str, Any],
) -> list[RunSpec]:
    """The runs of the figures: C-SGD and ring at both batches, grid and exponential at the large batch,
    ``seeds`` seeds each; ``base``: RunConfig settings shared by all; ``small``/``large``: (local batch, lr);
    ``seed0_extra``: settings added to seed 0 only (the Hessian measurements along training)."""
    out = []
    roles = [
        ("csgd", "small"),
        ("ring", "small"),
        ("csgd", "large"),
        ("ring", "large"),
        ("grid", "large"),
        ("exponential", "large"),
    ]
    for seed in range(seeds):
        for key, batch in roles:
            b, lr = small if batch == "small" else large
            cfg = dict(
                base,
                algo="csgd" if key == "csgd" else "dsgd",
                topology="ring" if key == "csgd" else key,
                local_batch=b,
                lr=lr,
                seed=seed,
            )
            if seed == 0:
                cfg.update(seed0_extra)
            out.append(RunSpec(f"{key}-b{b}-s{seed}", key, batch, seed, cfg))
    return out


def _quick(seeds: int | None) -> Preset:
    steps = 1000
    base = dict(
        workers=16,
        steps=steps,
        warmup=10,
        milestones=[400, 800],
        data="digits",
        model="mlp",
        model_kwargs={"hidden": [32], "activation": "tanh"},
        dtype="float64",
        log_every=20,
        momentum=0.0,
        weight_decay=0.0,
    )
    extra = {"hess_every": 50, "sharpness_every": 100}
    return Preset(
        "quick",
        "embedded digits, tanh MLP 64-32-10, m = 16, local batch 8 / 64, lr 0.1 / 0.8, 1000 steps",
        design(base, (8, 0.1), (64, 0.8), seeds or 3, extra),
        suite_mode="quick",
        landscape={
            "grid": 21,
            "line": 41,
            "span": 1.0,
            "samples": None,
            "trace_probes": 100,
            "lanczos_tol": 1e-4,
        },
        expected_time="3-5 min of runs + the quick suite's checks (1-4 min) + 1 min of figures, 2 cores",
        device="cpu",
    )


def _fmnist(data: str | None, seeds: int | None) -> Preset:
    """T11's fmnist runs (:data:`verify.claims.largebatch.PROTOCOLS`), read from ``results/t11-fmnist``: no
    engine runs of its own, so the figures and the check describe one set of runs."""
    from verify.claims.largebatch import protocol_for

    folder = data or os.environ.get("DSGD_FMNIST")
    p = protocol_for(
        "fmnist", f"fashion-mnist:{folder}" if folder else None, **({"seeds": seeds} if seeds else {})
    )
    (b_s, lr_s), (b_l, lr_l) = p.small, p.large
    n_flat = len(p.flat_steps())
    return Preset(
        "fmnist",
        f"T11's fmnist lockstep runs ({p.data}, {p.model} {p.model_kwargs}, m = {p.workers}; ring D-SGD, "
        "C-SGD, C-SGD + avg-SAM(Xi), C-SGD + isotropic noise from one initialisation on one batch stream; "
        f"local batch {b_s} / {b_l}, lr {lr_s} / {lr_l}, {p.steps} steps, {p.seeds} seeds)",
        [],
        suite_mode="quick",
        suite_checks=(),
        expected_time=(
            f"{2 * p.seeds} lockstep runs (2 batches x {p.seeds} seeds) of {p.steps} steps of 4 arms, plus "
            f"lambda_max and Tr H of each arm at {n_flat} steps per run; not measured end to end by this "
            "command: "
            "`python -m verify.claims.largebatch --scale fmnist --estimate-only` times a step and a flatness "
            "point on this machine and prints the total"
        ),
        device=p.device,
        runs_kind="t11",
        runs_dir="results/t11-fmnist",
        protocol=p,
    )


def _paper(data: str | None, seeds: int | None) -> Preset:
    folder = data or os.environ.get("DSGD_CIFAR10") or "data/cifar-10-batches-py"
    base = dict(
        workers=16,
        steps=6000,
        warmup=60,
        milestones=[2400, 4800],
        data=f"cifar10:{folder}",
        model="resnet18_micro",
        dtype="float32",
        log_every=50,
        eval_samples=10000,
        hess_samples=2048,
        momentum=0.0,
        weight_decay=0.0,
    )
    extra = {"hess_every": 300, "sharpness_every": 600}
    return Preset(
        "paper",
        "CIFAR-10, ResNet-18 micro, m = 16, local batch 64 / 512, lr 0.1 / 0.8, 6000 iterations",
        design(base, (64, 0.1), (512, 0.8), seeds or 1, extra),
        suite_mode="full",
        landscape={
            "grid": 25,
            "line": 51,
            "span": 1.0,
            "samples": 2048,
            "trace_probes": 50,
            "lanczos_tol": 1e-3,
        },
        expected_time=(
            "estimated from FLOP counts, not measured (no GPU was available): ~7-8 GPU-hours on one H100 "
            "for 1 seed. ResNet-18 micro costs ~3.4 GFLOP per training image at 32x32; 6000 steps at total "
            "batch 8192 are ~1.7e17 FLOP (~70-80 min at ~40 TFLOP/s sustained) for each of the 4 large-batch "
            "runs, ~10 min for each of the 2 runs at 1024; evaluation (16 workers + the average on 10k test "
            "images every 50 steps) adds ~10 min per run, Tr H / lambda_max (100 + ~100 HVPs on 2048 images "
            "every 600 steps) ~15 min per seed-0 run; the full suite < 45 min"
        ),
        device="auto",
    )


PRESETS = ("quick", "fmnist", "paper")


def get_preset(
    name: str, *, data: str | None = None, seeds: int | None = None, speed: Speed | None = None
) -> Preset:
    """The preset ``name`` (quick, fmnist, paper); ``data``: the data folder for fmnist/paper; ``seeds``: how
    many seeds per run (default: the preset's); ``speed``: the speed options of every run (default fp32,
    nothing else; :mod:`verify.speed`)."""
    if seeds is not None and int(seeds) < 1:
        raise FiguresError(f"seeds must be >= 1; got {seeds}")
    if name == "quick":
        preset = _quick(seeds)
    elif name == "fmnist":
        preset = _fmnist(data, seeds)
    elif name == "paper":
        preset = _paper(data, seeds)
    else:
        raise FiguresError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return with_speed(preset, speed or Speed())


def with_speed(preset: Preset, speed: Speed) -> Preset:
    """``preset`` with the speed options in every run's settings, and named in its description when they are
    not the default; one-line :class:`FiguresError` when the precision does not fit the preset's dtype."""
    if preset.runs_kind == "t11" and speed != Speed():
        raise FiguresError(
            f"preset {preset.name} draws T11's saved runs; the speed options apply to quick and paper"
        )
    for r in preset.runs:
        why = precision_error(speed.precision, r.config.get("dtype", "float32"))
        if why:
            raise FiguresError(f"preset {preset.name}: {why}")
    runs = [
        RunSpec(r.label, r.key, r.batch, r.seed, dict(r.config, **dataclasses.asdict(speed)))
        for r in preset.runs
    ]
    extra = "" if speed == Speed() else f"; training gradients {speed.label}"
    flags = f" --precision {speed.precision}" * (speed.precision != "fp32")
    flags += " --channels-last" * speed.channels_last + " --compile" * speed.compile
    return dataclasses.replace(preset, runs=runs, description=preset.description + extra, flags=flags)
