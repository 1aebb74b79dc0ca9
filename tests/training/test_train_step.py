"""TrainStep: the eager step, the CUDA-graph step's logic (emulated on the CPU), and the host-sync finder."""
import gc
import weakref

import pytest
import torch

from helpers import EmulatedGraph

from memmix import MoMConfig, MoMForCausalLM
from memmix.host_syncs import find_host_syncs
from memmix.training.optim import build_optimizer, cosine_schedule
from memmix.training.step import StepOutput, TrainStep

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_heads=2, head_dim=16, attn_num_heads=2,
            intermediate_size=64)
KINDS = {
    "mom": dict(num_memories=4, topk=2, shared_mem=True),
    "gdn": dict(num_memories=1, topk=1, shared_mem=False),
    "linear": dict(num_memories=1, topk=1, shared_mem=False, memory_rule="linear"),
    "attention": dict(num_memories=1, topk=1, shared_mem=False, attn_layers=[0, 1]),
}


def _run(kind: str, graph: bool, steps: int, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    model = MoMForCausalLM(MoMConfig(**TINY, **KINDS[kind]))
    optimizer = build_optimizer(model, lr=3e-3)
    schedule = cosine_schedule(optimizer, warmup_steps=5, total_steps=steps)
    step = TrainStep(model, optimizer, schedule, lambda m, batch: m(input_ids=batch["ids"], labels=batch["ids"]).loss,
                     cuda_graph=graph, warmup_steps=2, graph_recorder=EmulatedGraph if graph else None)
    data = torch.Generator().manual_seed(seed + 1)
    pools = {length: torch.randint(0, 64, (4, length), generator=data) for length in (16, 24)}  # learnable
    outputs = []
    for index in range(steps):
        pool = pools[(16, 24)[index % 2]]  # two batch shapes: two graphs, each replayed in turn
        ids = pool[torch.randint(0, 4, (2,), generator=data)]
        outputs.append(step([{"ids": ids}]))
    return step.read(outputs)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_graph_step_logic_matches_the_eager_step(kind):
    """50 steps: the emulated graph (static inputs, per-shape graphs, warm-up, learning rate in a device tensor
    filled by the schedule) gives the eager step's losses."""
    eager, graphed = _run(kind, False, 50), _run(kind, True, 50)
    assert len(graphed) == 50
    # the learning rate is a float32 tensor in one and a Python float in the other
    assert graphed == pytest.approx(eager, rel=1e-5)
    assert sum(eager[-4:]) < sum(eager[:4]) - 0.5  # it trained


def test_graph_step_reads_only_its_static_inputs():
    """A replay must see the new batch: copying into the wrong buffer would repeat the first batch's loss."""
    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**TINY, **KINDS["gdn"]))
    optimizer = build_optimizer(model, lr=1e-9)  # the model barely moves: losses differ only through the data
    step = TrainStep(model, optimizer, cosine_schedule(optimizer, 0, 10),
                     lambda m, b: m(input_ids=b[0], labels=b[0]).loss, cuda_graph=True, warmup_steps=1,
                     graph_recorder=EmulatedGraph)
    batches = [torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    losses = step.read([step([(b,)]) for b in batches])
    with torch.no_grad():
        expected = [model(input_ids=b, labels=b).loss.item() for b in batches]
    assert losses[1:] == pytest.approx(expected[1:], rel=1e-4)
    assert len(set(round(x, 6) for x in losses)) == 4


def test_graph_step_refuses_what_it_cannot_capture():
    model = MoMForCausalLM(MoMConfig(**TINY, **KINDS["gdn"]))
    optimizer = build_optimizer(model, lr=1e-3)
    schedule = cosine_schedule(optimizer, 0, 10)
    with pytest.raises(ValueError, match="CUDA device"):
        TrainStep(model, optimizer, schedule, lambda m, b: m(**b).loss, cuda_graph=True)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Adam"):
        TrainStep(model, sgd, cosine_schedule(sgd, 0, 10), lambda m, b: m(**b).loss, cuda_graph=True,
                  graph_recorder=EmulatedGraph)
    step = TrainStep(model, optimizer, schedule, lambda m, b: m(**b).loss, cuda_graph=True,
                     graph_recorder=EmulatedGraph)
    with pytest.raises(TypeError, match="dict/tuple/list of tensors"):
        step([{"input_ids": torch.zeros(1, 4, dtype=torch.long), "note": "text"}])
    with pytest.raises(ValueError, match="grad_clip"):
        TrainStep(model, optimizer, schedule, lambda m, b: m(**b).loss, grad_clip=-1)


class _OutputsOnly:
    """Keeps what CudaGraph keeps after a capture: output tensors, not the function (no reference back to the step)."""

    def __init__(self, stream):
        self.outputs = StepOutput(torch.zeros(()), torch.zeros(()))

    def record(self, fn):
        pass

    def replay(self):
        return self.outputs


def test_a_graphed_step_is_freed_without_the_garbage_collector():
    """No reference cycle through a graphed step: a finished run's model, optimiser and graphs go as soon as its last
    reference does (GPU memory would otherwise wait for a full collection)."""
    model = MoMForCausalLM(MoMConfig(**TINY, **KINDS["gdn"]))
    optimizer = build_optimizer(model, lr=1e-3)
    step = TrainStep(model, optimizer, cosine_schedule(optimizer, 0, 10),
                     lambda m, b: m(input_ids=b[0], labels=b[0]).loss, cuda_graph=True, warmup_steps=1,
                     graph_recorder=_OutputsOnly)
    ids = torch.randint(0, 64, (2, 16))
    for _ in range(3):  # a warm-up step, a capture, replays
        step([(ids,)])
    gone = weakref.ref(step), weakref.ref(model)
    gc.disable()
    try:
        del step, model, optimizer
        assert gone[0]() is None and gone[1]() is None
    finally:
        gc.enable()


def test_find_host_syncs_names_each_kind_of_sync():
    x = torch.randn(8)
    assert find_host_syncs(lambda: x.sum().item()) == ["aten._local_scalar_dense.default"]
    assert find_host_syncs(lambda: bool(x.sum() > 0))
    assert find_host_syncs(lambda: x.tolist())
    assert find_host_syncs(lambda: x[x > 0])  # boolean-mask indexing: an output sized by data
    assert find_host_syncs(lambda: torch.nonzero(x))
    assert find_host_syncs(lambda: torch.repeat_interleave(torch.tensor([1, 2])))
    assert find_host_syncs(lambda: torch.repeat_interleave(torch.arange(2), torch.tensor([1, 2]), output_size=3)) == []
    assert find_host_syncs(lambda: (x * 2).softmax(0).cumsum(0)[torch.tensor([0, 3])]) == []


def test_the_last_warmup_step_names_host_reads_before_a_capture():
    """On CUDA the last warm-up step runs watched (TrainStep._eager_checked): a step that reads a value back to the
    host stops there with a clear error instead of failing inside the capture. The check itself is device-free."""
    from memmix.training.graph_capture import GraphCaptureError

    torch.manual_seed(0)
    model = MoMForCausalLM(MoMConfig(**TINY, **KINDS["attention"]))
    optimizer = build_optimizer(model, lr=1e-3)
    ids = torch.randint(0, 64, (2, 16))

    def syncing(m, batch):
        loss = m(input_ids=batch[0], labels=batch[0]).loss
        return loss * (1.0 if loss.item() > 0 else 2.0)  # a host read

    step = TrainStep(model, optimizer, cosine_schedule(optimizer, 0, 10), syncing)
    with pytest.raises(GraphCaptureError, match="_local_scalar_dense"):
        step._eager_checked([(ids,)])
    clean = TrainStep(model, optimizer, cosine_schedule(optimizer, 0, 10),
                      lambda m, batch: m(input_ids=batch[0], labels=batch[0]).loss)
    before = [p.detach().clone() for p in model.parameters()]
    out = clean._eager_checked([(ids,)])
    assert torch.isfinite(out.loss) and any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
