"""A run in several processes: launched through `accelerate launch`, one process per GPU (gloo on a CPU).

The job's own process only launches and waits (train_distributed); each launched process runs
`python -m workbench train-rank JOB OUTPUT` (rank_main), and process 0 reports through the store
as the job. How the processes share a step is the loop's business (core.training.loop).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

from core import jobs, workspace
from core.errors import BadInput, WorkbenchError
from core.jobs import JobCancelled, JobContext
from core.store import Store
from core.train_config import TrainConfig
from core.train_dir import TrainDir
from core.training.data import pinned_pairs
from core.training.devices import device
from core.training.loop import TrainResult, train

PROCESSES_ENV = "WORKBENCH_TRAIN_PROCESSES"  # overrides the number of training processes (e.g. 2 on a CPU)
CANCELLED_EXIT = 3  # a process of a distributed run exits with this after a cancel
RANK_SHUTDOWN_SECONDS = 24 * 3600


def training_processes() -> int:
    """How many processes a training job runs: one per visible GPU, unless WORKBENCH_TRAIN_PROCESSES says."""
    wanted = os.environ.get(PROCESSES_ENV, "").strip()
    if wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise BadInput(f"{PROCESSES_ENV} must be a whole number >= 1, got {wanted!r}")
        return int(wanted)
    return max(1, torch.cuda.device_count())


def train_distributed(ctx: JobContext, config: TrainConfig, processes: int) -> TrainResult:
    """Run train() in `processes` processes through `accelerate launch` (one per GPU; gloo on the CPU).

    The job's own process only launches and waits: process 0 of the launch reports through the
    store as this job. A cancel reaches process 0 through the store (all processes then stop
    after a checkpoint); if this process is told to stop, the launch's process group goes too.
    """
    out = TrainDir(config.output_dir or workspace.artifacts_dir() / f"train-{ctx.job_id}")
    out.root.mkdir(parents=True, exist_ok=True)
    pinned_pairs(ctx.store, config, out.root)  # pinned here, once, so that every process reads the same pairs
    # --multi_gpu is accelerate's torchrun launcher; without a GPU its processes meet over gloo on the CPU
    # (accelerate's --cpu launcher needs MPI for more than one process).
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    command += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port())]
    command += ["-m", "workbench", "train-rank", str(ctx.job_id), str(out.root)]
    ctx.log(f"training in {processes} processes: {' '.join(command[2:])}")
    # torchrun gives its processes this long after a SIGTERM before it kills them: long enough for any step and
    # checkpoint (they stop at the end of their step); a job that stops responding is killed by the job's watch.
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(RANK_SHUTDOWN_SECONDS)}
    with open(out.processes_log, "ab") as log:  # in the job's process group: a cancel or kill of the job reaches them
        launch = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        code = launch.wait()
    except BaseException:
        with jobs.sigterm_held():  # a second SIGTERM must not leave the processes saving without us waiting
            launch.terminate()  # torchrun passes it on to the training processes
            launch.wait()
        raise
    if code == CANCELLED_EXIT or ctx.cancelled():
        raise JobCancelled()
    if code != 0:
        raise WorkbenchError(f"training processes failed (exit {code}): {_failure_reason(out)}")
    metrics = json.loads(out.metrics.read_text())
    return TrainResult(**{k: metrics[k] for k in TrainResult.__dataclass_fields__})


def _failure_reason(out: TrainDir) -> str:
    """The one line that says why a distributed run failed: a process's own message, else the last exception."""
    lines = out.processes_log.read_text(errors="replace").splitlines()
    own = [line for line in lines if re.match(r"process \d+: ", line)]
    raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception): ", line) and "ChildFailedError" not in line]
    return (own or raised or ["no message; see " + str(out.processes_log)])[-1]


def _free_port() -> int:
    """A free local port for the processes' rendezvous (fixed ports collide when two runs start together)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_main(job_id: int, output_dir: str) -> int:
    """One process of a distributed run (`python -m workbench train-rank JOB OUTPUT`, started by accelerate)."""
    import torch.distributed as dist

    jobs.cancel_on_sigterm()  # as in a job's own process: held while training, a cancel at the end of the step
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    store = Store()
    try:
        params = jobs.get(store, job_id).params
        config = TrainConfig.from_dict({**params, "output_dir": output_dir})
        ctx = JobContext(store, job_id, params) if dist.get_rank() == 0 else None
        train(ctx, config, store)
        return 0
    except JobCancelled:
        return CANCELLED_EXIT
    except WorkbenchError as exc:
        print(f"process {dist.get_rank()}: {exc}", flush=True)
        return 1
    finally:
        dist.destroy_process_group()
        store.close()
