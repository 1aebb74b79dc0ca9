"""Run by `torchrun` (training_helpers.run_torchrun): trains the same tiny run under DDP, then under FSDP2.

argv: data_path out_root model_name [model_overrides_json] [jobs]
jobs: comma list of "ddp", "fsdp" (fresh 4-step runs in out_root/<mode>) and "<mode>@resume" (continue the
run already in out_root/<mode>_resume to 6 steps).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from training_helpers import dist_run_config, register_standin  # noqa: E402

from memmix.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from memmix.training.trainer import train  # noqa: E402


if __name__ == "__main__":
    register_standin()
    data, out_root, model = sys.argv[1:4]
    overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # one process group for all jobs: re-creating the default group in a process is fragile with gloo
    init_distributed("cpu")
    for job in sys.argv[5].split(",") if len(sys.argv) > 5 else ("ddp", "fsdp"):
        parallel, _, resume = job.partition("@")
        out_dir = os.path.join(out_root, parallel + ("_resume" if resume else ""))
        config = dist_run_config(data, out_dir, model, overrides, parallel, world)
        if resume:
            config.resume, config.overwrite, config.max_steps = "latest", False, 6
        train(config)
    shutdown_distributed()
