"""A real single-node Slurm cluster on 127.0.0.1 for tests (Debian: slurmctld slurmd slurm-client munge).

    with SlurmCluster() as cluster:           # installs the packages if missing (as root), starts
        job = cluster.sbatch("slurm/train.sh", env=..., args=["--ntasks-per-node=2"])
        info = cluster.wait(job, timeout=120)  # polls `scontrol show job`, not `sbatch --wait`
        print(cluster.logs())                  # daemon logs, for failure messages

All state (config, munge key and socket, spool, state save, logs, pid files) lives in one
temporary directory; SLURM_CONF points at it, so nothing in /etc is touched and two clusters
can run side by side (free ports). munged runs as user munge with its own socket; slurmctld
and slurmd run as root and are stopped through their pid files.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from disent.host import free_ports

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, packages not installable): tests skip with this reason."""




def ensure_packages() -> None:
    missing = [p for p in PACKAGES if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
    if not missing and shutil.which("slurmctld"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SlurmUnavailable(f"Debian packages {' '.join(missing)} are missing and cannot be installed "
                               f"here (needs apt-get and root); `make system-deps` installs them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True, text=True, env=env)
    if result.returncode:  # stale package lists: update once, then retry
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env)
        result = subprocess.run(["apt-get", "install", "-y", "-qq", *missing], capture_output=True, text=True,
                                env=env)
    if result.returncode:
        raise SlurmUnavailable(f"apt-get install {' '.join(missing)} failed:\n{result.stderr[-2000:]}")


class SlurmCluster:
    def __init__(self, cpus: int | None = None, kill_wait: int = 30, cred_expire: int = 10,
                 base_dir: str | None = None, bind_cores: bool = False):
        """bind_cores: task/affinity binds each task to the cores of its step allocation (TaskPluginParam=Cores),
        as production clusters do; by default task/none (no binding: every task sees every CPU)."""
        self.cpus = cpus or os.cpu_count() or 1
        self.bind_cores = bind_cores
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        self.base_dir = base_dir
        self.root: Path | None = None
        self.node = socket.gethostname().split(".")[0]
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd needs root")
        ensure_packages()
        self.root = Path(tempfile.mkdtemp(prefix="disent-slurm-", dir=self.base_dir))
        try:
            self._write_config()
            self._start_munge()
            self._run(["slurmctld"], what="slurmctld")
            self._run(["slurmd", "-N", self.node], what="slurmd")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons by their pid files (SIGTERM, SIGKILL after 15 s); the state dir stays for reading."""
        if self.root is None:
            return
        pids = []
        for pid_file in (self.root / "run" / "slurmd.pid", self.root / "run" / "slurmctld.pid",
                         self.root / "munge" / "munged.pid"):
            try:
                pid = int(pid_file.read_text().strip())
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (OSError, ValueError):  # no pid file, or the daemon is gone
                continue
        deadline = time.monotonic() + 15
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def cleanup(self) -> None:
        self.stop()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    # ------------------------------------------------------------------ configuration

    def _write_config(self) -> None:
        root = self.root
        assert root is not None
        for sub in ("etc", "run", "log", "state", "spool", f"spool/{self.node}", "cgroup", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory it cannot trust: every directory on the path 755.
        os.chmod(root, 0o755)
        for sub in ("etc", "run", "log", "state", "spool", "cgroup"):
            os.chmod(root / sub, 0o755)
        self.ctld_port, self.slurmd_port = free_ports(2)
        self.socket = root / "munge" / "munge.socket.2"
        task_plugin = "TaskPlugin=task/affinity\nTaskPluginParam=Cores" if self.bind_cores else "TaskPlugin=task/none"
        conf = f"""\
# Generated by tests/support/slurm_cluster.py: a one-node test cluster on 127.0.0.1.
ClusterName=disenttest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={self.socket},cred_expire={self.cred_expire}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
{task_plugin}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/builtin
# Test all pending jobs every 2 s (default 60): a requeued job becomes eligible on a timer, not an event.
SchedulerParameters=sched_interval=2
JobRequeue=1
KillWait={self.kill_wait}
MinJobAge=600
InactiveLimit=0
Waittime=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        (root / "etc" / "slurm.conf").write_text(conf)
        # slurmd 22.05 loads a cgroup plugin whatever the other plugins say: point it at an empty dir.
        (root / "etc" / "cgroup.conf").write_text(
            f"CgroupPlugin=cgroup/v1\nCgroupMountpoint={root}/cgroup\nCgroupAutomount=no\n"
        )
        self.env = {"SLURM_CONF": str(root / "etc" / "slurm.conf")}

    def _start_munge(self) -> None:
        root = self.root
        assert root is not None
        munge = pwd.getpwnam("munge")
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        for path in (root / "munge", key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        os.chmod(root / "munge", 0o755)
        pid_file = root / "munge" / "munged.pid"  # in munge's own dir: it replaces the file as user munge
        cmd = ["runuser", "-u", "munge", "--", "munged", f"--socket={self.socket}", f"--key-file={key}",
               f"--pid-file={pid_file}", f"--log-file={root / 'munge' / 'munged.log'}",
               f"--seed-file={root / 'munge' / 'munged.seed'}"]
        self._run(cmd, what="munged")
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.socket}\n{self.logs()}")
            time.sleep(0.05)

    def _run(self, cmd: list[str], what: str) -> None:
        result = subprocess.run(cmd, env=self.command_env(), capture_output=True, text=True, timeout=60)
        if result.returncode:
            raise RuntimeError(f"{what} failed to start (exit {result.returncode}): {result.stderr}\n{self.logs()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = self.scontrol("show", "node", self.node, check=False)
            m = re.search(r"State=(\S+)", out)
            state = m.group(1) if m else out.strip()
            if state.startswith("IDLE"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {self.node} is not idle after {timeout}s (state {state!r})\n{self.logs()}")

    # ------------------------------------------------------------------ client side

    def command_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env.update(self.env)
        env.update(extra or {})
        return env

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], env=self.command_env(), capture_output=True, text=True,
                                timeout=30)
        if check and result.returncode:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {result.stderr}")
        return result.stdout + (result.stderr if not check else "")

    def sbatch(self, script: str | os.PathLike, env: dict[str, str] | None = None, args: list[str] = (),
               cwd: str | os.PathLike | None = None) -> str:
        """Submit; returns the job id. `env` is added to the submitting environment (sbatch exports it)."""
        result = subprocess.run(["sbatch", "--parsable", *args, str(script)], env=self.command_env(env),
                                capture_output=True, text=True, cwd=cwd, timeout=30)
        if result.returncode:
            raise RuntimeError(f"sbatch failed (exit {result.returncode}): {result.stderr}\n{self.logs()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        out = self.scontrol("show", "job", "--oneliner", job_id, check=False)
        return dict(re.findall(r"(\w[\w/:]*)=(\S*)", out))

    def wait(self, job_id: str, timeout: float, until: set[str] | None = None, poll: float = 0.5) -> dict[str, str]:
        """Poll until the job reaches a state in `until` (default: any terminal state)."""
        until = until or TERMINAL
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {sorted(until)} after {timeout}s: "
                           f"{info.get('JobState')} {info.get('Reason')}\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        if self.root is None:
            return ""
        parts = []
        for path in (self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log",
                     self.root / "munge" / "munged.log"):
            try:
                lines = path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                continue
            parts.append(f"--- {path.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)
