"""A single-node SLURM cluster in one folder, to try and test `benchmarks/grid.py run --executor slurm` on one
machine. Needs root and Debian's packages: apt-get install -y slurm-wlm munge

    python tools/local_slurm.py start /tmp/slurm     # prints the SLURM_CONF line to export
    python tools/local_slurm.py stop /tmp/slurm      # cancels its jobs, stops the daemons, removes the folder

munged, slurmctld and slurmd run as root with a fresh munge key, their sockets, state, pid files and logs in
the folder, on free ports. One node: this machine's CPUs and memory, one partition `debug`. No cgroups
(proctrack/linuxproc, task/none) and no accounting database: squeue is the only record of jobs, finished ones
kept 300 s (MinJobAge). A requeued job may start again 5 s later (cred_expire; SLURM's default is 120 s) and the
scheduler looks for jobs to start every 5 s (SLURM: 60 s, backfill 30 s); a job that ignores SIGTERM is killed
30 s after it (KillWait).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
INSTALL = "apt-get install -y slurm-wlm munge"
DAEMONS = ("slurmd", "slurmctld", "munged")  # stopped in this order


def missing_binaries() -> List[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path) -> str:
    host = socket.gethostname().split(".")[0]
    memory_mb = int(next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))) // 1024
    return f"""ClusterName=local
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket,cred_expire=5
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=5,bf_interval=5
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
MinJobAge=300
KillWait=30
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: Path) -> Dict[str, str]:
    """Start the cluster in `folder` (created); returns the environment its clients need (SLURM_CONF)."""
    folder = Path(folder).resolve()
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    commands = [["munged", "--force", f"--key-file={key}", f"--socket={folder}/munge.socket",
                 f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                 f"--seed-file={folder}/munge.seed"],
                ["slurmctld", "-f", str(conf)], ["slurmd", "-f", str(conf)]]
    for command in commands:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=60)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
        if states and all(state in ("idle", "mixed", "allocated") for state in states):
            return {"SLURM_CONF": str(conf)}
        time.sleep(0.5)
    logs = "".join((folder / f"{name}.log").read_text()[-2000:] for name in ("slurmctld", "slurmd")
                   if (folder / f"{name}.log").exists())
    stop(folder)
    raise RuntimeError(f"the SLURM node did not come up in 60 s:\n{logs}")


def stop(folder: Path) -> None:
    """Cancel the cluster's jobs, stop its daemons and remove the folder."""
    folder = Path(folder).resolve()
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    if (folder / "slurmctld.pid").exists():
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True, timeout=60)
        deadline = time.monotonic() + 45  # jobs that trap SIGTERM get KillWait seconds
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h"], env=env, capture_output=True, text=True, timeout=60).stdout.strip():
            time.sleep(0.5)
    for name in DAEMONS:
        pid_file = folder / f"{name}.pid"
        try:
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError):
            continue
        for _ in range(100):  # until it has exited
            try:
                os.kill(pid, 0)
            except OSError:
                break
            time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit(__doc__)
    if sys.argv[1] == "start":
        if missing_binaries():
            sys.exit(f"error: {', '.join(missing_binaries())} not found; install them: {INSTALL}")
        print(f"export SLURM_CONF={start(Path(sys.argv[2]))['SLURM_CONF']}")
    else:
        stop(Path(sys.argv[2]))
