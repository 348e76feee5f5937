"""A single-node Slurm cluster in a temporary folder, for `test_slurm.py`: munged, slurmctld and slurmd from Debian's
`slurm-wlm` and `munge` packages, with a minimal slurm.conf (one node of 2 CPUs, one partition, no accounting
database, no cgroups). Its daemons run as the current user (root in CI) on free local ports and are stopped at the end.

    with SlurmCluster(tmp_path / "slurm") as cluster:
        subprocess.run(["sbatch", ...], env=cluster.env)   # SLURM_CONF points the clients at it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "srun")
START_SECONDS = 60  # the longest wait for the node to come up
STOP_SECONDS = 20  # the longest wait for a daemon to exit after SIGTERM
NODE_CPUS = 2  # this box has 2 cores, shared: jobs ask for 1


def missing_reason() -> str | None:
    """Why no cluster can start here (None when it can)."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test's Slurm daemons run as root (CI runs as root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SlurmCluster:
    """Start the cluster on `__enter__`, stop every daemon it started on `__exit__`.

    Args:
        folder: an empty temporary folder for the configuration, state, logs and sockets.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        # slurmd and munged make Unix sockets under these, and a socket path holds at most 108 bytes: pytest's
        # temporary folders (with xdist's `popen-gwN/`) are too deep for them, so they get a short folder of their own
        self.sockets = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.processes: list[tuple[str, Path]] = []  # (daemon, pid file)
        self.env = dict(os.environ, SLURM_CONF=str(self.folder / "slurm.conf"))

    def __enter__(self) -> "SlurmCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        folder = self.folder
        (folder / "state").mkdir(parents=True, exist_ok=True)
        for sub in ("spool", "munge"):
            (self.sockets / sub).mkdir(parents=True, exist_ok=True)
        (self.sockets / "munge").chmod(0o700)
        key = self.sockets / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.sockets / "munge" / "munge.socket"
        self._daemon("munged", self.sockets / "munge" / "munged.pid",
                     [_binary("munged"), "--force", f"--key-file={key}", f"--socket={socket_path}",
                      f"--pid-file={self.sockets / 'munge' / 'munged.pid'}",
                      f"--log-file={self.sockets / 'munge' / 'munged.log'}",
                      f"--seed-file={self.sockets / 'munge' / 'munged.seed'}"])
        host = "localhost"
        (folder / "slurm.conf").write_text("\n".join([
            "ClusterName=diagen-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"SlurmUser={os.environ.get('USER', 'root') if os.geteuid() else 'root'}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={socket_path}",
            f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={self.sockets / 'spool'}",
            f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}",
            f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=2",  # pending jobs are looked at every 2 s, not every minute
            "MinJobAge=600",  # finished jobs stay visible to squeue/scontrol for 10 minutes
            "KillWait=5",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        self._daemon("slurmctld", folder / "slurmctld.pid", [_binary("slurmctld"), "-i"])
        self._daemon("slurmd", folder / "slurmd.pid", [_binary("slurmd"), "-N", host])
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=self.env, capture_output=True,
                                   text=True).stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(1)
        raise RuntimeError(f"the test Slurm node did not come up in {START_SECONDS} s (sinfo: {state!r}); "
                           f"see {folder}/slurmctld.log and slurmd.log")

    def _daemon(self, name: str, pid_file: Path, command: list[str]) -> None:
        """Start a daemon (it forks into the background and writes its pid file)."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=START_SECONDS)
        if result.returncode != 0:
            raise RuntimeError(f"{name} did not start ({result.returncode}): {result.stderr.strip()}")
        self.processes.append((name, pid_file))
        deadline = time.monotonic() + START_SECONDS
        while not pid_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM each daemon this cluster started (newest first) and wait for it to exit; SIGKILL after
        `STOP_SECONDS`."""
        for name, pid_file in reversed(self.processes):
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + STOP_SECONDS
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.processes.clear()
        shutil.rmtree(self.sockets, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie child counts as gone (the daemons are not our children, so this is rare)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
