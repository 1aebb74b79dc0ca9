"""Training-step speed of the small recall models on one GPU: eager against one captured CUDA graph, one run
against several runs sharing the GPU (CUDA streams in one process, separate processes, and the same under MPS).

    python benchmarks/train_step.py                                  # the recall shape, every model and mode
    python benchmarks/train_step.py --models mom --modes graph,streams --runs 8 --out $OUT

The shape is the recall study's: d_model 128, 2 layers, heads of 16, vocabulary 8192, batch 64 x 256,
MQAR with 16/32/64 pairs mixed. Modes:
  eager-host  today's loop before TrainStep: each batch indexed on the CPU and copied over, the loss read every step
  eager       TrainStep without a graph; the data set lives on the GPU, the loss is read every 100 steps
  graph       TrainStep(cuda_graph=True): the whole step replayed as one CUDA graph
  graph-query graph, with the LM head and the loss computed at the query positions only (models that accept
              loss_positions)
  streams     --runs graph runs (seeds 0..runs-1) in one process, each on its own CUDA stream, stepped in turn
  processes   --runs processes, each one graph run, started together
  mps         processes, under an MPS daemon this script starts and stops (when nvidia-cuda-mps-control exists)
Steps/s are medians over --windows timed windows of --steps steps after warm-up (CUDA-synchronised wall time);
gpu ms is the median of CUDA-event times around single graph replays. --check compares 50 graph steps with 50
eager steps (the same capturable optimiser: bitwise expected) and with the plain eager optimiser.
Prints a table, writes JSON (after every row, so a killed run keeps its rows).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import atomic_write_json  # noqa: E402
from memmix.data.mqar import generate_mqar, query_positions  # noqa: E402
from memmix.evaluation.recall import RECALL_MODELS, ModelSize  # noqa: E402
from memmix.training.optim import build_optimizer, cosine_schedule  # noqa: E402
from memmix.training.step import TrainStep  # noqa: E402

MODES = ("eager-host", "eager", "graph", "graph-query", "streams", "processes", "mps")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="mom,gdn,linear,attention,bmojo")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--pairs", default="16,32,64")
    p.add_argument("--pool", type=int, default=2048, help="MQAR sequences kept on the GPU")
    p.add_argument("--runs", type=int, default=8, help="concurrent runs of streams/processes/mps")
    p.add_argument("--steps", type=int, default=100, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: autocast around the forward (the recall runner's default on CUDA); fp32: none")
    p.add_argument("--check", action="store_true", help="also compare graph and eager losses over 50 steps")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS eager graph-query steps per model (torch.profiler): top kernels by GPU time")
    p.add_argument("--json", default="benchmarks/results/train_step.json")
    p.add_argument("--out", default=None, help="also copy the JSON here after every row (e.g. $OUT)")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # processes/mps child: its seed
    p.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=10.0, help="timed wall time of each process in processes/mps")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ one run


class Run:
    """One model in training: its TrainStep, its data pool on the GPU and a device-resident index schedule."""

    def __init__(self, args, name: str, seed: int, mode: str, stream=None):
        self.args, self.device = args, torch.device("cuda")
        size = ModelSize(args.vocab_size, args.d_model, args.layers, args.head_dim)
        torch.manual_seed(seed)
        self.model = RECALL_MODELS[name].build(size).to(self.device)
        optimizer = build_optimizer(self.model, lr=1e-3, weight_decay=0.1)
        schedule = cosine_schedule(optimizer, warmup_steps=100, total_steps=100_000)
        pairs = [int(x) for x in args.pairs.split(",")]
        data = generate_mqar(args.pool, args.seq_len, pairs, args.vocab_size, seed=seed)
        self.query = mode == "graph-query"
        on_host = mode == "eager-host"
        where = "cpu" if on_host else self.device
        self.ids, self.labels = data.input_ids.to(where), data.labels.to(where)
        if self.query:
            self.positions = query_positions(data.labels, max(pairs)).to(self.device)
        self.host_loop = on_host
        graph = mode in ("graph", "graph-query", "streams", "processes", "mps")
        self.step = TrainStep(self.model, optimizer, schedule, self.loss, cuda_graph=graph, stream=stream)
        self.generator = torch.Generator().manual_seed(seed)
        self.schedule, self.cursor = None, 0

    def loss(self, model, batch):
        """batch: (index,) rows of the GPU pool, or (ids, labels) already on the GPU (eager-host)."""
        if len(batch) == 2:
            ids, labels = batch
        else:
            ids, labels = self.ids.index_select(0, batch[0]), self.labels.index_select(0, batch[0])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.args.precision == "bf16"):
            if self.query:
                positions = self.positions.index_select(0, batch[0])
                return model(input_ids=ids, labels=labels, loss_positions=positions).loss
            return model(input_ids=ids, labels=labels).loss

    def next_index(self) -> torch.Tensor:
        """The next batch's rows: random, drawn on the host 1024 steps at a time and moved in one copy."""
        if self.host_loop:
            return torch.randint(0, self.args.pool, (self.args.batch_size,), generator=self.generator)
        if self.schedule is None or self.cursor == self.schedule.shape[0]:
            block = torch.randint(0, self.args.pool, (1024, self.args.batch_size), generator=self.generator)
            self.schedule, self.cursor = block.to(self.device), 0
            if self.step.stream is not None:
                self.schedule.record_stream(self.step.stream)
        self.cursor += 1
        return self.schedule[self.cursor - 1]

    def train(self, steps: int) -> list:
        outputs = []
        for _ in range(steps):
            if self.host_loop:  # the loop before TrainStep: each batch copied over, each loss read back
                index = self.next_index()
                out = self.step([(self.ids[index].to(self.device), self.labels[index].to(self.device))])
                out.loss.item()
            else:
                out = self.step([(self.next_index(),)])
            outputs.append(out)
        return outputs


