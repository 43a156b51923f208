"""Device-side grouping of slots by group id for the Triton kernels: no host sync, no loop over groups.

A slot is one (token, choice) pair: slot s = t * k + j has group indices[t, j]. The kernels work
on the slots sorted by group ("sorted rows"): group g owns sorted rows [offsets[g], offsets[g+1]).
Everything here is a handful of torch ops on the device (a stable sort and searchsorted), whose
sizes depend only on T, k and G, so nothing waits for the GPU:

- `offsets` from searchsorted on the sorted ids (no bincount: CUDA bincount reads the max on the host);
- per-tile maps for a tile height BLOCK_M: tile i belongs to group tile_group[i] and starts at
  sorted row tile_row[i]; groups are padded to whole tiles. The number of tiles is data dependent,
  so the map is sized by the upper bound cdiv(M, BLOCK_M) + min(G, M) (each non-empty group wastes
  at most one partial tile) and surplus entries carry group id G, which makes their programs exit.

For decode sizes (T*k <= DIRECT_MAX_SLOTS, G <= DIRECT_MAX_GROUPS) the plan is `direct`: nothing
is sorted and no grouping op runs; the forward GEMMs then take one program per group that masks
the slots routed to it (launch latency, not bandwidth, is what counts at that size).

Out-of-range ids (only possible when the range check was skipped, under torch.compile or CUDA-graph
capture) belong to no tile: the sort puts them before offsets[0] or after offsets[G], the counting
sort leaves them uncounted and unplaced. No kernel ever reads through them.

Two implementations of that interface:
- `DeviceGrouping`: a stable sort (torch ops). Rows of a group keep slot order, which the backward's
  weight-gradient sums need to give the same bits every run.
- `CountedGrouping`: a counting sort in three small Triton launches (count, scan + tile map,
  scatter) instead of a dozen torch ops around a radix sort: what the forward passes use, where
  host time per launch is what large-T FFF layers wait on. Rows within a group come in whatever
  order the atomics give; forward rows are computed independently, so no result changes. Small
  problems (`sorts_in_one_launch`: up to 1024 slots and 512 groups) are grouped by one program
  instead, a sort of (group, slot) keys (stable order), in one launch and no memset: at those sizes
  the host's cost per launch (tens of microseconds) is far more than the GPU's work.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import cdiv, new_output, next_pow2
from .._triton import interpreting
from .triton_kernels import group_count_kernel, group_plan_kernel, group_scatter_kernel, group_sort_kernel


#: largest slot count (T*k) and group count for the direct (sort-free) forward plan
DIRECT_MAX_SLOTS = 64
DIRECT_MAX_GROUPS = 1024


#: group counts up to this use the per-block one-hot counts (one atomic per group and block)
SMALL_GROUPS = 64

#: largest slot and group counts that one program groups (group_sort_kernel); the histogram's bins
#: stay within the range Triton's own tests cover (up to 512)
ONE_LAUNCH_MAX_SLOTS = 1024
ONE_LAUNCH_MAX_GROUPS = 512


#: groups per program of group_plan_kernel. Each program first sums the counts of all blocks before
#: its own (G / BLOCK_G loads): cheap on a GPU, but the interpreter pays per block op, ~1 s a program
#: at G = 65536 with 1024 lanes; there wider blocks run the same code with 16x fewer programs
PLAN_BLOCK_G, PLAN_BLOCK_G_INTERPRETED = 1024, 16384


def sorts_in_one_launch(num_slots: int, num_groups: int) -> bool:
    """Whether CountedGrouping groups this problem in one launch (group_sort_kernel), needing no counts."""
    return num_slots <= ONE_LAUNCH_MAX_SLOTS and num_groups <= ONE_LAUNCH_MAX_GROUPS


def _int32_parts(device: torch.device, *sizes: int) -> list[torch.Tensor]:
    """int32 tensors of these sizes carved from one allocation (one allocator call instead of one
    each), each starting on a 16-byte boundary as a fresh tensor would (Triton specializes on it)."""
    starts, total = [], 0
    for size in sizes:
        starts.append(total)
        total += -(-size // 4) * 4
    whole = new_output((total,), torch.int32, device)
    # one slice each: half the host time of split() and then a slice of each part (this is per call)
    return [whole[start:start + size] for start, size in zip(starts, sizes)]


class DeviceGrouping:
    """Slots of `indices` [T, k] sorted by group on the device (see module docstring)."""

    def __init__(self, indices: torch.Tensor, num_groups: int, direct: bool = False):
        t, k = indices.shape
        self.num_tokens, self.topk, self.num_groups = t, k, num_groups
        self.num_slots = t * k
        self.ids = indices.reshape(-1).contiguous()  # int64 [M], slot order (kernels read it densely)
        #: decode-size plan: no sort at all, the GEMM kernel masks slots per group (see triton_kernels)
        self.direct = direct
        if direct:
            return
        dev = indices.device
        sorted_ids, order = torch.sort(indices.reshape(-1).to(torch.int64), stable=True)
        bounds = torch.searchsorted(sorted_ids, torch.arange(num_groups + 1, device=dev, dtype=torch.int64))
        self.order = order  # int64 [M]: slot at each sorted row
        self.sorted_slot = order.to(torch.int32)
        self.offsets64 = bounds  # int64 [G + 1]
        self.offsets = bounds.to(torch.int32)
        self.sorted_group = sorted_ids.clamp(0, num_groups - 1)  # int64 [M] (clamped: safe as an index)
        self._tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nonempty: torch.Tensor | None = None

    @property
    def sorted_token(self) -> torch.Tensor:
        """int64 [M]: token of each sorted row."""
        return self.order // self.topk

    def max_tiles(self, block_m: int) -> int:
        return cdiv(self.num_slots, block_m) + min(self.num_groups, self.num_slots)

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_group, tile_row), int32 [max_tiles(block_m)]; tile_group == G marks a surplus tile."""
        if block_m not in self._tiles:
            g = self.num_groups
            counts = self.offsets64[1:] - self.offsets64[:-1]
            per_group = (counts + block_m - 1) // block_m
            tile_end = torch.cumsum(per_group, 0)
            ids = torch.arange(self.max_tiles(block_m), device=counts.device, dtype=torch.int64)
            tile_group = torch.searchsorted(tile_end, ids, right=True)
            gc = tile_group.clamp(max=g - 1)
            tile_row = self.offsets64[gc] + (ids - (tile_end[gc] - per_group[gc])) * block_m
            self._tiles[block_m] = (tile_group.to(torch.int32), tile_row.to(torch.int32))
        return self._tiles[block_m]

    def nonempty_groups(self) -> torch.Tensor:
        """int32 [min(G, M)]: the ids of the non-empty groups in order, padded with G."""
        if self._nonempty is None:
            counts = self.offsets64[1:] - self.offsets64[:-1]
            running = torch.cumsum(counts > 0, 0)
            n = min(self.num_groups, self.num_slots)
            want = torch.arange(1, n + 1, device=counts.device, dtype=running.dtype)
            self._nonempty = torch.searchsorted(running, want).to(torch.int32)
        return self._nonempty


