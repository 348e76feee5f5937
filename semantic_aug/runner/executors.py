"""Where the experiment grid's jobs run: on this machine (`Scheduler`) or on a Slurm cluster (`SlurmExecutor`).

Both take the jobs of `semantic_aug.runner.experiments.plan_jobs` (which script, which arguments, which outputs mark a job
finished, which jobs it needs) and share their semantics: a finished job is skipped, a job runs only after the jobs
it needs succeeded, every job appends the same log (`run_logged`), a failed job is run again at most `max_retries`
times (the scripts resume from their own checkpoints), and a job whose prerequisite failed for good is `blocked`.
Statuses: done, skipped, failed, blocked.

* `Scheduler` runs `jobs_per_gpu` jobs at a time on each GPU it is given (`CUDA_VISIBLE_DEVICES` names the GPU;
  the scripts then use "their" GPU 0), or one at a time on the CPU.
* `SlurmExecutor` submits the jobs through submitit with sbatch, all at once: a job's prerequisites become Slurm
  dependencies (`afterok`), and jobs of one script with the same prerequisites go in one job array. The runner then
  only watches the queue (`squeue`) to resubmit what failed or was cancelled, with its dependent jobs; pre-emption
  and time-outs are requeued by submitit itself under the same job id (`max_num_timeout`).
"""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # the top-level scripts live here
POLL_SECONDS = 0.2  # how often idle local workers look for a job whose prerequisites finished
# Slurm job states after which a job holds no resources and will not run again (squeue shows them for MinJobAge).
SLURM_ENDED = {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
               "PREEMPTED", "TIMEOUT", "SPECIAL_EXIT"}


def job_environment(device: str | None = None) -> dict:
    """The environment of a job's script: this one, unbuffered output, this checkout first on the import path, and
    `CUDA_VISIBLE_DEVICES=device` when a device is given."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    return env


def run_logged(command: list[str], display: str, log: Path, where: str, env: dict, cwd: str | None = None,
               on_start=None) -> int | None:
    """Run a command with stdout and stderr appended to `log`, between a start line and an exit-code line.

    Args:
        command: the argument list.
        display: the command as the log's start line shows it.
        log: the log file (created with its folder).
        where: what runs it, for the start line ("GPU 0", "CPU", "Slurm job 12_3 on node7").
        env: the environment.
        cwd: the working folder (default: this one).
        on_start: called with the `subprocess.Popen` once it started (and with None once it ended).

    Returns:
        The exit code, or None when the command could not start.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "a") as handle:
        handle.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {where}: {display}\n")
        handle.flush()
        try:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        except OSError as error:
            handle.write(f"could not start: {error}\n")
            return None
        if on_start is not None:
            on_start(process)
        returncode = process.wait()
        if on_start is not None:
            on_start(None)
        handle.write(f"=== exit code {returncode} after {time.monotonic() - started:.0f} s\n")
    return returncode


# ----------------------------------------------------------------------------------------------------------
# this machine


def visible_gpus(requested: str | None = None) -> list[str]:
    """The GPU ids to hand out through CUDA_VISIBLE_DEVICES.

    Args:
        requested: comma-separated ids ("0,1"; "none" or "" for the CPU); None: every GPU torch sees (within an existing
            CUDA_VISIBLE_DEVICES).

    Returns:
        The ids as strings; empty on a machine without GPUs.
    """
    if requested is not None:
        return [gpu.strip() for gpu in requested.split(",") if gpu.strip() and gpu.strip().lower() not in ("none", "cpu")]
    import torch

    count = torch.cuda.device_count()
    visible = [gpu.strip() for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]
    return visible[:count] if visible else [str(index) for index in range(count)]


def worker_slots(gpus: list[str], jobs_per_gpu: int = 1) -> list[str | None]:
    """One worker per job that may run at once: `jobs_per_gpu` per GPU, or a single CPU worker without GPUs."""
    return [gpu for gpu in gpus for _ in range(jobs_per_gpu)] or [None]


