"""The samplers' speed options: --compile / --cuda-graph resolution on any machine, and on a CUDA
machine (the GPU runs of issue 13) CUDA-graph replays that equal eager sampling."""

from __future__ import annotations

import argparse

import pytest
import torch

from conftest import TINY_PIXEL_KWARGS, randomize
from diffusion import create_diffusion
from runtime.checkpoints import ModelSpec
from runtime.cli import add_speed_arguments, speed_up_sampling
from runtime.errors import UserError
from runtime.sampling import SampleNoise, StepGraphs, generate

CUDA = torch.cuda.is_available()


def speed_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_speed_arguments(parser)
    return parser.parse_args(list(argv))


def test_speed_options_default_to_off_on_the_cpu(tiny_pixel_model):
    forward = tiny_pixel_model.blocks[0].forward
    assert speed_up_sampling(tiny_pixel_model, speed_args(), torch.device("cpu"), log=lambda _: None) is None
    assert tiny_pixel_model.blocks[0].forward == forward and tiny_pixel_model.blocks[0]._compiled_call_impl is None


def test_cuda_graphs_on_the_cpu_are_refused_in_one_line(tiny_pixel_model):
    with pytest.raises(UserError, match="--cuda-graph needs a CUDA device"):
        speed_up_sampling(tiny_pixel_model, speed_args("--cuda-graph"), torch.device("cpu"), log=lambda _: None)


def test_compile_can_be_asked_for_on_the_cpu(tiny_pixel_model):
    assert speed_up_sampling(tiny_pixel_model, speed_args("--compile"), torch.device("cpu"), log=lambda _: None) is None
    assert all(block._compiled_call_impl is not None for block in tiny_pixel_model.blocks)


def tiny_samples(model, graphs, device, count=4, cfg_scale=1.5):
    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None)
    noise = SampleNoise(0, range(count), (spec.in_channels, spec.input_size, spec.input_size), device)
    return generate(model, create_diffusion("6"), noise.labels(10), noise, cfg_scale, graphs=graphs)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("cfg_scale", [1.0, 1.5])
def test_graph_replays_give_the_eager_samples(cfg_scale):
    model = randomize(ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS), vae=None).build()).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    eager = tiny_samples(model, None, "cuda", cfg_scale=cfg_scale)
    graphs = StepGraphs()
    replayed = tiny_samples(model, graphs, "cuda", cfg_scale=cfg_scale)
    again = tiny_samples(model, graphs, "cuda", count=3, cfg_scale=cfg_scale)  # a second shape: a second graph
    assert len(graphs) == 2
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, tiny_samples(model, None, "cuda", count=3, cfg_scale=cfg_scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_captures_hold_no_memory_once_their_graphs_are_gone():
    """Every capture warms up on one side stream per device (sampling.warmup_stream): the memory
    allocated after a third StepGraphs with a cuBLAS call is freed is that after the first."""
    import gc

    weight = torch.randn(256, 256, device="cuda")

    def captured_once() -> int:
        graphs = StepGraphs()
        graphs(lambda x: x @ weight, "matmul", torch.randn(64, 256, device="cuda"))
        del graphs
        gc.collect()
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    first = captured_once()
    assert captured_once() == captured_once() == first


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU")
def test_graph_replays_of_the_int8_kernels_give_the_eager_samples():
    from quant.backends import prepare_for_inference
    from quant.calibrate import CalibrationRun
    from quant.config import QuantConfig
    from quant.pipeline import quantize_dit

    spec = ModelSpec(dit_kwargs=dict(TINY_PIXEL_KWARGS, hidden_size=128), vae=None)
    model = randomize(spec.build()).cuda()
    run = CalibrationRun(list(range(10)), 1.5, 4, 0)
    model, _ = quantize_dit(model, QuantConfig(), run, torch.device("cuda"), progress=False)
    prepare_for_inference(model, "triton", torch.bfloat16, log=lambda _: None)
    noise = SampleNoise(0, range(4), (1, 8, 8), "cuda")
    labels = noise.labels(10)
    eager = generate(model, create_diffusion("6"), labels, SampleNoise(0, range(4), (1, 8, 8), "cuda"), 1.5)
    replayed = generate(model, create_diffusion("6"), labels, SampleNoise(0, range(4), (1, 8, 8), "cuda"), 1.5,
                        graphs=StepGraphs())
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
