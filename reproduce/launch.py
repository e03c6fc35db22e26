"""Run a table's steps (reproduce.plan): on this machine in dependency order, or as SLURM batch jobs.

    states(steps, out, queue) -> {step: State}    done / running / queued / failed / blocked / waiting / ready
    run_local(steps, out, jobs, gpus)             --jobs at a time; a failed step stops its dependents
    submit_slurm(steps, out, resources, table)    one sbatch per step through slurm/*.sbatch, afterok chains

A step's state is read from its run directory (plan.Step.done), from the queue (squeue) and from its
log (OUT/logs/STEP.log: the last line of a failed step). The same command again runs or submits only
what is neither finished nor queued nor running; a step that stopped part-way continues from its run
directory (every command carries run.resume=auto).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from reproduce.plan import ROOT, Step, order

ACTIVE = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING")


@dataclasses.dataclass
class State:
    state: str          # done | running | queued | failed | blocked | waiting | ready
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    extra: tuple[str, ...] = ()


def log_path(out: Path, step: Step) -> Path:
    return out / "logs" / f"{step.name}.log"


def last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


# ============================================================================ state


def states(all_steps: list[Step], out: Path, queue: dict[str, tuple[str, str]] | None = None,
           live: dict[str, str] | None = None) -> dict[str, State]:
    """Each step's state. queue: SLURM's {step: (job id, state)}; live: this process's {step: state}."""
    by_name = {s.name: s for s in all_steps}
    result: dict[str, State] = {}
    for s in order(all_steps):
        bad = [d for d in s.deps if result[d].state in ("failed", "blocked")]
        if live and s.name in live:
            result[s.name] = State(live[s.name], _log_hint(out, s) if live[s.name] == "failed" else "")
        elif s.done(by_name):
            result[s.name] = State("done")
        elif queue and s.name in queue:
            job, slurm_state = queue[s.name]
            result[s.name] = State("running" if slurm_state == "RUNNING" else "queued", f"job {job} {slurm_state}")
        elif _running_here(out, s):
            result[s.name] = State("running", "on this machine")
        elif bad:
            result[s.name] = State("blocked", f"{bad[0]} {result[bad[0]].state}: not started")
        elif s.kind == "report" and all(p.is_file() for p in s.outputs):
            result[s.name] = State("ready", "out of date: a run changed since")  # the only step that goes stale
        elif log_path(out, s).is_file():
            result[s.name] = State("failed", _log_hint(out, s))
        elif all(result[d].state == "done" for d in s.deps):
            result[s.name] = State("ready")
        else:
            wait = [d for d in s.deps if result[d].state != "done"]
            result[s.name] = State("waiting", "after " + ", ".join(wait[:2]) + (f" and {len(wait) - 2} more"
                                                                               if len(wait) > 2 else ""))
    return result


def _log_hint(out: Path, step: Step) -> str:
    path = log_path(out, step)
    return f"{last_line(path) or '(empty log)'}  [{path}]"


def _running_here(out: Path, step: Step) -> bool:
    pid_file = log_path(out, step).with_suffix(".pid")
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def table_text(all_steps: list[Step], st: dict[str, State]) -> str:
    width = max(len(s.name) for s in all_steps)
    lines = [f"{'step':{width}s}  {'state':8s}  detail"]
    for s in order(all_steps):
        lines.append(f"{s.name:{width}s}  {st[s.name].state:8s}  {st[s.name].detail}".rstrip())
    counts = collections.Counter(v.state for v in st.values())
    lines.append(", ".join(f"{n} {k}" for k, n in counts.items()))
    return "\n".join(lines)


# ============================================================================ local


def local_command(step: Step, gpus: int) -> list[str]:
    if step.distributed and gpus > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
                *step.command]
    return [sys.executable, *step.command]


