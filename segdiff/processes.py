"""The processes of a launch: how many torchrun or `accelerate launch` started, and which one this is."""

from __future__ import annotations

import os

import torch
from accelerate import PartialState


def launched_processes() -> int:
    """How many processes torchrun or `accelerate launch` started together (WORLD_SIZE); 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes() -> PartialState:
    """This process's place among those a launch started (one when run directly), joined over gloo on CPUs."""
    state = PartialState(cpu=launched_processes() > 1 and not torch.cuda.is_available())
    announce(state)
    return state


def announce(state) -> None:
    """One line from each process of a launch, saying which it is: proof that all of them started."""
    if state.num_processes > 1:
        line = (
            f"process {state.process_index} of {state.num_processes} on {state.device} (pid {os.getpid()})\n"
        )
        print(line, end="", flush=True)  # one write, so the lines of several processes do not interleave
