"""--compile as the release ships it: on by default on CUDA, each transformer block and the final layer compiled (the
condition embedder eager), every graph compiled once (training, then validation and sampling, whose last partial
batches and CFG-doubled batches reuse it), no graph break, class and -Text models. torch.compile is traced by dynamo
into graphs that run eagerly: inductor's cold compile (~25 s per graph here) would test torch, not this repository."""
import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import bench
import engine_jit
import main_jit
import util.misc as misc
from denoiser import Denoiser
from model_jit import JiT
from test_training_loop import image_folder, run_main  # noqa: F401 (a fixture)
from util import fid
from util.checkpoint import read_checkpoint


@pytest.fixture
def graphs(monkeypatch):
    """The graphs dynamo compiles from now on (torch.compile with a backend that records them and runs them
    eagerly), in a fresh dynamo cache; hitting the recompile limit is an error, not a silent fall back to eager."""
    compiled = []

    def backend(graph, example_inputs):
        compiled.append(graph)
        return graph.forward

    torch_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, *args, **kwargs: torch_compile(fn, *args,
                                                                                     **{**kwargs, "backend": backend}))
    config = torch._dynamo.config
    torch._dynamo.reset()
    counters.clear()
    # what compile_network sets is restored after the test
    with config.patch(recompile_limit=config.recompile_limit, optimize_ddp=config.optimize_ddp,
                      fail_on_recompile_limit_hit=True):
        yield compiled
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture
def net_calls(graphs, monkeypatch):
    """Every call of the JiT network from now on: (training or sampling, batch size, graphs compiled in the call)."""
    calls = []
    forward = JiT.forward

    def watched(net, x, t, y):
        before = len(graphs)
        out = forward(net, x, t, y)
        calls.append(("training" if torch.is_grad_enabled() and net.training else "sampling", x.shape[0],
                      len(graphs) - before))
        return out

    monkeypatch.setattr(JiT, "forward", watched)
    return calls


def test_compile_is_on_by_default_on_cuda_only(monkeypatch):
    """--compile defaults to on for CUDA and off elsewhere (a CPU would pay minutes of compilation); --compile and
    --no-compile win over the default. CUDA also turns cuDNN's autotuner on, as the release; TF32 matmuls stay off."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cases = [("cpu", [], False), ("mps", [], False), ("cpu", ["--compile"], True), ("cuda", [], True),
             ("cuda", ["--no-compile"], False)]
    for device, flags, expected in cases:
        args = main_jit.get_args_parser().parse_args(flags)
        misc.configure_kernels(args, torch.device(device))
        assert args.compile is expected, (device, flags)
        assert torch.backends.cudnn.benchmark is (device == "cuda"), (device, flags)
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow
def test_a_compiled_run_compiles_each_graph_once(image_folder, tmp_path, net_calls, graphs, monkeypatch):  # noqa: F811
    """main_jit.py --compile: the blocks and the final layer are compiled in place (the checkpoint keeps the official
    keys). Training compiles three graphs (blocks before the in-context tokens, blocks after them, the final layer)
    at its first step; validation and sampling three more at their first batch, which every later batch reuses:
    the last partial ones of validation (5 images in batches of 3) and of sampling (10 in batches of 4) and CFG's
    doubled batch. No graph break; the limit raised to the release's 128."""
    stats = tmp_path / "stats.npz"
    fid.save_stats(stats, {"mu": np.zeros(2048), "sigma": np.eye(2048)})
    compiled = []
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append(type(module).__name__)
                        or compile_module(module, **kwargs))
    args = run_main(["--compile", "--data_path", image_folder[0], "--output_dir", tmp_path, "--batch_size", 3,
                     "--num_workers", 0, "--epochs", 2, "--val_fraction", 0.3125, "--online_eval", "--eval_freq", 1,
                     "--fid_stats", stats, "--num_images", 10, "--gen_bsz", 4, "--num_sampling_steps", 3,
                     "--sampling_method", "euler", "--cfg", 2.0, "--interval_min", 0.3], monkeypatch)
    assert compiled == ["JiTBlock"] * 6 + ["FinalLayer"]
    assert list(read_checkpoint(tmp_path / "checkpoint-last.pth")["model"]) == list(Denoiser(args).state_dict())
    # 11 training images in batches of 3: 3 steps per epoch; 5 held out; 10 sampled in batches of 4, 3 Euler steps
    # with CFG (a doubled batch) at t = 1/3 and 2/3
    sampling = [("sampling", batch) for size in (4, 4, 2) for batch in (size, 2 * size, 2 * size)]
    epoch = [("training", 3)] * 3 + [("sampling", 3), ("sampling", 2)] + sampling
    assert [call[:2] for call in net_calls] == epoch + epoch
    assert [call[2] for call in net_calls] == [3] + [0] * 2 + [3] + [0] * (len(net_calls) - 4)
    assert len(graphs) == 6 and not counters["graph_break"]
    assert torch._dynamo.config.recompile_limit == 128 and torch._dynamo.config.optimize_ddp is False


@pytest.mark.parametrize("conditioning", ["pooled", "tokens"])
def test_a_compiled_text_model_has_no_graph_break(make_args, tiny_llm_path, tmp_path, net_calls, graphs,
                                                  conditioning, monkeypatch):
    """-Text models, in bf16 autocast as on a GPU: the caption lookup (.tolist()) stays outside the compiled blocks,
    so there is no graph break; training steps, then sampling (5 prompts in batches of 3, CFG) compile three graphs
    each, once."""
    monkeypatch.setenv("JIT_CACHE_DIR", str(tmp_path / "cache"))
    args = make_args("--model", "JiT-T/4-Text", "--llm_model_name", tiny_llm_path, "--text_conditioning",
                     conditioning, "--gen_bsz", "3", "--num_sampling_steps", "3", "--sampling_method", "euler",
                     "--cfg", "2.0", "--interval_min", "0.3", "--precision", "bf16")
    torch.manual_seed(0)
    model = Denoiser(args)
    model.net.y_embedder.use_captions(["赤い丸の写真", "a green triangle", "青い空と白い雲", "犬の写真"],
                                      show_progress=False)
    misc.compile_network(model.net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        x = torch.rand(4, 3, 32, 32) * 2 - 1
        engine_jit.train_step(model, model, optimizer, x, torch.tensor([0, 1, 2, step]), args.precision)
    batches = []
    engine_jit.generate_uint8(model, torch.tensor([0, 1, 2, 3, 1]), torch.device("cpu"), args,
                              lambda images, labels: batches.append(images.shape))
    assert not counters["graph_break"]
    assert batches == [(3, 3, 32, 32), (2, 3, 32, 32)]
    assert [call[2] for call in net_calls] == [3, 0, 0, 3] + [0] * (len(net_calls) - 4)
    assert {call[:2] for call in net_calls} == {("training", 4), ("sampling", 3), ("sampling", 6), ("sampling", 2),
                                                ("sampling", 4)}
    assert len(graphs) == 6


def test_bench_compiles_what_main_compiles(graphs, monkeypatch):
    """bench.py --compile times the network main_jit.py trains: the same blocks and final layer compiled."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append(type(module).__name__))
    args = bench.parse_args(["--model", "JiT-T/4", "--img_size", "32", "--class_num", "10", "--compile"])
    bench.build(args, torch.device("cpu"))
    assert compiled == ["JiTBlock"] * 6 + ["FinalLayer"]