# ------------------------------------------------------------------------------------------------ timing


def synced_rate(fn, steps: int, windows: int) -> tuple[float, list[float]]:
    """Median steps/s of fn(steps) over `windows` windows (wall time between device synchronisations)."""
    rates = []
    for _ in range(windows):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(steps)
        torch.cuda.synchronize()
        rates.append(steps / (time.perf_counter() - start))
    return statistics.median(rates), rates


def gpu_ms(run: Run) -> float | None:
    """Median device time of one graph replay (CUDA events), or None for an eager run."""
    if not run.step.cuda_graph:
        return None
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(run.step.stream):
            start.record()
            run.train(1)
            end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_single(args, name: str, mode: str) -> dict:
    run = Run(args, name, seed=0, mode=mode)
    run.train(10)  # warm-up steps, then the capture
    rate, rates = synced_rate(run.train, args.steps, args.windows)
    return dict(model=name, mode=mode, runs=1, steps_per_s=rate, windows=rates, step_ms=1e3 / rate,
                gpu_ms=gpu_ms(run))


def time_streams(args, name: str) -> dict:
    runs = [Run(args, name, seed=i, mode="streams", stream=torch.cuda.Stream()) for i in range(args.runs)]
    for run in runs:
        with torch.cuda.stream(run.step.stream):
            run.train(10)

    def step_all(steps: int) -> None:
        for _ in range(steps):
            for run in runs:
                with torch.cuda.stream(run.step.stream):  # the step's own stream: no wait on the others
                    run.train(1)

    rate, rates = synced_rate(step_all, args.steps, args.windows)
    return dict(model=name, mode="streams", runs=args.runs, steps_per_s=rate * args.runs,
                windows=[r * args.runs for r in rates], step_ms=1e3 / rate)


def time_processes(args, name: str, mps: bool) -> dict:
    mode = "mps" if mps else "processes"
    daemon = start_mps() if mps else None
    if mps and daemon is None:
        return dict(model=name, mode=mode, runs=args.runs, steps_per_s=None, note="nvidia-cuda-mps-control missing "
                    "or refused")
    sync_dir = tempfile.mkdtemp(prefix="train_step_sync_")
    procs = []
    try:
        cmd = [sys.executable, __file__, "--models", name, "--worker", "0", "--sync-dir", sync_dir,
               "--seconds", str(args.seconds)] + _shape_flags(args)
        procs = [subprocess.Popen(cmd[:5] + [str(i)] + cmd[6:], stdout=subprocess.PIPE, text=True, env=daemon)
                 for i in range(args.runs)]
        deadline = time.time() + 180
        while len([f for f in os.listdir(sync_dir) if f.startswith("ready")]) < args.runs and time.time() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        Path(sync_dir, "go").touch()
        outs = [p.communicate(timeout=args.seconds + 120)[0] for p in procs]
        rates = [float(line.split()[-1]) for o in outs for line in o.splitlines() if line.startswith("rate")]
        note = "" if len(rates) == args.runs else f"only {len(rates)} of {args.runs} processes reported"
        return dict(model=name, mode=mode, runs=args.runs, steps_per_s=sum(rates) if rates else None,
                    per_process=rates, note=note)
    except subprocess.TimeoutExpired:
        return dict(model=name, mode=mode, runs=args.runs, steps_per_s=None, note="a process did not finish in time")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(sync_dir, ignore_errors=True)
        if daemon is not None:
            stop_mps(daemon)


def _shape_flags(args) -> list[str]:
    return ["--d-model", str(args.d_model), "--layers", str(args.layers), "--head-dim", str(args.head_dim),
            "--vocab-size", str(args.vocab_size), "--batch-size", str(args.batch_size), "--seq-len",
            str(args.seq_len), "--pairs", args.pairs, "--pool", str(args.pool), "--precision", args.precision]


