"""Checkpoint size and sample effect of storing a quantized checkpoint's floating-point parts in
the source checkpoint's dtype (bf16 for the demo) instead of float32 (issue 14).

    python -m benchmarks.storage_dtype                 # CPU is fine: about 2 minutes on 2 cores

Quantizes the demo DiT once (W4A8, --adaln-bit 8 and none), saves it both ways, reloads each with
the `fake` backend and samples the same noise: PSNR of the bf16-stored samples against the
float32-stored ones and against the FP model. Rows appended to benchmarks/results/storage.jsonl.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.rowlog import RowLog, card_of, provenance
from diffusion import create_diffusion
from evaluation.metrics import psnr
from quant.calibrate import CalibrationRun, default_calibration_labels
from quant.checkpoint import WEIGHTS_FILE, load_quantized, save_quantized
from quant.config import QuantConfig
from quant.pipeline import quantize_dit
from runtime.checkpoints import load_model_and_dtype, resolve_spec
from runtime.sampling import sample_uint8


def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    device = torch.device(args.device)
    spec = resolve_spec(None, None, args.ckpt)
    log = RowLog(args.output, common=provenance(card_of(device)))
    diffusion = create_diffusion(str(args.num_sampling_steps))
    source_bytes = Path(args.ckpt).stat().st_size

    def samples(model):
        return sample_uint8(model, diffusion, None, spec, range(args.num_samples), 0, 1.5, device=device)[0]

    fp_model, source_dtype = load_model_and_dtype(spec, args.ckpt, device)
    fp = samples(fp_model)
    run = CalibrationRun(default_calibration_labels(spec.num_classes), 1.5, args.num_sampling_steps, 0)
    for adaln_bits in (8, None):
        config = QuantConfig(adaln_weight_bits=adaln_bits)
        start = time.perf_counter()
        model, _ = quantize_dit(load_model_and_dtype(spec, args.ckpt, device)[0], config, run, device,
                                progress=False)
        quant_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as folder:
            images, sizes = {}, {}
            for dtype in (torch.float32, source_dtype):
                path = Path(folder) / str(dtype)
                save_quantized(path, model, config, spec, storage_dtype=dtype)
                sizes[dtype] = (path / WEIGHTS_FILE).stat().st_size
                images[dtype] = samples(load_quantized(path, device)[0])
        log.add({"setting": config.label, "adaln_bit": adaln_bits, "source_MB": source_bytes / 1e6,
                 "source_dtype": str(source_dtype), "float32_MB": sizes[torch.float32] / 1e6,
                 "source_dtype_MB": sizes[source_dtype] / 1e6, "vs_source": sizes[source_dtype] / source_bytes,
                 "num_samples": args.num_samples, "steps": args.num_sampling_steps,
                 "psnr_source_dtype_vs_float32": psnr(images[source_dtype], images[torch.float32]),
                 "psnr_float32_vs_fp": psnr(images[torch.float32], fp),
                 "psnr_source_dtype_vs_fp": psnr(images[source_dtype], fp), "quant_s": quant_s})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="assets/demo/dit_fmnist.safetensors")
    parser.add_argument("--num-samples", type=int, default=20)
    parser.add_argument("--num-sampling-steps", type=int, default=20, help="calibration and sampling steps")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "storage.jsonl"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


if __name__ == "__main__":
    main(parse_args())
