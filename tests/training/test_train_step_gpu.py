"""TrainStep's CUDA graph on the GPU: 50 captured steps equal 50 eager steps for every recall model, and runs on
their own streams give what each gives alone."""
import pytest
import torch

from memmix.data.mqar import generate_mqar
from memmix.evaluation.recall import RECALL_MODELS, ModelSize
from memmix.training.optim import build_optimizer, cosine_schedule
from memmix.training.graph_capture import make_capturable
from memmix.training.step import TrainStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# the recall models, and the MoM ablations whose options change the step (z-loss, temperature, a router
# convolution, the sequence-wide convolution on the PyTorch path's convolution)
MODELS = ["mom", "gdn", "linear", "attention", "bmojo", "mom-zloss", "mom-temp", "mom-route-conv", "mom-conv-whole"]
SIZE = ModelSize(vocab_size=512, d_model=64, num_layers=2, head_dim=16)


def _setup(name: str, graph: bool, steps: int, seed: int = 0, stream=None, capturable: bool = True):
    """A TrainStep on MQAR kept on the GPU and the (steps, batch) row order of its batches."""
    torch.manual_seed(seed)
    model = RECALL_MODELS[name].build(SIZE).cuda()
    optimizer = build_optimizer(model, lr=3e-3)
    schedule = cosine_schedule(optimizer, warmup_steps=5, total_steps=steps)
    data = generate_mqar(256, 64, [4, 8], SIZE.vocab_size, seed=seed)
    ids, labels = data.input_ids.cuda(), data.labels.cuda()

    def loss(m, batch):
        return m(input_ids=ids.index_select(0, batch[0]), labels=labels.index_select(0, batch[0])).loss

    step = TrainStep(model, optimizer, schedule, loss, cuda_graph=graph, stream=stream)
    if capturable and not graph:
        make_capturable(optimizer, torch.device("cuda"))  # the same optimiser arithmetic as the graph's
    order = torch.randint(0, 256, (steps, 16), generator=torch.Generator().manual_seed(seed)).cuda()
    return step, order


def _losses(name: str, graph: bool, steps: int = 50) -> list[float]:
    step, order = _setup(name, graph, steps)
    return step.read([step([(order[i],)]) for i in range(steps)])


def _weights(step: TrainStep) -> list[float]:
    return [float(p.detach().double().sum()) for p in step.model.parameters()]


@pytest.mark.parametrize("name", MODELS)
def test_graph_steps_equal_eager_steps(name):
    """Bitwise where the kernels allow; the bound is 1e-5 relative in float32."""
    graph, eager = _losses(name, graph=True), _losses(name, graph=False)
    assert graph == pytest.approx(eager, rel=1e-5, abs=0)
    assert graph[-1] < graph[0]


def test_runs_on_their_own_streams_equal_runs_alone():
    steps = 20
    alone = []
    for seed in range(3):
        step, order = _setup("mom", True, steps, seed)
        for i in range(steps):
            step([(order[i],)])
        alone.append(_weights(step))
    runs = [_setup("mom", True, steps, seed, stream=torch.cuda.Stream()) for seed in range(3)]
    for i in range(steps):  # stepped in turn, each inside its own stream: their work overlaps on the GPU
        for step, order in runs:
            with torch.cuda.stream(step.stream):
                step([(order[i],)])
    torch.cuda.synchronize()
    assert [_weights(step) for step, _ in runs] == alone