class Scheduler:
    """Runs jobs on workers (one per entry of `devices`: a GPU id, repeated to pack several jobs on a GPU, or None
    for the CPU), each job after the jobs it needs.

    A failed job is run again up to `max_retries` times, then blocks the jobs that need it; the others go on.
    Statuses: done, skipped, failed, blocked.
    """

    def __init__(self, jobs: list, devices: list[str | None], max_retries: int = 0):
        self.jobs = {job.name: job for job in jobs}
        self.order = [job.name for job in jobs]
        self.devices = devices or [None]
        self.max_retries = max_retries
        self.status: dict[str, str] = {}
        self.running: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.progress = None  # the tqdm bar while `run` runs

    def next_job(self):
        """The first job not yet started whose prerequisites all succeeded, and whether any job is left to start.

        Jobs whose prerequisites failed are marked blocked on the way. (None, True): wait for running jobs.
        """
        with self.lock:
            pending = [name for name in self.order if name not in self.status]
            for name in pending:
                needs = [self.status.get(need) for need in self.jobs[name].needs]
                if any(state in ("failed", "blocked") for state in needs):
                    self.status[name] = "blocked"
                    logger.warning("blocked: %s (a job it needs failed)", name)
                    self.advance()
                elif all(state in ("done", "skipped") for state in needs):
                    self.status[name] = "running"
                    return self.jobs[name], True
            return None, any(name not in self.status for name in self.order)

    def advance(self) -> None:
        """Count one more job as finished on the progress bar."""
        if self.progress is not None:
            self.progress.update()

    def run_job(self, job, device: str | None) -> str:
        """Run one job (unless done) with its output appended to its log; returns done, skipped or failed."""
        if job.done():
            return "skipped"
        where = f"GPU {device}" if device is not None else "CPU"
        logger.info("start: %s on %s (log: %s)", job.name, where, job.log)
        started = time.monotonic()

        def track(process):
            with self.lock:
                if process is None:
                    self.running.pop(job.name, None)
                else:
                    self.running[job.name] = process

        returncode = run_logged(job.command(), job.display(), job.log, where, job_environment(device), on_start=track)
        if returncode != 0 or not job.produced():
            logger.error("failed: %s (exit code %s%s; log: %s)", job.name, returncode,
                         "" if returncode else ", outputs missing", job.log)
            return "failed"
        logger.info("done: %s in %.0f s", job.name, time.monotonic() - started)
        return "done"

    def worker(self, device: str | None) -> None:
        """Take jobs and run them on `device` until none is left (or Ctrl-C)."""
        while not self.stopping.is_set():
            job, jobs_left = self.next_job()
            if job is None:
                if not jobs_left:
                    return
                time.sleep(POLL_SECONDS)
                continue
            for attempt in range(1 + self.max_retries):
                if attempt:
                    logger.warning("retry %d of %d: %s", attempt, self.max_retries, job.name)
                try:
                    state = self.run_job(job, device)
                except Exception:  # a bug in one job must not hang the other workers
                    logger.exception("failed: %s", job.name)
                    state = "failed"
                if state != "failed" or self.stopping.is_set():
                    break
            with self.lock:
                self.status[job.name] = state
                self.advance()

    def run(self) -> dict[str, str]:
        """Run everything; returns job name -> status. Ctrl-C stops the running jobs and re-raises."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        with tqdm(total=len(self.jobs), desc="experiment jobs", unit="job") as progress, logging_redirect_tqdm():
            self.progress = progress
            threads = [threading.Thread(target=self.worker, args=(device,), daemon=True) for device in self.devices]
            for thread in threads:
                thread.start()
            try:
                while any(thread.is_alive() for thread in threads):
                    for thread in threads:
                        thread.join(timeout=POLL_SECONDS)
            except KeyboardInterrupt:
                self.stopping.set()
                with self.lock:
                    for process in self.running.values():
                        process.terminate()
                raise
            finally:
                self.progress = None
        return dict(self.status)


# ----------------------------------------------------------------------------------------------------------
# Slurm


@dataclass
class SlurmSettings:
    """The sbatch settings of every job (config key `slurm:`, flags `--slurm-*`).

    Args:
        partition, account, qos: sbatch's `--partition`, `--account`, `--qos` (None: the cluster's default).
        gpus_per_job: GPUs per job (`--gpus-per-node`; 0 for CPU jobs).
        cpus_per_job: CPU cores per job (`--cpus-per-task`).
        mem: memory per job (`--mem`, e.g. "32G"; None: the partition's default).
        time_min: time limit per job in minutes (`--time`); a job that reaches it is requeued by submitit and
            resumes from the scripts' checkpoints.
        array_parallelism: at most this many tasks of one job array run at once (`--array=0-N%P`).
        sbatch: further sbatch options, option name without `--` to value (e.g. {"constraint": "h100"}).
        poll_seconds: how often the runner asks `squeue` for the state of its jobs.
        folder: where submitit keeps its job files and Slurm's stdout/stderr (default: {results_dir}/slurm).
    """

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_job: int = 1
    cpus_per_job: int = 8
    mem: str | None = None
    time_min: int = 72 * 60  # DA-Fusion's job arrays asked for 72 h per task
    array_parallelism: int = 256
    sbatch: dict = field(default_factory=dict)
    poll_seconds: float = 30.0
    folder: str | None = None

    def submitit_parameters(self) -> dict:
        """The keyword arguments of `submitit.SlurmExecutor.update_parameters`."""
        parameters = {"partition": self.partition, "account": self.account, "qos": self.qos,
                      "gpus_per_node": self.gpus_per_job or None, "cpus_per_task": self.cpus_per_job,
                      "mem": self.mem, "time": self.time_min, "array_parallelism": self.array_parallelism,
                      # the tasks unpickle `SlurmTask` from this checkout
                      "setup": [f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"]}
        return {key: value for key, value in parameters.items() if value is not None}

    def sbatch_lines(self) -> list[str]:
        """The `#SBATCH` options every job gets (what `--dry-run` prints)."""
        options = {"partition": self.partition, "account": self.account, "qos": self.qos,
                   "gpus-per-node": self.gpus_per_job or None, "cpus-per-task": self.cpus_per_job, "mem": self.mem,
                   "time": self.time_min, **self.sbatch, "kill-on-invalid-dep": "yes"}
        return [f"#SBATCH --{key}={value}" for key, value in options.items() if value is not None]


@dataclass
class SlurmTask:
    """What a Slurm job runs: one script call of the grid, logged as a local run logs it.

    The callable that submitit pickles; `checkpoint` makes submitit requeue it (same job id) on pre-emption or
    time-out, and the script resumes from its own checkpoints.
    """

    command: list[str]
    display: str
    log: str
    cwd: str

    def __call__(self) -> int:
        job_id = os.environ.get("SLURM_ARRAY_JOB_ID")
        job_id = f"{job_id}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job_id else os.environ.get("SLURM_JOB_ID", "?")
        where = f"Slurm job {job_id} on {socket.gethostname()}"
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus:
            where += f", GPU {gpus}"
        returncode = run_logged(self.command, self.display, Path(self.log), where, job_environment(), cwd=self.cwd)
        if returncode != 0:
            raise RuntimeError(f"exit code {returncode}: {self.display} (log: {self.log})")
        return returncode

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def submission_groups(jobs: list, pending: set[str]) -> list[list[list]]:
    """The grid as Slurm submissions: per dependency level, the job arrays (lists of jobs).

    Jobs of one script whose pending prerequisites are the same jobs share an array (one sbatch, one dependency
    list); prerequisites that are already done are no dependency.

    Args:
        jobs: the plan, in order (a job's `needs` before it).
        pending: names of the jobs to submit.

    Returns:
        One list per level (level 0: no pending prerequisite), each a list of arrays.
    """
    level: dict[str, int] = {}
    levels: list[dict] = []
    for job in jobs:
        if job.name not in pending:
            continue
        needs = tuple(sorted(need for need in job.needs if need in pending))
        level[job.name] = 1 + max((level[need] for need in needs), default=-1)
        while len(levels) <= level[job.name]:
            levels.append({})
        levels[level[job.name]].setdefault((job.script, needs), []).append(job)
    return [list(groups.values()) for groups in levels]


class SlurmExecutor:
    """Submits the grid to Slurm through submitit and watches it to the end.

    Args:
        jobs: the plan (`plan_jobs`).
        settings: the sbatch settings.
        max_retries: resubmissions per job after a failure or cancellation (with the jobs that depend on it), and
            requeues after pre-emption or time-out (submitit's `max_num_timeout`).
        cwd: the folder the jobs run in (the plan's relative paths start there; default: this one).
    """

    def __init__(self, jobs: list, settings: SlurmSettings, max_retries: int = 1, cwd: str | None = None):
        self.jobs = {job.name: job for job in jobs}
        self.order = [job.name for job in jobs]
        self.settings = settings
        self.max_retries = max_retries
        self.cwd = str(Path(cwd or os.getcwd()).resolve())
        self.status: dict[str, str] = {}
        self.live: dict[str, object] = {}  # job name -> its submitit job while in Slurm's queue
        self.attempts: dict[str, int] = {}
        self.submissions = 0  # sbatch calls (one per array)
        self._executor = None

    def executor(self):
        if self._executor is None:
            import submitit

            folder = Path(self.settings.folder or "slurm").resolve()
            self._executor = submitit.SlurmExecutor(folder=folder / "%j", max_num_timeout=self.max_retries)
            self._executor.update_parameters(**self.settings.submitit_parameters())
        return self._executor

    def submit(self, names: list[str]) -> None:
        """Submit these jobs (arrays per `submission_groups`), each after its prerequisites that are in the queue."""
        names = set(names)
        for groups in submission_groups([self.jobs[name] for name in self.order], names):
            for group in groups:
                self._submit_array(group)

    def _submit_array(self, group: list) -> None:
        executor = self.executor()
        dependencies = sorted({self.live[need].job_id for job in group for need in job.needs if need in self.live})
        extra = {**self.settings.sbatch, "kill-on-invalid-dep": "yes"}
        if dependencies:
            extra["dependency"] = "afterok:" + ":".join(dependencies)
        executor.update_parameters(additional_parameters=extra, job_name=f"diagen-{Path(group[0].script).stem}")
        tasks = [SlurmTask(job.command(), job.display(), str(Path(job.log).resolve()), self.cwd) for job in group]
        with executor.batch():
            handles = [executor.submit(task) for task in tasks]
        self.submissions += 1
        for job, handle in zip(group, handles):
            self.live[job.name] = handle
            logger.info("submitted: %s as Slurm job %s%s", job.name, handle.job_id,
                        f" (after {', '.join(dependencies)})" if dependencies else "")

    def queue(self) -> set[str] | None:
        """Ids of this runner's jobs still queued or running (array tasks as `123_4`); None if squeue failed."""
        result = subprocess.run(["squeue", "--noheader", "--array", "--format=%i|%T", "--user", str(os.getuid())],
                                capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning("squeue failed (%s); asking again", result.stderr.strip())
            return None
        rows = (line.split("|", 1) for line in result.stdout.split())
        return {job_id for job_id, state in rows if state not in SLURM_ENDED}

    def succeeded(self, name: str, handle) -> bool:
        """Whether the job's Slurm task finished without error (submitit's result file) and left its outputs."""
        from submitit.core.utils import pickle_load

        result = handle.paths.result_pickle
        try:
            outcome = pickle_load(result)[0] if result.exists() else None
        except Exception:  # a truncated result file: the task was killed while writing it
            outcome = None
        return outcome == "success" and self.jobs[name].produced()

    def dependents(self, name: str) -> list[str]:
        """Every job that needs `name`, directly or through others (plan order)."""
        found = {name}
        for other in self.order:
            if any(need in found for need in self.jobs[other].needs):
                found.add(other)
        return [other for other in self.order if other in found and other != name]

    def ended(self, name: str) -> None:
        """A job left the queue: done, or resubmitted with its dependents, or failed with its dependents blocked."""
        handle = self.live.pop(name)
        job = self.jobs[name]
        if self.succeeded(name, handle):
            self.status[name] = "done"
            logger.info("done: %s (Slurm job %s)", name, handle.job_id)
            return
        if any(self.status.get(need) in ("failed", "blocked") for need in job.needs):
            self.status[name] = "blocked"
            return
        waiting = [other for other in self.dependents(name) if self.status.get(other) not in ("done", "skipped")]
        cancel = [self.live.pop(other).job_id for other in waiting if other in self.live]
        if cancel:
            subprocess.run(["scancel", *cancel], capture_output=True)
        if any(need in self.live for need in job.needs):  # cancelled by Slurm for a prerequisite's failure
            self.submit([name, *waiting])
            return
        attempt = self.attempts.get(name, 0)
        if attempt < self.max_retries:
            self.attempts[name] = attempt + 1
            logger.warning("failed: %s (Slurm job %s; log: %s): resubmission %d of %d%s", name, handle.job_id,
                           job.log, attempt + 1, self.max_retries,
                           f", with the {len(waiting)} job(s) that need it" if waiting else "")
            self.submit([name, *waiting])
            return
        logger.error("failed: %s (Slurm job %s, %d resubmission(s); log: %s; Slurm output: %s)", name, handle.job_id,
                     attempt, job.log, handle.paths.stdout)
        self.status[name] = "failed"
        for other in waiting:
            self.status[other] = "blocked"
            logger.warning("blocked: %s (a job it needs failed)", other)

    def run(self) -> dict[str, str]:
        """Submit the jobs that are not done, wait for the queue to empty; returns job name -> status.

        Ctrl-C cancels the runner's queued and running jobs and re-raises.
        """
        for name in self.order:
            if self.jobs[name].done():
                self.status[name] = "skipped"
        try:
            self.submit([name for name in self.order if name not in self.status])
            while self.live:
                time.sleep(self.settings.poll_seconds)
                queued = self.queue()
                if queued is None:
                    continue
                for name, handle in [(name, self.live[name]) for name in self.order if name in self.live]:
                    if self.live.get(name) is handle and handle.job_id not in queued:
                        self.ended(name)
        except KeyboardInterrupt:
            ids = [handle.job_id for handle in self.live.values()]
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True)
            raise
        return {name: self.status[name] for name in self.order}


def describe_submissions(jobs: list, pending: set[str]) -> str:
    """One line: how many sbatch calls, array tasks and dependency levels the pending jobs make."""
    levels = submission_groups(jobs, pending)
    arrays = [group for groups in levels for group in groups]
    largest = max((len(group) for group in arrays), default=0)
    return (f"{len(pending)} Slurm jobs in {len(arrays)} submissions (job arrays of 1 to {largest} tasks), "
            f"{len(levels)} level(s) of dependencies")

