"""Regional compilation (model.compile): the compiled blocks compute what eager blocks compute, and routing's
data-dependent shapes never cause a recompile."""
import torch
from torch._dynamo.testing import CompileCounter

from rtdist.config import ModelConfig
from rtdist.model import RoutingTransformerLM, lm_loss
from rtdist.parallel.checkpointing import apply_activation_checkpointing
from rtdist.parallel.compile import apply_compile, compile_enabled


def test_auto_compiles_on_cuda_only():
    assert compile_enabled("auto", torch.device("cuda")) and not compile_enabled("auto", torch.device("cpu"))
    assert compile_enabled(True, torch.device("cpu")) and not compile_enabled(False, torch.device("cuda"))


def test_compiled_blocks_equal_eager_and_compile_once_whatever_the_routing():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_local_attn_heads=2, window_size=8,
                      num_clusters=3)
    torch.manual_seed(0)
    eager, compiled = RoutingTransformerLM(cfg), RoutingTransformerLM(cfg)
    compiled.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(compiled, 1)  # compilation reaches inside the checkpoint wrappers
    counter = CompileCounter()  # captures graphs and runs them as captured: no inductor, same numerics
    torch._dynamo.reset()
    assert apply_compile(compiled, backend=counter) == 3
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # new tokens each step: new clusters, new block counts
        x = torch.randint(0, cfg.vocab_size, (2, 48), generator=g)
        for model in (eager, compiled):
            logits, aux = model(x)
            (lm_loss(logits[:, :-1], x[:, 1:]) + aux).backward()
            model.update_kmeans()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
        eager.zero_grad()
        compiled.zero_grad()
    assert counter.frame_count == 1  # one graph for every block and every step
