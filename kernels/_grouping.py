"""Grouping rows by a group id, and the padded grouped matmul of the torch fallbacks.

Rows (tokens, or token x expert slots) carry a group id (a tree node, a leaf, an expert). The
fallbacks compute per-group matmuls as ONE batched matmul over fixed-height tiles: rows are sorted
by group, each group is padded to a whole number of tiles of `tile` rows, and tile i multiplies
group tile_group[i]'s weight. The tile height is chosen by a byte count: one tile per group (the
weights used in place, no gather) when groups are balanced; shorter tiles, with the weights
gathered per tile, when they are skewed or sparse. Either way a skewed grouping (every row in one
group) costs no more than a balanced one.

Padding slots copy an arbitrary real row: rows are independent in a matmul, and unpadding reads
back only the real slots, so their results are never seen. That makes pad and unpad one gather each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_TILE_CHOICES = (8, 16, 32, 64, 128)


@dataclass
class PaddedGroups:
    """Sorted-and-padded layout of M rows over G groups (see module docstring)."""

    src: torch.Tensor  # [n_tiles * tile] row copied into each padded slot
    slot: torch.Tensor  # [M] padded slot holding each original row
    tile_group: torch.Tensor  # [n_tiles] group of each tile
    tile: int
    n_tiles: int
    dense: bool  # one tile per group and tile_group == arange(G): per-group tensors used as they are

    @staticmethod
    def build(group_ids: torch.Tensor, num_groups: int, row_bytes: int = 1, group_bytes: int = 0) -> "PaddedGroups":
        """Lay out rows by `group_ids` ([M] ints in [0, num_groups)); syncs with the host.

        row_bytes: cost of one padded row (its input and output widths); group_bytes: cost of
        gathering one group's weights for a tile. The cheaper layout wins.
        """
        m = group_ids.numel()
        dev = group_ids.device
        group_ids = group_ids.to(torch.int64)
        counts = torch.bincount(group_ids, minlength=num_groups)
        max_count = max(int(counts.max()) if m else 0, 1)
        best_tile, best_cost, dense = max_count, num_groups * max_count * row_bytes, True
        for tile in _TILE_CHOICES:
            if tile >= max_count:
                break
            n = int(((counts + tile - 1) // tile).sum())
            cost = n * tile * row_bytes + n * group_bytes
            if cost < best_cost:
                best_tile, best_cost, dense = tile, cost, False
        tile = best_tile
        tiles_per_group = torch.ones_like(counts) if dense else (counts + tile - 1) // tile
        tile_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
        row_start = torch.cumsum(counts, 0) - counts
        order = torch.argsort(group_ids, stable=True)
        sorted_groups = group_ids[order]
        rank = torch.arange(m, device=dev) - row_start[sorted_groups]
        dest = tile_start[sorted_groups] * tile + rank
        n_tiles = int(tiles_per_group.sum())
        src = torch.zeros(n_tiles * tile, dtype=torch.int64, device=dev)
        src[dest] = order
        slot = torch.empty(m, dtype=torch.int64, device=dev)
        slot[order] = dest
        tile_group = torch.repeat_interleave(torch.arange(num_groups, device=dev), tiles_per_group)
        return PaddedGroups(src, slot, tile_group, tile, n_tiles, dense)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, D] rows in original order -> [n_tiles, tile, D] grouped (padding slots hold junk rows)."""
        return rows.index_select(0, self.src).view(self.n_tiles, self.tile, rows.shape[1])

    def per_tile(self, w: torch.Tensor) -> torch.Tensor:
        """A per-group tensor [G, ...] -> per-tile [n_tiles, ...] (the tensor itself when dense)."""
        return w if self.dense else w.index_select(0, self.tile_group)

    def unpad(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n_tiles, tile, N] grouped results -> [M, N] rows in original order."""
        return tiles.reshape(self.n_tiles * self.tile, tiles.shape[-1]).index_select(0, self.slot)
