"""Run by `torchrun` in test_train_distributed.py: trains the same tiny run under DDP, then under FSDP2.

argv: data_path out_root model_name [model_overrides_json] [jobs]
jobs: comma list of "ddp", "fsdp" (fresh 4-step runs in out_root/<mode>) and "<mode>@resume" (continue the
run already in out_root/<mode>_resume to 6 steps).
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import standin_model  # noqa: E402

from memmix.training.config import TrainConfig  # noqa: E402
from memmix.training.distributed import init_distributed, shutdown_distributed  # noqa: E402
from memmix.training.trainer import train  # noqa: E402


def run_config(data: str, out_dir: str, model: str, overrides: dict, parallel: str, world_size: int) -> TrainConfig:
    # the global batch is world_size * grad_accum * micro_batch rows: keep it equal to the single-process run's
    return TrainConfig(model=model, model_overrides=overrides, data=data, seq_len=16, micro_batch_size=2,
                       grad_accum=2 // world_size, max_steps=4, warmup_steps=1, lr=3e-3, log_every=1, save_every=2,
                       out_dir=out_dir, overwrite=True, parallel=parallel, progress=False, tensorboard=False,
                       plot=False, save_hf=False, device="cpu")


if __name__ == "__main__":
    standin_model.register()
    data, out_root, model = sys.argv[1:4]
    overrides = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # one process group for all jobs: re-creating the default group in a process is fragile with gloo
    init_distributed("cpu")
    for job in sys.argv[5].split(",") if len(sys.argv) > 5 else ("ddp", "fsdp"):
        parallel, _, resume = job.partition("@")
        config = run_config(data, os.path.join(out_root, parallel + ("_resume" if resume else "")), model, overrides,
                            parallel, world)
        if resume:
            config.resume, config.overwrite, config.max_steps = "latest", False, 6
        train(config)
    shutdown_distributed()
