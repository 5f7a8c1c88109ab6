# A copy of ../shared/tools/kill_resume.py (the project's contract checks), used by the tests only where the shared
# folder is not beside this checkout; tests/contract.py prefers the shared original.
"""Exact-resume check (run it from the project root with the project's Python): an uninterrupted run vs a run SIGKILLed after its first checkpoint and restarted.

usage: killresume.py PYTHON CONFIG SCRATCH [extra --config.* overrides...]
Prints one JSON line: {"identical": bool, "uninterrupted": sha, "resumed": sha, "killed_after_step": N}
"""
import json, os, signal, subprocess, sys, time

py, config, scratch, *extra = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))


def run(workdir, kill_after_ckpt=False):
    cmd = [py, "-m", "jft.main", f"--config={config}", f"--workdir={workdir}", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    killed_at = None
    if kill_after_ckpt:
        root = os.path.join(workdir, "checkpoints")
        while proc.poll() is None:
            done = [d for d in (os.listdir(root) if os.path.isdir(root) else []) if d.isdigit()]
            if done:
                time.sleep(0.3)
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = max(int(d) for d in done)
                break
            time.sleep(0.05)
    _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace"), killed_at


def sha(workdir):
    out = subprocess.run([py, os.path.join(here, "check_workdir.py"), workdir], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]).get("params_sha256") if out.stdout.strip() else None


u, r = os.path.join(scratch, "uninterrupted"), os.path.join(scratch, "resumed")
code, err, _ = run(u)
if code != 0:
    print(json.dumps({"error": "uninterrupted run failed", "code": code, "stderr": err[-400:]}))
    sys.exit(1)
code, err, killed = run(r, kill_after_ckpt=True)
if killed is None:
    print(json.dumps({"error": "run finished before any checkpoint appeared; cannot test the kill", "code": code}))
    sys.exit(1)
code, err, _ = run(r)
if code != 0:
    print(json.dumps({"error": "resumed run failed", "code": code, "stderr": err[-400:]}))
    sys.exit(1)
a, b = sha(u), sha(r)
print(json.dumps({"identical": a is not None and a == b, "uninterrupted": a, "resumed": b, "killed_after_step": killed}))
sys.exit(0 if a is not None and a == b else 1)
