"""Many processes: two real CPU processes joined by accelerate over gloo train, survive SIGKILL and --resume,
and sample, giving the steps, epochs, log rows, files and images that one process gives."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import CLI, ENV, FAST_SAMPLING, TINY, guided
from test_training import write_data

import train_cli

# README's commands for N processes on CPUs; torchrun picks a free port itself.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(CLI)]
# 16 images, a global batch of 4: 4 steps an epoch, 12 in all; a grid every epoch, a save every other.
TRAIN = ["--mode", "train", *TINY, *FAST_SAMPLING, "--num_epochs", "3", "--checkpointing_steps", "3",
         "--save_image_epochs", "1", "--save_model_epochs", "2"]  # fmt: skip


def accelerate_launch() -> list[str]:
    with socket.socket() as s:  # a free port: other test runs may share this machine
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), str(CLI)]  # fmt: skip


def launch(command, *args, cwd) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [*command, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def ranks(output: str) -> dict[str, int]:
    """The line each process prints first -> its pid: "process 0 of 2 on cpu:0 (pid 123)"."""
    return {m[1]: int(m[2]) for m in re.finditer(r"(process \d+ of \d+) on \S+ \(pid (\d+)\)", output)}


TWO = {"process 0 of 2", "process 1 of 2"}


def summary(run: Path) -> dict:
    """What must not depend on the process count: log rows, checkpoints, grids, saves, files."""
    with open(run / "train_log.csv", newline="") as f:
        rows = [(int(r["step"]), int(r["epoch"]), round(float(r["lr"]), 12)) for r in csv.DictReader(f)]
    card = json.loads((run / "segdiff_card.json").read_text())["training"]
    checkpoints = sorted(run.glob("checkpoint-*"))
    return {
        "log": rows,
        "files": sorted(p.name for p in run.iterdir() if p.name != "logs"),
        "checkpoint steps": [json.loads((c / "trainer_state.json").read_text())["step"] for c in checkpoints],
        "checkpoint files": [
            sorted(p.name for p in c.iterdir() if not p.name.startswith("random_states_"))
            for c in checkpoints
        ],
        "RNG states": {len(list(c.glob("random_states_*.pkl"))) for c in checkpoints},  # one per process
        "grids": sorted(p.name for p in (run / "samples").iterdir()),
        "card": (card["steps"], card["epochs"], card["finished"]),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    write_data(work / "data", counts=(16, 4, 5))
    return work


@pytest.fixture(scope="module")
def one_process(work):
    """A run of one process (this one) with the global batch (4) of the two-process runs."""
    data = [work / "data" / "img", work / "data" / "mask"]
    flags = [*TRAIN, *guided(data), "--train_batch_size", "4", "--output_dir", work / "one"]
    assert train_cli.main(list(map(str, flags))) == 0
    return work / "one"


def test_two_processes_train_sigkill_and_resume_as_one_process_does(work, one_process, monkeypatch, capsys):
    flags = [*TRAIN, *guided(["data/img", "data/mask"]), "--train_batch_size", "2", "--output_dir", "two"]
    run, log = work / "two", work / "two.out"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*TORCHRUN, *flags],
            cwd=work,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            while (
                not (run / "checkpoint-3").is_dir() and process.poll() is None and time.monotonic() < deadline
            ):
                time.sleep(0.02)
            # Both processes and the launcher at once, as a scheduler ends a job; the processes run in
            # sessions of their own.
            for pid in ranks(log.read_text()).values():
                os.kill(pid, signal.SIGKILL)
            os.killpg(process.pid, signal.SIGKILL)
        finally:
            process.wait()
    assert process.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    assert ranks(log.read_text()).keys() == TWO
    killed_at = max(int(p.name.removeprefix("checkpoint-")) for p in run.glob("checkpoint-*"))
    assert killed_at < 12

    resumed = launch(TORCHRUN, *flags, "--resume", cwd=work)
    assert ranks(resumed.stdout).keys() == TWO
    assert (
        f"resumed from {Path('two') / f'checkpoint-{killed_at}'} at step {killed_at} of 12" in resumed.stdout
    )
    two, one = summary(run), summary(one_process)
    assert two.pop("RNG states") == {2} and one.pop("RNG states") == {1}
    assert two == one, (two, one)
    assert [row[0] for row in two["log"]] == list(range(1, 13)) and two["card"] == (12, 3, True)
    assert json.loads((run / "segdiff_card.json").read_text())["training"]["processes"] == 2

    # Its LR schedule counts in steps x 2 processes: one process may not continue it.
    monkeypatch.chdir(work)
    assert train_cli.main([*map(str, flags), "--resume"]) == 2
    assert "checkpoint-12: written by 2 process(es), resumed by 1" in capsys.readouterr().err


def test_two_processes_sample_the_files_one_process_writes(work, one_process, monkeypatch):
    model = [
        "--model_dir",
        one_process,
        *guided(["data/img", "data/mask"]),
        *FAST_SAMPLING,
        "--img_size",
        "32",
    ]
    many = ["--mode", "eval_many", *model, "--eval_sample_size", "5", "--eval_batch_size", "2"]
    figures = ["--mode", "eval", *model, "--eval_mask_removal", "--eval_blank_mask"]
    monkeypatch.chdir(work)
    for flags, out in ((many, "many-1"), (figures, "eval-1")):
        assert train_cli.main([*map(str, flags), "--output_dir", out]) == 0
    for flags, out in ((many, "many-2"), (figures, "eval-2")):
        assert ranks(launch(accelerate_launch(), *flags, "--output_dir", out, cwd=work).stdout).keys() == TWO

    def files(folder):
        return {p.name: p.read_bytes() for p in folder.iterdir()}

    one, two = files(work / "many-1" / "samples_many_5"), files(work / "many-2" / "samples_many_5")
    assert len(one) == 5 and two == one  # each file once, whole, and the same image bit for bit
    assert files(work / "eval-2" / "samples") == files(work / "eval-1" / "samples")
    assert len(files(work / "eval-2" / "samples")) == 3