class CountedGrouping:
    """Slots of `indices` [T, k] grouped by a counting sort on the device (see module docstring).

    `state` (from `new_state`): int32 [2G], per-group counts then per-group cursors, zeroed in one
    memset. A producer of the ids may fill the counts as it makes them (the tree walk counts leaves
    as it routes), which saves the counting launch; without `state` the ids are counted here, or,
    for a small problem (sorts_in_one_launch), sorted by one program that also counts.
    `block_m` lays out the first tile map in the same launch as the offsets; `one_launch` forces the
    choice between the two (tests run both on the same ids). Same attributes as
    DeviceGrouping's forward use, plus `counts`; no `order`/`sorted_token` (the backward sorts).
    """

    direct = False
    _BLOCK = 256  # slots per program of the count and scatter launches

    @staticmethod
    def new_state(num_groups: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(2 * num_groups, dtype=torch.int32, device=device)

    def __init__(self, indices: torch.Tensor, num_groups: int, state: Optional[torch.Tensor] = None,
                 block_m: Optional[int] = None, one_launch: Optional[bool] = None):
        t, k = indices.shape
        self.num_tokens, self.topk, self.num_groups = t, k, num_groups
        self.num_slots = m = t * k
        self.ids = indices.reshape(-1).contiguous()
        dev = indices.device
        self._tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if one_launch is None:
            one_launch = state is None and sorts_in_one_launch(m, num_groups)
        if one_launch:
            if state is not None or not sorts_in_one_launch(m, num_groups):
                raise ValueError(f"the one-launch grouping takes no counts, at most {ONE_LAUNCH_MAX_SLOTS} slots "
                                 f"and {ONE_LAUNCH_MAX_GROUPS} groups")
            self._sort_in_one_launch(block_m or 64)
            return
        small = next_pow2(num_groups) if num_groups <= SMALL_GROUPS else 0
        grid = (cdiv(m, self._BLOCK),)
        counted = state is not None
        if state is None:
            state = self.new_state(num_groups, dev)
        self.counts, cursor = state[:num_groups], state[num_groups:]
        if not counted:
            group_count_kernel[grid](self.ids, self.counts, m, num_groups, BLOCK=self._BLOCK, SMALL_G=small)
        self.offsets = torch.empty(num_groups + 1, dtype=torch.int32, device=dev)
        self._plan(block_m or 64, write_offsets=True)
        self.sorted_slot = torch.empty(m, dtype=torch.int32, device=dev)
        group_scatter_kernel[grid](self.ids, self.offsets, cursor, self.sorted_slot, m, num_groups,
                                   BLOCK=self._BLOCK, SMALL_G=small)

    def _sort_in_one_launch(self, block_m: int) -> None:
        """counts, offsets, sorted_slot and the tile map for block_m, from group_sort_kernel."""
        g, m, n = self.num_groups, self.num_slots, self.max_tiles(block_m)
        parts = _int32_parts(self.ids.device, g, g + 1, m, n, n)
        self.counts, self.offsets, self.sorted_slot, tile_group, tile_row = parts
        group_sort_kernel[(1,)](self.ids, self.counts, self.offsets, self.sorted_slot, tile_group, tile_row, m, g, n,
                                BLOCK_S=max(16, next_pow2(m)), BLOCK_G=max(16, next_pow2(g)), BLOCK_M=block_m)
        self._tiles[block_m] = (tile_group, tile_row)

    def max_tiles(self, block_m: int) -> int:
        return cdiv(self.num_slots, block_m) + min(self.num_groups, self.num_slots)

    def _plan(self, block_m: int, write_offsets: bool) -> None:
        n = self.max_tiles(block_m)
        tile_group = torch.empty(n, dtype=torch.int32, device=self.counts.device)
        tile_row = torch.empty(n, dtype=torch.int32, device=self.counts.device)
        cap = PLAN_BLOCK_G_INTERPRETED if interpreting() else PLAN_BLOCK_G
        block_g = min(cap, max(16, next_pow2(self.num_groups)))
        group_plan_kernel[(cdiv(self.num_groups, block_g),)](
            self.counts, self.offsets, tile_group, tile_row, self.num_groups, n,
            WRITE_OFFSETS=write_offsets, BLOCK_M=block_m, BLOCK_G=block_g)
        self._tiles[block_m] = (tile_group, tile_row)

    def tiles(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_group, tile_row), int32 [max_tiles(block_m)]; tile_group == G marks a surplus tile."""
        if block_m not in self._tiles:
            self._plan(block_m, write_offsets=False)
        return self._tiles[block_m]