def worker(args) -> None:
    """processes/mps child: warm up, say ready, wait for go, step for --seconds, print its rate."""
    run = Run(args, args.models, seed=args.worker, mode="processes")
    run.train(10)
    torch.cuda.synchronize()
    Path(args.sync_dir, f"ready{args.worker}").touch()
    while not Path(args.sync_dir, "go").exists():
        time.sleep(0.01)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        run.train(20)
        steps += 20
    torch.cuda.synchronize()
    print(f"rate {steps / (time.perf_counter() - start):.3f}", flush=True)


def start_mps() -> dict | None:
    """Start an MPS control daemon with private pipe/log folders; the environment for its clients, or None."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return None
    root = tempfile.mkdtemp(prefix="mps_")
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=f"{root}/pipe", CUDA_MPS_LOG_DIRECTORY=f"{root}/log")
    os.makedirs(env["CUDA_MPS_PIPE_DIRECTORY"]), os.makedirs(env["CUDA_MPS_LOG_DIRECTORY"])
    if subprocess.run([control, "-d"], env=env).returncode != 0:
        return None
    return env


def stop_mps(env: dict) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env)


# ------------------------------------------------------------------------------------------------ exactness


def check_exact(args, name: str) -> dict:
    """50 steps: graph vs eager with the same capturable optimiser (bitwise expected), and vs the plain eager
    optimiser (relative difference of the losses)."""
    from memmix.training.graph_capture import make_capturable

    def losses(mode: str, capturable: bool) -> list[float]:
        run = Run(args, name, seed=0, mode=mode)
        if capturable and not run.step.cuda_graph:
            make_capturable(run.step.optimizer, run.device)
        return run.step.read(run.train(50))

    graph, eager_cap, eager = losses("graph", True), losses("eager", True), losses("eager", False)
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(graph, eager))
    return dict(model=name, bitwise_vs_capturable_eager=graph == eager_cap, max_rel_vs_eager=rel,
                graph_losses=graph[::10], eager_losses=eager[::10])


# ------------------------------------------------------------------------------------------------ main


def profile_steps(args, name: str, steps: int, top: int = 12) -> dict:
    """GPU time of `steps` eager steps (the query-only head where the model takes it) by kernel, largest first."""
    from torch.profiler import ProfilerActivity, profile

    run = Run(args, name, seed=0, mode="graph-query")
    run.step.cuda_graph = False  # eager: the profiler sees every kernel
    run.train(5)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run.train(steps)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 1e3 / steps
    kernels = [dict(name=e.key[:90], ms_per_step=e.device_time_total / 1e3 / steps, calls_per_step=e.count / steps)
               for e in events[:top]]
    print(f"profile {name}: {total:.2f} GPU ms/step over {len(events)} kernels")
    for k in kernels:
        print(f"  {k['ms_per_step']:7.3f} ms  {k['calls_per_step']:5.1f}x  {k['name']}")
    return dict(model=name, steps=steps, gpu_ms_per_step=total, top=kernels)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        return worker(args)
    if not torch.cuda.is_available():
        sys.exit("train_step.py needs CUDA")
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        sys.exit(f"--modes: unknown {unknown[0]!r}; allowed: {', '.join(MODES)}")
    import triton
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  args=vars(args), rows=[], checks=[])

    def save() -> None:
        atomic_write_json(args.json, result)
        if args.out:
            atomic_write_json(os.path.join(args.out, os.path.basename(args.json)), result)

    print(f"{'model':<10} {'mode':<12} {'runs':>4} {'steps/s':>9} {'ms/step':>8} {'gpu ms':>7}  note", flush=True)
    for name in args.models.split(","):
        for mode in modes:
            try:
                if mode in ("streams",):
                    row = time_streams(args, name)
                elif mode in ("processes", "mps"):
                    row = time_processes(args, name, mps=mode == "mps")
                else:
                    row = time_single(args, name, mode)
            except Exception as err:  # a mode a model cannot run (e.g. graph-query without loss_positions)
                row = dict(model=name, mode=mode, runs=None, steps_per_s=None, note=f"{type(err).__name__}: {err}"[:200])
            result["rows"].append(row)
            save()
            rate = row.get("steps_per_s")
            print(f"{name:<10} {mode:<12} {row.get('runs') or '':>4} {rate or float('nan'):>9.1f} "
                  f"{row.get('step_ms') or float('nan'):>8.2f} {row.get('gpu_ms') or float('nan'):>7.2f}  "
                  f"{row.get('note', '')}", flush=True)
            torch.cuda.empty_cache()
        if args.profile:
            result.setdefault("profiles", []).append(profile_steps(args, name, args.profile))
            save()
        if args.check:
            check = check_exact(args, name)
            result["checks"].append(check)
            save()
            print(f"{name}: graph == capturable eager bitwise: {check['bitwise_vs_capturable_eager']}; "
                  f"max relative loss difference vs plain eager over 50 steps: {check['max_rel_vs_eager']:.2e}",
                  flush=True)


if __name__ == "__main__":
    main()
