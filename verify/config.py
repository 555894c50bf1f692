"""``RunConfig``: every setting of one verify run, JSON round-trippable; and the problem it describes.

A run is either a neural network on a data set (``data`` + ``model`` + ``model_kwargs``) or a closed-form loss
(``closed_form``: ``{"loss": "quadratic", "h": [...]}`` for ``L = 1/2 sum_i h_i w_i^2``, ``{"loss": "cos" |
"abs" | "power", "kwargs": {...}}`` for the other test losses of :mod:`verify.losses`, or ``{"loss":
"MODULE:CALLABLE", "kwargs": {...}}`` for any importable loss object, plus ``w0``, ``noise_std``,
``init_spread``). In memory, :func:`verify.engine.run` also accepts a ready :class:`~verify.problems.Problem`.

Trust: a configuration read from a file (a run's ``config.json`` on ``--resume``, ``--config``) may name only
the toolkit's own models (:data:`verify.models.BUILDERS`), closed-form losses (:data:`CLOSED_FORM_LOSSES`) and
data specs; :func:`code_settings` lists the settings that would import and call anything else, and the command
line refuses them unless the user passes them as options or ``--trust-config``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sharpness.data import load_dataset
from sharpness.importing import import_callable
from sharpness.inputs import check_fit

from .algorithms import ALGORITHMS
from .losses import AbsLoss, CosLoss, PowerLoss, QuadraticLoss
from .models import BUILDERS
from .problems import STREAM_INIT, ClosedFormProblem, ModelProblem, Problem, generator
from .speed import precision_error
from .stacked import EXECUTIONS

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Closed-form losses any configuration may name (also as ``verify.losses:CLASS``): no import, no user code.
CLOSED_FORM_LOSSES = {"quadratic": QuadraticLoss, "cos": CosLoss, "abs": AbsLoss, "power": PowerLoss}
#: Data specs that read data and never import code (sharpness.data); anything else with a colon is a callable.
DATA_SPECS = ("digits", "synthetic", "cifar10", "fashion-mnist", "mnist")
#: The command-line option that sets each code-naming setting.
CODE_OPTIONS = {"model": "--model", "closed_form": "--closed-form", "data": "--data"}


#: The types each kind of RunConfig field accepts (by its annotation), and how to say it: what a JSON file
#: gives, numpy scalars, tuples for lists; ``topology`` (a name, a file or a matrix) is checked by
#: verify.topology.
_INT, _REAL, _NONE = numbers.Integral, numbers.Real, type(None)
FIELD_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "str": ((str,), "a string"), "int": ((_INT,), "an integer"), "float": ((_REAL,), "a number"),
    "bool": ((bool, np.bool_), "true or false"), "str | None": ((str, _NONE), "a string or null"),
    "int | None": ((_INT, _NONE), "an integer or null"), "float | None": ((_REAL, _NONE), "a number or null"),
    "list[int]": ((list, tuple), "a list of integers"), "str | list": ((object,), "a name or a matrix"),
    "dict[str, Any]": ((dict,), "a JSON object"),
    "dict[str, Any] | None": ((dict, _NONE), "a JSON object or null"),
}  # fmt: skip


class ConfigError(ValueError):
    """A bad run setting; the message is one line naming the problem."""


@dataclass
class RunConfig:
    """Every setting of a run (see ``dsgd-verify run --help`` for one line on each)."""

    algo: str = "dsgd"
    topology: str | list = "ring"
    shuffle: str | None = None
    mix_method: str = "auto"
    workers: int = 16
    lr: float = 0.1
    local_batch: int = 16
    steps: int = 500
    momentum: float = 0.0
    weight_decay: float = 0.0
    warmup: int = 0
    milestones: list[int] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    data: str = "digits"
    samples: int | None = None
    test_samples: int | None = None
    alpha: float | None = None
    model: str = "mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str = "same"
    closed_form: dict[str, Any] | None = None
    log_every: int = 50
    eval_samples: int | None = None
    hess_every: int = 0
    hess_samples: int | None = None
    drift_every: int = 0
    ensemble: bool = True
    sharpness_every: int = 0
    ckpt_every: int = 0
    ckpt_seconds: float = 60.0
    execution: str = "auto"
    mix_buffers: bool = False
    rho: float = 0.05
    sigma: float = 0.0
    local_steps: int = 1
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown run setting(s): {', '.join(unknown)}")
        return cls(**d)

    def validate(self) -> RunConfig:
        """Check every setting; raise :class:`ConfigError` with one line naming the first bad one."""
        for f in dataclasses.fields(self):
            value, (kinds, text) = getattr(self, f.name), FIELD_TYPES[str(f.type)]
            is_bool = isinstance(value, bool) and bool not in kinds  # a bool is an int to Python, not to us
            if is_bool or not isinstance(value, kinds):
                raise ConfigError(f"setting {f.name} must be {text}; got {value!r}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an integer in [0, 2^63); got {self.seed}")
        if self.algo not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm {self.algo!r}; choose from {', '.join(ALGORITHMS)}")
        for name in ("workers", "local_batch", "local_steps"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in (
            "steps",
            "warmup",
            "log_every",
            "hess_every",
            "drift_every",
            "sharpness_every",
            "ckpt_every",
        ):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0; got {getattr(self, name)}")
        for name in ("samples", "test_samples", "eval_samples", "hess_samples"):
            n = getattr(self, name)
            if n is not None and int(n) < 1:
                raise ConfigError(f"{name} must be a positive number of points (or none for all); got {n}")
        for name in ("lr", "momentum", "weight_decay", "rho", "sigma", "ckpt_seconds"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0; got {v}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be < 1; got {self.momentum}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be float32 or float64; got {self.dtype!r}")
        why = precision_error(self.precision, self.dtype)
        if why:
            raise ConfigError(why)
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"execution must be one of {', '.join(EXECUTIONS)}; got {self.execution!r}")
        if self.init not in ("same", "independent"):
            raise ConfigError(f"init must be 'same' or 'independent'; got {self.init!r}")
        if self.closed_form is None and self.model not in BUILDERS and ":" not in self.model:
            raise ConfigError(
                f"unknown model {self.model!r}; choose from {', '.join(BUILDERS)} or MODULE:CALLABLE"
            )
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"Dirichlet alpha must be > 0; got {self.alpha}")
        return self


def _known_loss(name: Any) -> Any:
    """The class of :data:`CLOSED_FORM_LOSSES` that ``name`` (``cos`` or ``verify.losses:CosLoss``) names,
    else None."""
    if not isinstance(name, str):
        return None
    by_path = {f"verify.losses:{cls.__name__}": cls for cls in CLOSED_FORM_LOSSES.values()}
    return CLOSED_FORM_LOSSES.get(name) or by_path.get(name)


def data_is_callable(spec: Any) -> bool:
    """Whether the data spec names a ``MODULE:CALLABLE`` (importing and calling it), not data to read."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    head = spec.partition(":")[0]
    return head not in DATA_SPECS and not spec.lower().endswith((".pt", ".pth", ".npz"))


