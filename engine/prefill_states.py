"""Where a pass over several groups keeps each group's hidden states and residual between layers.

``Model.forward_groups`` runs every group through layer i before layer i + 1, so each group's states
wait between layers. :class:`DeviceStates` keeps them on the compute device. :class:`HostStates`
(the plan's ``prefill_state_place == "host"``) keeps them in host memory, pinned on a GPU: before a
layer runs on a group its states are copied in, and its results are copied out after, on a copy stream
ordered by events (:class:`StreamLane`), so the next group's upload overlaps the current group's compute
and a fixed number of groups' states are on the device at once (the planner's count: see ``HostStates``).
On the CPU the copies are plain tensor copies, in order (:class:`ImmediateLane`).

Both are driven the same way: ``get(k)`` before group k runs through a layer, ``put(k, h, residual)``
after, groups in order, layer after layer; ``close()`` after the last layer (or an error), then
``pick(...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch

from engine.state_parking import Parking, pairs
from memory.footprint import HOST_STATE_RING

Buffer = torch.Tensor | list[torch.Tensor]  # a host tensor, or a parked buffer's pieces (engine.state_parking)
Embed = Callable[[int], torch.Tensor]  # group index -> its embedded ids [B, T, H] on the compute device
Pick = list[tuple[int, int, int]]  # (group, row in the group, token index)


def interleave_weights() -> bool:
    """Whether a pass with host states has the weight streamer hold its copies and issue each group's share
    after that group's states (default; ``LAYERSTREAM_PUMP_WEIGHTS=0`` turns it off): a copy engine that
    serves queued copies in order then never puts a whole layer's weights ahead of the states the next
    group's compute waits for. On an H200 it cut a long prompt's prefill with host states by 9-27%."""
    return os.environ.get("LAYERSTREAM_PUMP_WEIGHTS", "1") == "1"


class DeviceStates:
    """Every group's states stay on the compute device between layers."""

    moved_bytes = 0  # nothing crosses to the host

    def __init__(self, n_groups: int, embed: Embed) -> None:
        self.hs = [embed(k) for k in range(n_groups)]
        self.res: list[torch.Tensor | None] = [None] * n_groups

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.hs[k], self.res[k]

    def put(self, k: int, h: torch.Tensor, residual: torch.Tensor) -> None:
        self.hs[k], self.res[k] = h, residual

    def close(self) -> None:
        """Nothing in flight."""

    def pick(self, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual) rows of the tokens ``pick`` names, stacked."""
        return (torch.stack([self.hs[g][r, j] for g, r, j in pick]),
                torch.stack([self.res[g][r, j] for g, r, j in pick]))


class CopyLane(Protocol):
    """Where HostStates' copies between host and device run, and how their ends are waited for."""

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], out: bool = False, after: object = None) -> object:
        """Queue ``dst.copy_(src)`` for each (dst, src), after the compute work queued so far and the copies
        ``after`` marks; ``out``: device to host. A marker of their end for ``compute_waits`` / ``host_waits``."""

    def compute_waits(self, done: object) -> None:
        """Compute queued from now on starts after the copies ``done`` marks."""

    def host_waits(self, done: object) -> None:
        """Return once the copies ``done`` marks have finished."""

    def drain(self) -> None:
        """Return once every queued copy has finished."""


class StreamLane:
    """CUDA copy streams, ordered against the compute stream by events: one for both directions, or
    (``split``) copies out on their own stream, so that they never wait behind copies in (which share
    the host-to-device engine with the weight stream)."""

    def __init__(self, device: torch.device, split: bool = False) -> None:
        self.device, self.stream = device, torch.cuda.Stream(device)
        self.out_stream = torch.cuda.Stream(device) if split else self.stream
        self.compute = torch.cuda.current_stream(device)  # a pass runs on one stream (looked up once: not cheap)

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], out: bool = False,
             after: torch.cuda.Event | None = None) -> torch.cuda.Event:
        stream = self.out_stream if out else self.stream
        computed = torch.cuda.Event()
        computed.record(self.compute)
        with torch.cuda.stream(stream):
            stream.wait_event(computed)
            if after is not None:
                stream.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def compute_waits(self, done: torch.cuda.Event) -> None:
        self.compute.wait_event(done)

    def host_waits(self, done: torch.cuda.Event) -> None:
        done.synchronize()

    def drain(self) -> None:
        self.stream.synchronize()
        self.out_stream.synchronize()


class ImmediateLane:
    """The CPU: every copy is done when it is queued."""

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], out: bool = False, after: None = None) -> None:
        if pairs:  # one multi-tensor launch on a GPU: parked states come in hundreds of pieces (a server's short tails)
            torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])

    def compute_waits(self, done: None) -> None:
        pass

    def host_waits(self, done: None) -> None:
        pass

    def drain(self) -> None:
        pass


