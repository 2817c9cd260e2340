"""Noise schedules and timestep respacing (the ADM/DiT conventions)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """float64 betas of a named schedule.

    "linear": Ho et al.'s 1e-4 … 0.02 over 1000 steps, rescaled so other lengths match it in the
    limit. "squaredcos_cap_v2": the cosine schedule of Nichol & Dhariwal.
    """
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise ValueError(f"unknown beta schedule {schedule_name!r}; use 'linear' or 'squaredcos_cap_v2'")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Betas that discretise a cumulative alpha_bar(t), t in [0, 1], capped at `max_beta`."""
    steps = np.arange(num_diffusion_timesteps)
    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
            for i in steps
        ],
        dtype=np.float64,
    )


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The timesteps of the original process that a respaced process keeps.

    `section_counts` splits the process into equal sections and takes that many evenly strided
    steps from each: "250" takes 250 steps overall, "10,15,20" takes 10, 15 and 20 from three
    thirds. "ddimN" takes the DDIM paper's fixed integer stride giving exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Python's round() (half to even) on the accumulated float stride, as the reference does.
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)
