"""A real one-node SLURM cluster (munged, slurmctld, slurmd started by the fixture; docs/cluster.md):
examples/tiny/tiny.sbatch runs 2 CPU processes under srun + torchrun (and in direct srun mode); a
running job is preempted the way `--signal=B:USR1@120` does it, writes a checkpoint, exits with 115,
and the job submitted again resumes from that step; an automatic requeue resumes by itself."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mgsr_megatron.training.trainer import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "tiny" / "tiny.sbatch"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def _run(cmd, timeout=60, check=True, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check, **kw)


def _wait(predicate, timeout, what):
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def _install_if_missing() -> str | None:
    """None when the daemons are available, else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurmctld/slurmd/munge are not installed and apt-get as root is not available"
    result = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if result.returncode:
        return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip().splitlines()[-1:]}"
    return None


class Cluster:
    """munged + slurmctld + slurmd with all state under `root`; stop() kills exactly what start() began."""

    def __init__(self, root: Path):
        self.root = root
        self.pids: list[tuple[str, int]] = []
        self.host = socket.gethostname().split(".")[0]

    def _start_munge(self) -> None:
        if _run(["munge", "-n"], check=False).returncode == 0:
            return  # a munged is already serving (not ours: leave it alone)
        run_dir = Path("/run/munge")
        run_dir.mkdir(exist_ok=True)
        shutil.chown(run_dir, "munge", "munge")
        run_dir.chmod(0o755)
        key = Path("/etc/munge/munge.key")
        if not key.is_file():
            key.write_bytes(os.urandom(128))
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        _wait(lambda: _run(["munge", "-n"], check=False).returncode == 0, 20, "munged")
        pid_file = Path("/run/munge/munged.pid")
        if pid_file.is_file():
            self.pids.append(("munged", int(pid_file.read_text())))

    def _write_conf(self) -> Path:
        node_line = _run(["slurmd", "-C"]).stdout.splitlines()[0]
        node_line = re.sub(r"RealMemory=\d+", "RealMemory=1000", node_line)
        r = self.root
        for sub in ("state", "spool"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        conf = r / "slurm.conf"
        conf.write_text("\n".join([
            "ClusterName=mgsrtest", f"SlurmctldHost={self.host}", "AuthType=auth/munge",
            "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            "SlurmctldPort=29850", "SlurmdPort=29851", "MailProg=/bin/true",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "ReturnToService=2", "EnforcePartLimits=ALL", "KillWait=30",
            # a requeued job waits for its credential to expire (slurm.conf(5): cred_expire, default 120 s)
            # before it may start again: 30 s is long enough for this node's launches and shortens the
            # preemption test by 90 s
            "AuthInfo=cred_expire=30",
            "MinJobAge=600", node_line,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        return conf

    def start(self) -> None:
        self._start_munge()
        if _run(["getent", "hosts", self.host], check=False).returncode:
            with open("/etc/hosts", "a") as hosts:
                hosts.write(f"127.0.0.1 {self.host}\n")
        conf = self._write_conf()
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        _run(["slurmctld", "-c", "-f", str(conf)], env=self.env)
        self.pids.append(("slurmctld", int(_wait(lambda: self._pid("slurmctld"), 20, "slurmctld pid file"))))
        _run(["slurmd", "-f", str(conf)], env=self.env)
        self.pids.append(("slurmd", int(_wait(lambda: self._pid("slurmd"), 20, "slurmd pid file"))))
        _wait(lambda: self.cmd(["sinfo", "-h", "-o", "%t"], check=False).stdout.strip() == "idle", 60,
              f"the node to be idle (logs in {self.root})")

    def _pid(self, name: str) -> str | None:
        path = self.root / f"{name}.pid"
        return path.read_text().strip() or None if path.is_file() else None

    def stop(self) -> None:
        if getattr(self, "env", None) and self.pids:  # end every job first: slurmstepd outlives slurmd
            try:
                jobs = self.cmd(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                for job_id in jobs:
                    self.cmd(["scancel", "--full", "--signal=KILL", job_id], check=False)
                    self.cmd(["scancel", job_id], check=False)
                _wait(lambda: not self.cmd(["squeue", "-h", "-t", "R,CG", "-o", "%i"], check=False).stdout.strip(),
                      60, "the test jobs to end")
            except (subprocess.SubprocessError, AssertionError):
                pass
        for _name, pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def cmd(self, args, timeout=60, check=True):
        return _run(args, timeout=timeout, check=check, env=self.env)

    def sbatch(self, workdir: Path, *args: str, env: dict | None = None) -> int:
        submit_env = {**self.env, **(env or {}), "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}",
                      "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
        out = _run(["sbatch", "--parsable", f"--chdir={workdir}", *args], env=submit_env).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        text = self.cmd(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait_done(self, job_id: int, timeout: float) -> dict:
        return _wait(lambda: (lambda j: j if j["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                  "NODE_FAIL", "OUT_OF_MEMORY") else None)(
            self.job(job_id)), timeout, f"job {job_id} to finish")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (not reaped: the daemons are not our children) counts as gone
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split(")")[-1].split()[0] != "Z"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if sys.platform != "linux":
        pytest.skip("the SLURM test cluster needs Linux")
    why = _install_if_missing()
    if why:
        pytest.skip(why)
    if _run(["pgrep", "-x", "slurmctld"], check=False).returncode == 0:
        pytest.skip("a slurmctld is already running on this machine: not starting a second cluster")
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except (subprocess.SubprocessError, AssertionError, OSError) as exc:
        c.stop()
        pytest.skip(f"could not start a one-node SLURM cluster here: {exc}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A repository-like directory (examples/ linked) with tiny data, a trained-looking teacher and a
    config: examples/tiny/config.yaml with only paths and model sizes replaced."""
    root = tmp_path_factory.mktemp("slurm_work")
    (root / "examples").symlink_to(ROOT / "examples")
    prepare = ("import sys; from pathlib import Path; "
               "from mgsr_megatron.training.smoke import build_files, ensure_teacher, base_config; "
               "root = Path(sys.argv[1]); build_files(root); ensure_teacher(root)")
    _run([sys.executable, "-c", prepare, str(root)], timeout=300, cwd=ROOT,
         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    cfg = yaml.safe_load((ROOT / "examples" / "tiny" / "config.yaml").read_text())
    model = dict(arch="llama", num_layers=2, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                 vocab_size=256, make_vocab_size_divisible_by=64, max_position_embeddings=48)
    cfg["teacher"] = {**model, "hidden_size": 64, "load": str(root / "teacher")}
    cfg["student"] = {**model, "hidden_size": 32}
    cfg["data"].update(train_path=str(root / "data.train"), tokenizer=str(root / "tok.model"))
    cfg["schedule"].update(seq_length=40, micro_batch_size=2, global_batch_size=4, lr_warmup_iters=2)
    cfg["mgsr"].update(max_new_tokens=12, k_band=32, k_feat=16)
    (root / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return root


def _train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["kind"] == "train"]


def _submit(cluster, workdir, run: str, *overrides: str, env: dict | None = None, sbatch_args=()):
    run_dir = workdir / run
    return cluster.sbatch(workdir, f"--output={run_dir}.log", *sbatch_args, str(SCRIPT),
                          f"--logging.output_dir={run_dir}", "--logging.log_interval=1",
                          f"--checkpoint.save={run_dir}/checkpoints",
                          *overrides, env={"CONFIG": str(workdir / "tiny.yaml"), **(env or {})}), run_dir


def test_sbatch_tiny_example_torchrun(cluster, workdir):
    job_id, run_dir = _submit(cluster, workdir, "plain", "--schedule.train_iters=3")
    job = cluster.wait_done(job_id, 420)
    log = Path(f"{run_dir}.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "torchrun mode, 1 node(s) x 2 process(es)" in log
    assert _train_steps(run_dir) == [1, 2, 3]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000003"


def test_srun_direct_mode(cluster, workdir):
    job_id, run_dir = _submit(cluster, workdir, "direct", "--schedule.train_iters=2", env={"MGSR_LAUNCH": "direct"},
                              sbatch_args=("--ntasks-per-node=2", "--cpus-per-task=1"))
    job = cluster.wait_done(job_id, 420)
    log = Path(f"{run_dir}.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert _train_steps(run_dir) == [1, 2]


def test_srun_direct_mode_deepspeed_engine(cluster, workdir):
    """The DeepSpeed engine (Hugging Face models under ZeRO-2) in direct mode: srun starts the 2 ranks, which
    find each other from SLURM_PROCID / SLURM_NTASKS, train and write DeepSpeed's checkpoint of 2 ranks."""
    from tests.dist.deepspeed_checks import base_config, build_setup

    build_setup(workdir)  # the tiny HF student and teacher beside the existing tokenizer and data
    cfg = base_config(workdir, "ds", zero_stage=2)
    config = workdir / "ds.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    job_id, run_dir = _submit(cluster, workdir, "ds_direct", "--schedule.train_iters=3",
                              env={"MGSR_LAUNCH": "direct", "CONFIG": str(config)},
                              sbatch_args=("--ntasks-per-node=2", "--cpus-per-task=1"))
    job = cluster.wait_done(job_id, 420)
    log = Path(f"{run_dir}.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert _train_steps(run_dir) == [1, 2, 3]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["engine"] == "deepspeed" and summary["exit_code"] == 0, summary
    checkpoint = run_dir / "checkpoints" / "iter_0000003"
    assert json.loads((checkpoint / "engine.json").read_text())["dp"] == 2
    assert len(list((checkpoint / "engine").rglob("*optim_states.pt"))) == 2  # ZeRO-2: one shard per rank


def test_preempt_then_resume(cluster, workdir):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends): checkpoint, exit 115; the same job
    submitted again continues from that step."""
    job_id, run_dir = _submit(cluster, workdir, "preempt", "--schedule.train_iters=100000",
                              "--checkpoint.save_interval=0", env={"MGSR_REQUEUE": "0"})
    _wait(lambda: len(_train_steps(run_dir)) >= 2, 420, "2 training steps under SLURM")
    cluster.cmd(["scancel", "--batch", "--signal=USR1", str(job_id)])
    job = cluster.wait_done(job_id, 180)
    log = Path(f"{run_dir}.log").read_text()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == f"{EXIT_PREEMPTED}:0", (job, log[-3000:])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped_at = max(_train_steps(run_dir))
    assert latest == f"iter_{stopped_at:07d}", (latest, stopped_at)

    again, _ = _submit(cluster, workdir, "preempt", f"--schedule.train_iters={stopped_at + 2}",
                       "--checkpoint.save_interval=0")
    job = cluster.wait_done(again, 420)
    log = Path(f"{run_dir}.log").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert f"[resume step {stopped_at}]" in log
    assert _train_steps(run_dir)[-2:] == [stopped_at + 1, stopped_at + 2]


def test_preemption_requeues_and_resumes_by_itself(cluster, workdir):
    """Default behaviour: after USR1 the job requeues itself and the next run (same job id) resumes from
    the preemption checkpoint and finishes."""
    job_id, run_dir = _submit(cluster, workdir, "requeue", "--schedule.train_iters=20", "--checkpoint.save_interval=0")
    _wait(lambda: len(_train_steps(run_dir)) >= 2, 420, "2 training steps under SLURM")
    cluster.cmd(["scancel", "--batch", "--signal=USR1", str(job_id)])
    _wait(lambda: int(cluster.job(job_id).get("Restarts", 0)) >= 1, 180, "the job to be requeued")
    stopped_at = (run_dir / "checkpoints" / "latest").read_text().strip()
    log_file = Path(f"{run_dir}.log")
    # Right after the requeue the job can still show the first run's terminal state (FAILED, 115):
    # only a terminal state reached after the second run has resumed counts.
    terminal = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
    seen = {}

    def resumed_and_finished():
        # SLURM holds a requeued job until its credential expires (Reason=BeginTime; cred_expire, 30 s in
        # _write_conf). Not skipped: with `scontrol update StartTime=now` the job restarted before the
        # first run's credential was released, and slurmctld killed it at once ("Job credential revoked",
        # exit 1, no resume).
        job = seen["job"] = cluster.job(job_id)
        return job if job["JobState"] in terminal and "[resume step" in log_file.read_text() else None

    try:
        job = _wait(resumed_and_finished, 420, "the requeued run to resume and finish")
    except AssertionError as error:
        state = {k: seen.get("job", {}).get(k) for k in ("JobState", "Reason", "Restarts", "StartTime", "ExitCode")}
        raise AssertionError(f"{error}; job {state}; log tail: {log_file.read_text()[-1500:]}") from None
    log = log_file.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "preempted (srun exit" in log and f"requeueing job {job_id}" in log
    assert f"[resume step {int(stopped_at.split('_')[1])}]" in log, (stopped_at, log[-3000:])
    assert _train_steps(run_dir)[-1] == 20
