"""Where a pass over several groups keeps each group's hidden states and residual between layers.

``Model.forward_groups`` runs every group through layer i before layer i + 1, so each group's states
wait between layers. :class:`DeviceStates` keeps them on the compute device. :class:`HostStates`
(the plan's ``prefill_state_place == "host"``) keeps them in host memory, pinned on a GPU: before a
layer runs on a group its states are copied in, and its results are copied out after, on a copy stream
ordered by events, so the next group's upload overlaps the current group's compute and only a few
groups' states are on the device at once. On the CPU the copies are plain tensor copies, in order.

Both are driven the same way: ``get(k)`` before group k runs through a layer, ``put(k, h, residual)``
after, groups in order, layer after layer; ``pick(...)`` after the last layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Embed = Callable[[int], torch.Tensor]  # group index -> its embedded ids [B, T, H] on the compute device
Pick = list[tuple[int, int, int]]  # (group, row in the group, token index)


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

    def pick(self, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual) rows of the tokens ``pick`` names, stacked."""
        return (torch.stack([self.hs[g][r, j] for g, r, j in pick]),
                torch.stack([self.res[g][r, j] for g, r, j in pick]))


class HostStates:
    """Every group's states wait in (pinned) host memory between layers; see the module docstring.

    Layer 0 embeds a group on the device (nothing to copy in); the last layer's results stay on the
    device for the picked tokens only (nothing to copy out). ``moved_bytes`` counts both directions.
    """

    def __init__(self, n_groups: int, embed: Embed, layers: int, pick: Pick, device: torch.device) -> None:
        self.n, self.embed, self.layers, self.device = n_groups, embed, layers, device
        self.copy = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_groups
        self.ready: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = {}
        self.wanted = {(g, r, j) for g, r, j in pick}
        self.last: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.step = 0  # get/put pairs done: layer = step // n, group = step % n
        self.moved_bytes = 0

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer, group = divmod(self.step, self.n)
        assert group == k, "groups run in order, layer after layer"
        nxt_layer, nxt = divmod(self.step + 1, self.n)
        if 0 < nxt_layer < self.layers and nxt != k and nxt not in self.ready:
            self._upload(nxt)  # queued behind the download of the group computed before this one
        if layer == 0:
            return self.embed(k), None
        if k not in self.ready:
            self._upload(k)
        h, res, done = self.ready.pop(k)
        if done is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            h.record_stream(compute)  # allocated on the copy stream, freed after the compute reads it
            res.record_stream(compute)
        return h, res

    def put(self, k: int, h: torch.Tensor, residual: torch.Tensor) -> None:
        layer = self.step // self.n
        self.step += 1
        if layer == self.layers - 1:
            for g, r, j in self.wanted:
                if g == k:
                    self.last[(g, r, j)] = (h[r, j], residual[r, j])
            return
        if self.host[k] is None:
            pin = self.copy is not None
            self.host[k] = (torch.empty(h.shape, dtype=h.dtype, pin_memory=pin),
                            torch.empty(residual.shape, dtype=residual.dtype, pin_memory=pin))
        self.moved_bytes += 2 * h.numel() * h.element_size()
        host_h, host_r = self.host[k]
        if self.copy is None:
            host_h.copy_(h)
            host_r.copy_(residual)
            return
        computed = torch.cuda.Event()
        computed.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy):
            self.copy.wait_event(computed)
            host_h.copy_(h, non_blocking=True)
            host_r.copy_(residual, non_blocking=True)
        h.record_stream(self.copy)  # allocated on the compute stream, freed after the copy reads it
        residual.record_stream(self.copy)

    def _upload(self, k: int) -> None:
        """Queue group k's states to the device (after its last download on the same stream)."""
        host_h, host_r = self.host[k]
        self.moved_bytes += 2 * host_h.numel() * host_h.element_size()
        if self.copy is None:
            self.ready[k] = (host_h.clone(), host_r.clone(), None)
            return
        with torch.cuda.stream(self.copy):
            h = host_h.to(self.device, non_blocking=True)
            res = host_r.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.copy)
        self.ready[k] = (h, res, done)

    def pick(self, pick: Pick) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual) rows of the tokens ``pick`` names, stacked."""
        return (torch.stack([self.last[p][0] for p in pick]), torch.stack([self.last[p][1] for p in pick]))