def code_settings(config: RunConfig) -> dict[str, str]:
    """The settings of ``config`` that would import and call code outside the toolkit's allow-list
    (setting -> the ``MODULE:CALLABLE`` it names): a model not in ``BUILDERS``, a closed-form loss not in
    :data:`CLOSED_FORM_LOSSES`, a data spec that is a callable."""
    out: dict[str, str] = {}
    if config.closed_form is not None:
        loss = config.closed_form.get("loss", "quadratic") if isinstance(config.closed_form, dict) else None
        if _known_loss(loss) is None:
            out["closed_form"] = str(loss)
        return out
    if config.model not in BUILDERS:
        out["model"] = str(config.model)
    if data_is_callable(config.data):
        out["data"] = str(config.data)
    return out


def check_trusted(config: RunConfig, source: str, given: set[str], trust: bool) -> None:
    """Refuse (one-line :class:`ConfigError`) a configuration read from the file ``source`` that names code
    (:func:`code_settings`), unless the user gave that setting on the command line (``given``) or
    ``trust``."""
    if trust:
        return
    for name, target in code_settings(config).items():
        if name not in given:
            raise ConfigError(
                f"{source} names {name} {target!r}, which would import and run code from outside the "
                f"toolkit; refused: give it on the command line ({CODE_OPTIONS[name]} ...) or add "
                "--trust-config if you trust the file"
            )


def _infer_kwargs(
    name: str, x_shape: tuple[int, ...], num_classes: int | None, kwargs: dict[str, Any]
) -> dict:
    """Fill in the input size and the number of classes from the data unless given."""
    out = dict(kwargs)
    if num_classes is not None and name in ("mlp", "small_cnn", "cnn", "resnet18_micro"):
        out.setdefault("num_classes", int(num_classes))
    if name == "mlp":
        out.setdefault("in_features", int(math.prod(x_shape)))
    elif name in ("small_cnn", "cnn", "resnet18_micro"):
        if len(x_shape) != 3:
            raise ConfigError(
                f"model {name} needs image inputs (C, H, W); the data has inputs of shape {x_shape}"
            )
        out.setdefault("in_channels", int(x_shape[0]))
        if name != "resnet18_micro":
            out.setdefault("image", int(x_shape[1]))
    return out


def _builder(name: str) -> tuple[Any, str]:
    if name in BUILDERS:
        fn = BUILDERS[name]
        return fn, f"verify.models:{fn.__name__}"
    return import_callable(name, what="model", error=ConfigError), name


