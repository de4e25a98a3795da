"""Crash safety: a process saving checkpoints in a loop is SIGKILLed at random moments.

A helper process (run from this file) imports torch once and forks a fresh saver for each round,
so a round costs a fork, not an interpreter start. After every kill: each directory under a final
name verifies, the newest one loads with the contents of its step, and unfinished saves exist
only under hidden temporary names.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tiermem.checkpoint import AsyncCheckpointer, load, verify
from tiermem.storage.durable import is_unfinished

KILLS = 22
KEEP = 3


def _state(step: int) -> dict:
    """About 3 MB whose every value depends on the step."""
    return {"step": step,
            "model": {"w": torch.full((512, 1024), float(step)),
                      "b": (torch.arange(1 << 19) + step).to(torch.bfloat16)},
            "opt": [{"lr": 0.1 * step, "m": torch.arange(1000, dtype=torch.int64) * step}]}


def _save_forever(root: Path) -> None:
    done = [int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("step-")]
    step = max(done, default=-1) + 1
    with AsyncCheckpointer(pin=False, shard_bytes=1 << 20) as ckpt:
        while True:
            compress = "zstd" if step % 2 else None
            ckpt.save(_state(step), root / f"step-{step:06d}", compress=compress, keep=KEEP).result()
            step += 1


def _zygote(root: Path) -> None:
    """Reads commands on stdin: 'go' forks a saver, 'kill' SIGKILLs and reaps it."""
    torch.set_num_threads(1)
    print("ready", flush=True)
    pid = 0
    for line in sys.stdin:
        if line.strip() == "go":
            pid = os.fork()
            if pid == 0:
                try:
                    _save_forever(root)
                finally:
                    os._exit(3)
            print(pid, flush=True)
        elif line.strip() == "kill":
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            print(status, flush=True)


def _check_after_kill(root: Path) -> int:
    """Assert the invariants; return the newest complete step (-1 if none yet)."""
    finals = sorted(p for p in root.iterdir() if not is_unfinished(p))
    for path in finals:
        assert path.name.startswith("step-") and path.is_dir(), path
        report = verify(path)
        assert report.ok, report.failed
    if not finals:
        return -1
    newest = load(finals[-1])
    expected = _state(newest["step"])
    assert finals[-1].name == f"step-{newest['step']:06d}"
    assert torch.equal(newest["model"]["w"], expected["model"]["w"])
    assert torch.equal(newest["model"]["b"], expected["model"]["b"])
    assert torch.equal(newest["opt"][0]["m"], expected["opt"][0]["m"])
    assert newest["opt"][0]["lr"] == 0.1 * newest["step"]
    return newest["step"]


def test_sigkill_at_random_moments_never_exposes_a_partial_checkpoint(tmp_path):
    zygote = subprocess.Popen([sys.executable, __file__, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    rng = random.Random(20261121)
    interrupted, newest = 0, -1
    try:
        assert zygote.stdout.readline().strip() == "ready"
        for _ in range(KILLS):
            temps_before = {p.name for p in tmp_path.iterdir() if is_unfinished(p)}
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            assert int(zygote.stdout.readline()) > 0
            time.sleep(rng.uniform(0.05, 0.6))
            zygote.stdin.write("kill\n")
            zygote.stdin.flush()
            status = int(zygote.stdout.readline())
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "saver died on its own"
            interrupted += bool({p.name for p in tmp_path.iterdir() if is_unfinished(p)} - temps_before)
            step = _check_after_kill(tmp_path)
            assert step >= newest  # never goes back: published checkpoints are durable
            newest = step
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert newest >= KILLS // 2, "the saver made too little progress to test anything"
    assert interrupted >= KILLS // 4, "too few kills landed in the middle of a save"
    assert len([p for p in tmp_path.iterdir() if not is_unfinished(p)]) <= KEEP + 1


if __name__ == "__main__":
    _zygote(Path(sys.argv[1]))