def run_local(all_steps: list[Step], out: Path, jobs: int = 1, gpus: int = 0, dry_run: bool = False) -> int:
    """Run every step that is not finished, `jobs` at a time, each after those it needs; 0 when all are done."""
    by_name = {s.name: s for s in all_steps}
    todo = [s for s in order(all_steps) if not s.done(by_name)]
    if dry_run:
        for s in todo:
            print(f"{shlex.join(local_command(s, gpus))}  # {s.name}")
        return 0
    live: dict[str, str] = {}
    running: dict[str, tuple[subprocess.Popen, Path]] = {}
    while True:
        current = states(all_steps, out, live=live)
        for s in todo:
            if len(running) >= jobs:
                break
            if s.name not in live and current[s.name].state in ("ready", "failed") and \
                    all(current[d].state == "done" for d in s.deps):
                running[s.name] = _start(s, out, gpus)
                live[s.name] = "running"
                print(f"started {s.name}: {shlex.join(s.command)}", flush=True)
        if not running:
            break
        time.sleep(0.2)
        for name, (proc, pid_file) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            pid_file.unlink(missing_ok=True)
            ok = proc.returncode == 0 and by_name[name].done(by_name)
            live[name] = "done" if ok else "failed"
            print(f"{'finished' if ok else 'FAILED'} {name}"
                  + ("" if ok else f" (exit {proc.returncode}): {last_line(log_path(out, by_name[name]))}"), flush=True)
    final = states(all_steps, out, live={k: v for k, v in live.items() if v != "running"})
    print(table_text(all_steps, final))
    return 0 if all(v.state == "done" for v in final.values()) else 1


def _start(step: Step, out: Path, gpus: int) -> tuple[subprocess.Popen, Path]:
    log = log_path(out, step)
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = local_command(step, gpus)
    with open(log, "a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    pid_file = log.with_suffix(".pid")
    pid_file.write_text(str(proc.pid))
    return proc, pid_file


# ============================================================================ SLURM


def squeue(out: Path) -> dict[str, tuple[str, str]]:
    """{step: (job id, state)} of this output root's jobs still in the queue (job comment = the output root)."""
    proc = subprocess.run(["squeue", "--noheader", "--format=%i|%j|%T|%k"], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"squeue failed: {proc.stderr.strip()}")
    found = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|", 3)
        if len(parts) == 4 and parts[3] == str(out) and parts[2] in ACTIVE and "." in parts[1]:
            found[parts[1].split(".", 1)[1]] = (parts[0], parts[2])
    return found


def sbatch_command(step: Step, out: Path, res: Resources, table: str, after: list[str]) -> list[str]:
    """One sbatch of the project's template: 1node.sbatch, or multinode.sbatch for a step on N nodes."""
    wide = step.distributed and res.nodes > 1
    template = "slurm/multinode.sbatch" if wide else "slurm/1node.sbatch"
    tasks = max(res.gpus_per_node, 1) if step.distributed else 1
    gpus = step.gpus(res.gpus_per_node)
    cmd = ["sbatch", "--parsable", f"--job-name={table}.{step.name}", f"--comment={out}",
           f"--output={log_path(out, step)}", "--open-mode=append", f"--nodes={res.nodes if wide else 1}",
           f"--ntasks-per-node={tasks}", f"--gpus-per-node={gpus}"]
    cmd += [f"--cpus-per-task={res.cpus_per_task}"] if res.cpus_per_task else []
    cmd += [f"--time={res.time}"] if res.time else []
    cmd += [f"--partition={res.partition}"] if res.partition else []
    cmd += [f"--account={res.account}"] if res.account else []
    if after:
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    return [*cmd, *res.extra, template, *step.command]


def submit_slurm(all_steps: list[Step], out: Path, res: Resources, table: str, dry_run: bool = False) -> int:
    """Submit every step that is neither finished nor in the queue, chained by afterok on the job ids of
    the steps it needs; print the status table."""
    by_name = {s.name: s for s in all_steps}
    queue = squeue(out) if shutil.which("squeue") else {}
    ids = {name: job for name, (job, _) in queue.items()}
    env = {**os.environ, "PYTHON": sys.executable}  # slurm/launch.sh runs "$PYTHON SCRIPT ..." through srun
    if dry_run:
        print(f"# each job runs slurm/launch.sh from {ROOT} with PYTHON={sys.executable}")
    for s in order(all_steps):
        if s.done(by_name) or s.name in ids:
            continue
        cmd = sbatch_command(s, out, res, table, [ids[d] for d in s.deps if d in ids])
        if dry_run:  # a bash script: each job id in a variable, the dependencies expanded from them
            var = "JOB_" + "".join(c if c.isalnum() else "_" for c in s.name).upper()
            print(f"{var}=$(" + " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in cmd) + ")")
            ids[s.name] = f"${var}"
            continue
        log_path(out, s).parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            print(f"sbatch of {s.name} failed: {proc.stderr.strip()}", file=sys.stderr)
            return 1
        ids[s.name] = proc.stdout.strip().split(";")[0]
        print(f"submitted {s.name}: job {ids[s.name]}", flush=True)
    if dry_run:
        return 0
    final = states(all_steps, out, squeue(out))
    print(table_text(all_steps, final))
    return 0 if all(v.state in ("done", "queued", "running") for v in final.values()) else 1
