"""``devices=measured``: a population of real phones and boards, by their measured inference speed.

Source of the speeds: the Tencent ncnn benchmark's device ranking, ``benchmark/RankCards/README.md`` of
``Tencent/ncnn`` (BSD-3-Clause, Copyright (C) 2017 Tencent), read at commit ``a4d2ea1d4``. For every board
it ranks, RankCards takes the board's best set of ``benchncnn`` timings, divides each model's time by the
reference board's (a Raspberry Pi 5, ratio 1) and averages the ratios: ``ratio`` is how many times longer
the board takes than a Raspberry Pi 5 for the same inference. The numbers below are those facts; the ``kind``
of each device and everything else in this module are ours.

Of the 85 ranked entries, the 48 phones and boards are kept: GPUs, desktops, laptops, servers and virtual
machines are not federated edge devices.

How a ratio becomes the cost model's ``macs_per_s`` (forward MACs per second of training; the cost model
counts a training step as 3x its forward MACs, :data:`maestro_fl.footprint.BACKWARD_FACTOR`):

* **measured**: the Raspberry Pi 5 runs ResNet-18 (1.814 GMAC at 224 x 224, counted by
  ``torch.utils.flop_counter``) in 19.84 ms at best (ncnn ``benchmark/README.md``, fp32, 4 threads), so
  :data:`REFERENCE_INFERENCE_MACS_PER_S` = 9.1e10; a device's inference rate is that over its ratio;
* **assumed**: :data:`TRAINING_EFFICIENCY` = 0.1 of that rate for training. ncnn's timings come from an
  inference engine (Winograd and packed kernels, fused layers, every core); on-device training runs autograd
  fp32 kernels, keeps activations, and as a background task shares cores and the thermal budget. An order of
  magnitude is our assumption, not a measurement; a CSV trace with one's own measured rates replaces it.

Memory, bandwidth and availability are not in the ranking. They are assumptions by tier and kind
(:data:`MEMORY_BY_TIER`, :data:`LINK_BY_KIND`), stated here so that a reader can weigh them: the slowest
boards (Cortex-A7/A9 class) carry 256-512 MB of RAM in all, so a training task gets 64 MB; the fastest,
several GB, of which it gets 1 GB.

Tiers are the speed quintiles of the 48 devices (tier 0 the slowest, as the built-in tiers are numbered), fixed
by the table, not by a draw. :func:`maestro_fl.population.measured_population` gives a federation's clients
their tiers in ``tier_shares``, as for the built-in population, and each a device drawn from its tier's.
This module holds only the table and its mapping (it imports nothing of maestro_fl).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SOURCE = "Tencent ncnn benchmark, benchmark/RankCards/README.md (BSD-3-Clause), commit a4d2ea1d4"

REFERENCE_INFERENCE_MACS_PER_S = 1.814e9 / 19.84e-3  # Raspberry Pi 5: ResNet-18 (1.814 GMAC) in 19.84 ms (ncnn)
TRAINING_EFFICIENCY = 0.1  # assumed (module docstring): training's forward-MAC rate over the inference engine's

#: a training task's memory by speed tier (assumed: the slowest boards have 256-512 MB of RAM in all)
MEMORY_BY_TIER = (64e6, 128e6, 256e6, 512e6, 1e9)
#: (uplink b/s, downlink b/s, availability) by kind (assumed): phones on mixed cellular and Wi-Fi, online when
#: idle and charging about half the time; boards wired or on Wi-Fi and always powered
LINK_BY_KIND = {"phone": (5e6, 20e6, 0.5), "board": (10e6, 50e6, 0.9)}


@dataclass(frozen=True)
class MeasuredDevice:
    """One ranked device: its RankCards name, its time ratio to a Raspberry Pi 5 (lower is faster), its kind."""

    name: str
    ratio: float
    kind: str  # "phone" or "board"

    @property
    def macs_per_s(self) -> float:
        return REFERENCE_INFERENCE_MACS_PER_S / self.ratio * TRAINING_EFFICIENCY


# (RankCards board name, ratio, kind), fastest first, as ranked
_RANKED: tuple[tuple[str, float, str], ...] = (
    ("MediaTek Dimensity 9300 (MT6989)", 0.309, "phone"),
    ("Qualcomm SM8550-AB Snapdragon 8 Gen 2", 0.45, "phone"),
    ("NVIDIA Jetson AGX Orin", 0.485, "board"),
    ("OrangePi5, Rockchip RK3588s", 0.642, "board"),
    ("Qualcomm SM8150-AC Snapdragon 855+", 0.665, "phone"),
    ("Rockchip RK3588", 0.753, "board"),
    ("NVIDIA Jetson Orin Nano", 0.819, "board"),
    ("Raspberry Pi 5, Cortex-A76 (2.4GHz x 4)", 1.0, "board"),
    ("Station-M3/ROC-RK3588S-PC, Rockchip RK3588S (Android)", 1.0, "board"),
    ("NVIDIA Jetson AGX Xavier", 1.05, "board"),
    ("Rockchip RK3588 (Cortex-A76 2.4GHz x 4 + Cortex-A55 1.8GHz x 4)", 1.35, "board"),
    ("NVIDIA Jetson TX2 NX", 1.59, "board"),
    ("Avaota Aim T527, Allwinner T527", 2.28, "board"),
    ("Qualcomm MSM8996 Pro Snapdragon 821", 2.37, "phone"),
    ("NVIDIA Jetson Nano", 2.44, "board"),
    ("Khadas VIM3, Amlogic A311D", 3.48, "board"),
    ("Kirin 970", 3.58, "phone"),
    ("Qualcomm MSM8998 Snapdragon 835", 3.63, "phone"),
    ("Qualcomm MSM6150 Snapdragon 675", 3.75, "phone"),
    ("Qualcomm MSM8994 Snapdragon 810", 3.82, "phone"),
    ("Station P2, Rockchip RK3568", 3.85, "board"),
    ("Rock3A, Rockchip RK3568", 3.86, "board"),
    ("Radxa Zero 3W, Cortex-A55 (1.416 GHz x 4)", 4.5, "board"),
    ("Raspberry Pi 4 Model B, Cortex-A72 (1.8GHz x 4)", 4.95, "board"),
    ("OrangePi4 LTS, Rockchip RK3399", 5.11, "board"),
    ("Rockchip RK3399", 5.16, "board"),
    ("PhytiumPi, Phytium E2000", 5.16, "board"),
    ("Qualcomm SDM660 Snapdragon 660", 5.26, "phone"),
    ("RDK X3 Module (Cortex-A53 1.5GHz x 4)", 5.88, "board"),
    ("Station-M2/ROC-RK3566-PC, Rockchip RK3566 (Android)", 6.51, "board"),
    ("Rockchip RK3288-CG.W (Cortex-A17 1.8GHz x 4)", 6.66, "board"),
    ("Qualcomm MSM8916 Snapdragon 410", 7.63, "phone"),
    ("NanoPi R2S, Rockchip RK3328", 7.66, "board"),
    ("EAIDK 310, Rockchip RK3228H", 8.34, "board"),
    ("OrangePi Zero 2, Allwinner H616", 9.51, "board"),
    ("Raspberry Pi 3 Model B+, Cortex-A53 (1.4GHz x 4)", 9.87, "board"),
    ("iPhone 5S (Apple A7 1.3GHz x 2)", 11.0, "phone"),
    ("MYIR RemiPi, Renesas RZG2L", 11.9, "board"),
    ("Raspberry Pi Zero 2 W, Cortex-A53 (1.0GHz x 4)", 13.7, "board"),
    ("AXERA AX620A (Cortex-A7 1.0GHz x 4)", 18.8, "board"),
    ("Freescale i.MX7 Dual (Cortex A7 1.0GHz x 2)", 26.7, "board"),
    ("Banana Pi M2 Zero 2, AllWinner H2+", 26.8, "board"),
    ("HiSilicon Hi3519V101 (Cortex-A17 1.2GHz x 1)", 36.2, "board"),
    ("Z7-Lite 7020 (Cortex-A9 766MHz x 2)", 43.2, "board"),
    ("Amlogic S805 (Cortex-A5 1.536GHz x 4)", 45.9, "board"),
    ("VisionFive2, JH7110 (SiFive-U74 1.5GHz x 4)", 72.4, "board"),
    ("T-Head TH1520 (C910V 1.848 GHz x 4)", 83.3, "board"),
    ("Ingenic T40XP Xburst2 (1.4Ghz)", 165.0, "board"),
)

MEASURED_DEVICES: tuple[MeasuredDevice, ...] = tuple(MeasuredDevice(*row) for row in _RANKED)
NUM_TIERS = len(MEMORY_BY_TIER)


def tiers_of_table(devices: Sequence[MeasuredDevice] = MEASURED_DEVICES) -> list[list[MeasuredDevice]]:
    """The devices in :data:`NUM_TIERS` speed quintiles, slowest first (sizes differ by at most one)."""
    slowest_first = sorted(devices, key=lambda d: (-d.ratio, d.name))
    return [list(part) for part in np.array_split(np.array(slowest_first, dtype=object), NUM_TIERS)]
