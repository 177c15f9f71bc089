"""Running the real training script as a subprocess, freezing it at a named point, and injected faults."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "src/tsumugi/zimage_train_network.py"


def train_argv(toml: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """The flags of ``test_train_network.train_args`` for Z-Image, as a command line."""
    return ["--dit", str(files["dit"]), "--dataset_config", str(toml), "--network_module", "networks.lora_zimage",
            "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-2", "--max_train_steps", "3",
            "--output_dir", str(out), "--output_name", "lora", "--seed", "11", "--mixed_precision", "no", *extra]


def launch(argv: list[str], pause: str | None = None, seconds: float | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("TSUMUGI_TEST_PAUSE_AT", None)
    if pause:
        env["TSUMUGI_TEST_PAUSE_AT"] = pause
    if seconds is not None:
        env["TSUMUGI_TEST_PAUSE_SECONDS"] = str(seconds)
    return subprocess.Popen([sys.executable, str(SCRIPT), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def run_script(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = launch(argv)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_paused(proc: subprocess.Popen, point: str, timeout: float = 300) -> str:
    """Read the child's stderr until it reports being frozen at ``point``; returns what it read."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"exited ({proc.wait()}) before reaching {point}:\n" + "".join(seen)[-3000:])
        seen.append(line)
        if f"TSUMUGI_TEST_PAUSED {point.split(':')[0]}" in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"did not reach {point} in {timeout} s")


def kill_hard(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)


class _CreatesFile:
    """Unpickling this creates ``path``: a stand-in for code a crafted pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_crafted_pickle(target: Path, evidence: Path) -> None:
    """A pickle that creates ``evidence`` when loaded (``torch.load(weights_only=False)`` or ``pickle.load``)."""
    if target.suffix in (".bin", ".pt", ".pkl"):
        torch.save({"state": _CreatesFile(evidence)}, target)
    else:
        target.write_bytes(pickle.dumps({"state": _CreatesFile(evidence)}))


class PoisonedSGD(torch.optim.SGD):
    """SGD whose second step turns every weight into inf: an update that overflows, on cue
    (``--optimizer_type faults.PoisonedSGD``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps_done = 0

    def step(self, closure=None):
        result = super().step(closure)
        self.steps_done += 1
        if self.steps_done == 2:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.fill_(float("inf"))
        return result