def _closed_form_loss(spec: dict[str, Any]) -> Any:
    """The loss object ``spec`` names, built with its keyword arguments; one-line :class:`ConfigError` for a
    missing or bad setting, or a constructor that raises."""
    loss = spec.get("loss", "quadratic")
    known = _known_loss(loss)
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(f"closed_form kwargs must be a JSON object; got {kwargs!r}")
    if known is QuadraticLoss:  # 1/2 sum_i h_i w_i^2 with a closed-form batched gradient
        h = spec.get("h")
        if not isinstance(h, list) or not h or not all(_is_number(v) and math.isfinite(v) for v in h):
            raise ConfigError(
                f'the quadratic closed-form loss needs "h": a non-empty list of finite numbers; got {h!r}'
            )
        return QuadraticLoss(h)
    if known is None:
        known = import_callable(loss, what="closed-form loss", error=ConfigError)
    try:
        return known(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the constructor rejected its arguments: one line
        raise ConfigError(f"closed-form loss {loss!r} with kwargs {kwargs}: {_first_line(exc)}") from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _check_finite_data(data: Any, spec: str, split: str) -> None:
    """Refuse NaN/inf inputs or float targets (they would pass for a divergence of the training)."""
    for name, t in (("inputs", data.x), ("targets", data.y)):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConfigError(f"data {spec!r} ({split} split): {bad} of its {name} are NaN or inf")


def check_problem(problem: Problem, what: str) -> None:
    """One local loss and gradient (worker 0, step 0) before anything is written, so that a model that does
    not fit the data or a loss that fails is one line naming ``what``. Cost: one gradient on one batch."""
    try:
        params = {k: v.detach().clone().requires_grad_(True) for k, v in problem.params.items()}
        loss = problem.loss(params, {k: v.clone() for k, v in problem.buffers.items()}, problem.batch(0, 0))
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            kind = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(f"{what}: the loss returned {kind}, not a scalar tensor")
        torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        batch = tuple(b.unsqueeze(0) for b in problem.batch(0, 0))
        problem.analytic_grads(problem.init_stacked()[0][:1], batch)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model or loss failed: one line
        raise ConfigError(f"{what}: the first local loss and gradient failed: {_first_line(exc)}") from None


def build_problem(config: RunConfig, device: torch.device, dtype: torch.dtype) -> Problem:
    """The :class:`Problem` a config describes. Cost: loading the data and building one model."""
    m, b = int(config.workers), int(config.local_batch)
    if config.closed_form is not None:
        spec = dict(config.closed_form)
        L = _closed_form_loss(spec)
        d = len(spec["h"]) if "h" in spec else spec.get("d", getattr(L, "d", 0))
        if not isinstance(d, int) or d < 1:
            raise ConfigError(f'closed_form: give "w0" or the dimension "d" (an integer >= 1); got d={d!r}')
        try:
            w0 = torch.as_tensor(spec.get("w0", [0.0] * d), dtype=torch.float64)
            problem = ClosedFormProblem(
                L, w0, m=m, local_batch=b, noise_std=spec.get("noise_std", 0.0), seed=config.seed,
                init_spread=float(spec.get("init_spread", 0.0)), device=device, dtype=dtype,
            )  # fmt: skip
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"closed_form {spec}: {_first_line(exc)}") from None
        check_problem(problem, f"closed-form loss {spec.get('loss', 'quadratic')!r}")
        return problem
    train = load_dataset(config.data, split="train", samples=config.samples, seed=config.seed)
    try:
        test = load_dataset(config.data, split="test", samples=config.test_samples, seed=config.seed)
    except ValueError:
        test = None
    for data, split in ((train, "train"), (test, "test")):
        if data is not None:
            _check_finite_data(data, config.data, split)
    fn, arch = _builder(config.model)
    kwargs = _infer_kwargs(config.model, tuple(train.x.shape[1:]), train.num_classes, config.model_kwargs)
    build = functools.partial(fn, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(
            int(torch.randint(2**62, (1,), generator=generator(config.seed, STREAM_INIT, 2**20)))
        )
        try:
            model = build()
        except Exception as exc:  # noqa: BLE001 - the builder rejected its arguments: one line
            raise ConfigError(f"model {config.model!r} with {kwargs}: {_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model {config.model!r} returned a {type(model).__name__}, not a torch.nn.Module")
    check_fit(model, train.x, train.y, "ce" if train.num_classes else "mse", name=f"data {config.data!r}")
    loss_fn = torch.nn.functional.cross_entropy if train.num_classes else torch.nn.functional.mse_loss
    problem = ModelProblem(
        model, train, test, m=m, local_batch=b, seed=config.seed, alpha=config.alpha, loss_fn=loss_fn,
        device=device, dtype=dtype, init=config.init, builder=build, arch=arch, arch_kwargs=kwargs,
    )  # fmt: skip
    check_problem(problem, f"model {config.model!r} on data {config.data!r}")
    return problem
