"""The guard's re-plan (memory.host_lane) on the inputs of session 40's hog run, simulated: the bf16 7B at 6 GB on
an H100 host (5 resident layers, 23 streamed, lm_head resident, 466 MB a layer, H2D 54.5 GB/s), planned at the host
rate measured without the hog (54.4 GB/s + 0.39 ms a layer), then re-chosen among those host layers at the
21.3 GB/s the lane achieved beside the hog (bench/results/2026-12-05-h100-s40/call6/guard_hog_auto.txt).

    python bench/replan_sim.py
"""

from __future__ import annotations

import dataclasses

from memory.host_lane import LaneInputs, choose_host_layers


def main() -> None:
    layer, resident = 466_000_000, set(range(5))
    streamed = tuple(i for i in range(28) if i not in resident)
    x = LaneInputs(candidates=streamed, layer_bytes=(layer,) * 28, copy_other=0, streamed=streamed,
                   gpu_other=1_100_000_000, h2d_gbps=54.5, hbm_gbps=3000.0, host_gbps=54.4, slots=2,
                   host_extra_s=0.39e-3)
    planned = choose_host_layers(x, "auto")
    print(f"planned at 54.4 GB/s: {len(planned.layers)} host layers {planned.layers}, "
          f"{planned.times.step_s * 1e3:.1f} ms a step against {planned.stream_s * 1e3:.1f} ms streaming")
    again = choose_host_layers(dataclasses.replace(x, candidates=planned.layers, host_gbps=21.3, host_extra_s=0.0),
                               "auto")
    print(f"re-planned at 21.3 GB/s: {len(again.layers)} host layers {again.layers}, "
          f"{again.times.step_s * 1e3:.1f} ms a step against {again.stream_s * 1e3:.1f} ms streaming")


if __name__ == "__main__":
    main()
