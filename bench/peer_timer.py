"""Run a peer training script unchanged, recording when each optimiser step ends.

`python peer_timer.py OUT.json SCRIPT.py ARGS...`: the peer's own "Steps" progress bar ticks
once per optimiser step; we timestamp those ticks and read peak GPU memory at exit.
"""

import atexit
import json
import runpy
import sys
import time

import psutil
import torch
import tqdm.std

out_file, script, *args = sys.argv[1:]
stamps: list[float] = []
launch_to_first_step: list[float] = []  # process start -> the first step's end, as sdft's perf.json
_update = tqdm.std.tqdm.update


def update(self, n=1):
    if getattr(self, "desc", None) == "Steps":  # some bars never set desc
        stamps.append(time.perf_counter())
        if not launch_to_first_step:
            launch_to_first_step.append(time.time() - psutil.Process().create_time())
    return _update(self, n)


@atexit.register
def dump() -> None:
    peak = torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else 0.0
    with open(out_file, "w") as f:
        first = launch_to_first_step[0] if launch_to_first_step else None
        json.dump(
            {"step_end_times": stamps, "peak_mem_gb": peak, "launch_to_first_step_s": first}, f
        )


tqdm.std.tqdm.update = update
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
