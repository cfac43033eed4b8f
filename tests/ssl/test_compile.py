"""``compile`` as a recipe switch: inductor on CPU, eager losses, one graph, no recompilation."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from terrafm_lightning.ssl.compile import COMPILE_MODES
from terrafm_lightning.ssl.module import TerraFMPretrainModule
from tests.generators.batches import make_batch
from tests.generators.modules import TINY_NETWORKS

TINY = {
    **TINY_NETWORKS,
    "high_frequency_classes": [10, 30],
    "drop_path_rate": 0.0,  # inductor draws its own random numbers: compare without drop-path
}


def test_unknown_compile_mode_is_one_line_naming_the_accepted_ones() -> None:
    message = (
        "compile='fastest' is not a torch.compile mode; use true, false or one of default, "
        "reduce-overhead, max-autotune, max-autotune-no-cudagraphs, lite"
    )
    with pytest.raises(ValueError) as err:
        TerraFMPretrainModule(**{**TINY, "compile": "fastest"})
    assert str(err.value) == message
    # The accepted list is torch's own.
    assert set(COMPILE_MODES) == {"default", *torch._inductor.list_mode_options()}


@pytest.mark.slow
def test_inductor_step_equals_eager_in_one_graph_without_recompiling() -> None:
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    eager = TerraFMPretrainModule(**TINY).train()
    compiled = TerraFMPretrainModule(**{**TINY, "compile": True}).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()  # where Lightning compiles (fullgraph: a graph break raises)
    # Steps whose modality presence differs (make_batch draws it per seed).
    batches = [make_batch(generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert len({tuple(b["student_presence"].flatten().tolist()) for b in batches}) == 3
    graphs = []
    for batch in batches:
        losses = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model._loss(batch, teacher_temp=0.04)["loss"]
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(
            eager.student.named_parameters(), compiled.student.parameters(), strict=True
        ):
            if p.grad is not None:  # float32 rounding of other kernels: relative to the largest
                error = float((q.grad - p.grad).abs().max() / p.grad.abs().max())
                assert error < 1e-5, (name, error)
        graphs.append(counters["stats"]["unique_graphs"])
    # Student and teacher, backbone and head: four graphs, compiled at the first step only.
    assert graphs == [4, 4, 4]
    assert not counters["graph_break"] and not counters["recompiles"]