class HostStates:
    """Every group's states wait in (pinned) host memory between layers; see the module docstring.

    Layer 0 embeds a group on the device (nothing to copy in); the last layer's results stay on the
    device for the picked tokens only (nothing to copy out). ``moved_bytes`` counts both directions.

    The device side is bounded by construction. A group's states are copied into one of two staging
    buffers (hidden and residual, sized for the largest group) that steps use in turn; the copy waits
    for the compute that last read the buffer. A layer's outputs are held until their copy out has
    finished and dropped before the compute two steps on allocates its own, so no device tensor
    outlives its use through a pending copy and the host never runs more than two steps ahead of the
    copies. Besides the computing group's input and output, at most one group's states are being
    copied in and one copied out (one group: none; it waits for its own copies).
    """

    def __init__(self, shapes: list[tuple[int, int]], embed: Embed, layers: int, pick: Pick,
                 device: torch.device, lane: CopyLane | None = None, park: Parking | None = None) -> None:
        self.shapes, self.n, self.embed, self.layers, self.device = shapes, len(shapes), embed, layers, device
        split = os.environ.get("LAYERSTREAM_STATE_LANES", "1") == "2"
        # parked (engine.state_parking): the states wait in unreached KV positions, copied on the device in
        # the compute stream's order; else in host memory, copied on a copy stream
        self.park = park
        self.lane = lane or (StreamLane(device, split) if device.type == "cuda" and park is None else ImmediateLane())
        self.state_shape: dict[int, tuple[torch.Size, torch.dtype]] = {}  # group -> its states' shape and dtype
        self.ring = min(self.n, HOST_STATE_RING)  # staging buffers, and steps between an output and its release
        self.copied_out: dict[int, object] = {}  # group -> marker of its last copy out (its host states')
        self.host: list[tuple[Buffer, Buffer] | None] = [None] * self.n  # each group's states between layers
        self.slots: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.ring
        self.uploaded: dict[int, object] = {}  # step -> marker of its copy into its staging buffer
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor, object]] = {}  # step -> outputs being copied out
        self.wanted = {(g, r, j) for g, r, j in pick}
        self.last: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = 0  # get/put pairs done: layer = step // n, group = step % n
        self.moved_bytes = 0

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        s = self.step
        layer, group = divmod(s, self.n)
        assert group == k, "groups run in order, layer after layer"
        self._release(s - self.ring)  # before this step's compute allocates its outputs
        if layer > 0 and s not in self.uploaded:
            self._upload(s)
        if self.n > 1 and self.n <= s + 1 < self.layers * self.n:
            self._upload(s + 1)  # overlaps this step's compute; its source was copied out at step s + 1 - n
        if layer == 0:
            return self.embed(k), None
        self.lane.compute_waits(self.uploaded.pop(s))
        return self._staging(s)

    def put(self, k: int, h: torch.Tensor, residual: torch.Tensor) -> None:
        s = self.step
        self.step += 1
        if s // self.n == self.layers - 1:
            for g, r, j in self.wanted:
                if g == k:  # a copy: a view would keep the whole group's states alive
                    self.last[(g, r, j)] = (h[r, j].clone(), residual[r, j].clone())
            return
        if self.host[k] is None:
            self.state_shape[k] = (h.shape, h.dtype)
            if self.park is not None:
                self.host[k] = (self.park.take(h.numel()), self.park.take(residual.numel()))
            else:
                pin = self.device.type == "cuda"
                self.host[k] = (torch.empty(h.shape, dtype=h.dtype, pin_memory=pin),
                                torch.empty(residual.shape, dtype=residual.dtype, pin_memory=pin))
        host_h, host_r = self.host[k]
        if self.park is None:
            self.moved_bytes += 2 * h.numel() * h.element_size()
        done = self.lane.copy(pairs(host_h, h) + pairs(host_r, residual), out=True)
        self.held[s], self.copied_out[k] = (h, residual, done), done

    def close(self) -> None:
        """Wait for every queued copy and drop the device buffers (also after an error, before they are freed)."""
        self.lane.drain()
        self.held.clear()
        self.uploaded.clear()
        self.copied_out.clear()
        self.slots = [None] * self.ring

    def pick(self, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual) rows of the tokens ``pick`` names, stacked."""
        return (torch.stack([self.last[p][0] for p in pick]), torch.stack([self.last[p][1] for p in pick]))

    def _release(self, s: int) -> None:
        """Drop step s's outputs once their copy out has finished (the host waits for it)."""
        if (held := self.held.pop(s, None)) is not None:
            self.lane.host_waits(held[2])

    def _upload(self, s: int) -> None:
        """Queue the copy of step s's group into its staging buffer (after the compute that read it last)."""
        host_h, host_r = self.host[s % self.n]
        h, res = self._staging(s)
        self.uploaded[s] = self.lane.copy(pairs(h, host_h) + pairs(res, host_r), after=self.copied_out.get(s % self.n))
        if self.park is None:
            self.moved_bytes += 2 * h.numel() * h.element_size()

    def _staging(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step s's staging buffer, as the (hidden, residual) shapes of its group."""
        shape, dtype = self.state_shape[s % self.n]
        i = s % self.ring
        if self.slots[i] is None:
            size = max(b * t for b, t in self.shapes) * shape[-1]
            self.slots[i] = tuple(torch.empty(size, dtype=dtype, device=self.device) for _ in range(2))
        return tuple(buf[: shape.numel()].view(shape) for buf in self.slots[i])
