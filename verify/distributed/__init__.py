"""Real multi-process D-SGD on ``torch.distributed``: one worker per process, equal to the simulated engine.

Rank j holds worker j's parameters w_j. Each step it takes its local gradient on its own shard (the simulated
engine's batch stream for worker j), exchanges w_j with its in- and out-neighbours (the nonzeros of P(t), one
batched ``isend``/``irecv`` per step, never a send to oneself) and applies the engine's own update rule
(``dsgd`` AWC ``w_j <- sum_k P_jk w_k - lr g_j``, ``dsgd-atc``; ``csgd``/``sam``/``avgsam`` average gradients
with ``all_reduce``). Same :class:`~verify.config.RunConfig`, metrics and run directory as
:func:`verify.engine.run`, so a run's ``config.json`` replays either way. gloo on CPU, NCCL on GPU.

- :mod:`.comm`: process group, gossip, collectives, timeouts naming the failing rank;
- :mod:`.transport`: :func:`run_rank`, the transport of the engine's one run loop for one rank;
  :mod:`.measure`: the metrics row with collectives;
- :mod:`.launch`: start N ranks on loopback (torchrun or a local launcher);
- ``torchrun --nproc-per-node N -m verify.distributed --topology ring ...`` or
  ``dsgd-verify run --launcher torchrun --procs N ...``.
"""

from .comm import Comm, DistributedRunError, connect
from .launch import LaunchResult, launch_local, launch_torchrun, torchrun_command
from .transport import Options, run_rank, supported

__all__ = [
    "Comm",
    "DistributedRunError",
    "LaunchResult",
    "Options",
    "connect",
    "launch_local",
    "launch_torchrun",
    "run_rank",
    "supported",
    "torchrun_command",
]
