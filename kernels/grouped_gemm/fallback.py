"""Torch fallbacks for the grouped GEMMs: vectorized, no Python loop over tokens or groups.

Two forward paths: the padded layout (batched matmuls) and, for small batches, the in-place path
(embedding_bag); both are described below. Backward always uses the layout.

Layout (`SlotLayout`). The slots (token t, choice j; slot s = t * k + j) are sorted by group and
laid out as the rows of ONE padded buffer that batched matmuls (torch.bmm) consume:
- a dense block [G, cap] rows: the first `cap` slots of every group, multiplied by the group
  weights in place (no gather of weights);
- overflow tiles of `tile` rows for the slots beyond `cap` in larger groups, each tile multiplied
  by its group's weights gathered per tile.
`cap` and `tile` are picked per call from the group counts by a cost count (padded rows x row
cost + gathered weights); cap = max count is the classic dense layout, cap = 0 the tiled one, and
a balanced routing (FFF leaves, load-balanced experts) lands in between with little padding and
few gathered weights. Padding rows copy a real token row (their results are never read), so
building the buffer is one gather.

Results leave the padded buffer through one `embedding_bag` (sum mode, per-sample weights): for
each token it sums its k slot rows times their route weights (and, for leaf_mlp, the rows of the
groups' output biases appended to the same buffer) in one pass: unsort + route weight + bias +
k-sum without another [T*k, N] temporary. On the CPU the sums are sequential per bag, so the
result does not change run to run.

On the CPU a second, unpadded mode exists (SlotLayout's sorted mode: torch._grouped_mm over the
slots sorted by group, one BLAS call per group), chosen by the same cost count when padding would
cost more than the per-group calls; measured here it rarely wins with 2 BLAS threads. The large
temporaries (gathered rows, second-GEMM output, overflow tiles' gathered weights) live in
per-thread workspaces reused across calls, since fresh pages fault on first touch (see
_backend.cpu_workspace).

On the CPU, float16/bfloat16 inputs are computed in float32 (CPU half matmuls are slow and round
the hidden layer; the weights are converted whole, a copy per call); on CUDA in the input dtype
(cuBLAS and embedding_bag accumulate in float32). Both paths read the group counts on the host
once a batch is past the in-place path's fixed size (a sync on CUDA; the Triton path has none).

Backward uses the same layout and closed-form gradients (see the *_backward_torch functions).

Small batches skip the layout (the in-place path): each slot's rows are multiplied by its own
group's weights read where they lie, through embedding_bag (sum mode, per-sample weights): row s
of a [M, K] times w[g] [K, N] is the sum of the K rows of w viewed as [G*K, N] picked by
g*K + 0..K-1, weighted by a[s]. Nothing is sorted or padded and no weights are gathered; the
second layer's bags take a token's k slots at once (its route weights folded into the per-sample
weights), so its output comes out summed and in token order. It reads every slot's weights once, where the layout
reads each group's weights once, so it wins while tokens per group are few: _layout_counts
compares the two by the same element-unit costs. Measured on the 2-core CPU machine, leaf_mlp
D=768 G=256 H=16 float32 (layout or the previous per-slot weight copies, against in place):
T=64 0.83 -> 0.58 ms, T=256 4.3 -> 1.9 ms; at T=4096 the layout stays (11 ms against 16).
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .._backend import activation_and_grad, cpu_workspace, torch_activation

Tensor = torch.Tensor

_TILES = (1, 2, 4, 8, 16, 32, 64, 128)
#: fixed cost of one matrix in a batched matmul, in element units (tiny matmuls run far below peak)
_MATRIX_OVERHEAD = 512
#: fixed cost of one group's matmul in torch._grouped_mm on the CPU (one BLAS call per group and
#: matmul, each forking the BLAS threads), element units
_GROUP_CALL_OVERHEAD = 40000
#: matmul FLOPs that cost as much time as moving one element (~50 GFLOP/s against ~2.5 G elements/s)
_FLOPS_PER_ELEMENT = 20


def _row_cost(elements: int, flops: int) -> int:
    """Cost of one padded row, in element units: its bytes moved plus its matmul work."""
    return elements + flops // _FLOPS_PER_ELEMENT


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if (x.device.type == "cpu" and x.dtype != torch.float32) else x.dtype


def _choose_padded(counts: np.ndarray, row_cost: int, group_cost: int) -> tuple[float, int, int]:
    """(cost, cap, tile) of the cheapest padded layout: padded rows * row_cost + weight reads.
    Costed on the histogram of the counts (few distinct values even for G = 65536), all (cap, tile)
    candidates at once."""
    g = counts.size
    values, mult = np.unique(counts, return_counts=True)
    quantile_at = np.searchsorted(np.cumsum(mult), np.asarray((0.5, 0.75, 0.9)) * g)
    caps = np.unique(np.concatenate([[0, values[-1]], values[np.minimum(quantile_at, values.size - 1)]]))
    tiles = np.asarray(_TILES)
    over = np.maximum(values[None, :] - caps[:, None], 0)  # [caps, values]
    n_tiles = (((over[:, :, None] + tiles - 1) // tiles) * mult[None, :, None]).sum(1)  # [caps, tiles]
    cost = (n_tiles * tiles * row_cost + n_tiles * (2 * group_cost + _MATRIX_OVERHEAD)  # weights gathered, then read
            + (g * caps * row_cost + np.where(caps > 0, g * (group_cost + _MATRIX_OVERHEAD), 0))[:, None])
    i, j = np.unravel_index(np.argmin(cost), cost.shape)
    return float(cost[i, j]), int(caps[i]), int(tiles[j])


@functools.lru_cache(maxsize=None)
def _grouped_mm_works() -> bool:
    """torch._grouped_mm (private, version dependent) runs on CPU float32 here: probed once."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a, w = torch.ones(6, 4), torch.ones(2, 4, 4)
        out = torch._grouped_mm(a, w, offs=torch.tensor([2, 6], dtype=torch.int32))
        return bool(torch.all(out == 4))
    except Exception:  # noqa: BLE001  (any failure: use the padded layout)
        return False


def group_counts(indices: Tensor, num_groups: int) -> tuple[Tensor, np.ndarray]:
    """Slots per group: (int64 [G] on indices' device, the same on the host; a sync on CUDA)."""
    counts = torch.bincount(indices.reshape(-1).to(torch.int64), minlength=num_groups)
    return counts, counts.cpu().numpy()


class SlotLayout:
    """The grouped layout of the slots of `indices` [T, k] over `num_groups` groups.

    Padded mode (see module docstring) on every device. Sorted mode, on the CPU only, when it is
    cheaper: the slots sorted by group without padding and torch._grouped_mm (one BLAS call per
    group, weights read in place) -- the better layout when groups are small but their weights
    large (weight-bound leaves), where padding would multiply the matmul work. `widths` are the
    matrix widths the caller will multiply by (_grouped_mm needs them 16-byte aligned); `matmuls`
    how many grouped matmuls it will run on the layout. Costs are in element units (_row_cost).
    """

    def __init__(self, indices: Tensor, num_groups: int, row_cost: int, group_cost: int, widths: tuple[int, ...] = (),
                 matmuls: int = 1, counts: Optional[tuple[Tensor, np.ndarray]] = None):
        t, k = indices.shape
        m, g = t * k, num_groups
        dev = indices.device
        ids = indices.reshape(-1).to(torch.int64)
        counts, counts_host = group_counts(indices, g) if counts is None else counts
        pad_cost, cap, tile = _choose_padded(counts_host, row_cost, group_cost)
        self.sorted_mode = False
        if dev.type == "cpu" and widths and all(w % 4 == 0 for w in widths) and _grouped_mm_works():
            # with several BLAS threads each small per-group matmul is split across them (a sync per
            # call), where bmm hands whole matrices to threads: measured ~1.4x slower per row here
            slowdown = 1.0 if torch.get_num_threads() == 1 else 1.4
            sorted_cost = (slowdown * m * row_cost
                           + int((counts_host > 0).sum()) * (group_cost + matmuls * _GROUP_CALL_OVERHEAD))
            self.sorted_mode = sorted_cost < pad_cost
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        self.ids, self.num_tokens, self.topk, self.num_groups = ids, t, k, g
        if self.sorted_mode:
            cap, tile, n_tiles, dest = 0, 1, 0, torch.arange(m, device=dev)
            self.offs = torch.cumsum(counts, 0).to(torch.int32)
            self.sorted_ids = sorted_ids
        else:
            over = (counts - cap).clamp_(min=0)
            tiles_per_group = (over + tile - 1) // tile
            n_tiles = int(((np.maximum(counts_host - cap, 0) + tile - 1) // tile).sum())
            rank = torch.arange(m, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_ids]
            tile_start = torch.cumsum(tiles_per_group, 0) - tiles_per_group
            dest = torch.where(rank < cap, sorted_ids * cap + rank, g * cap + tile_start[sorted_ids] * tile + (rank - cap))
            self.tile_group = torch.repeat_interleave(torch.arange(g, device=dev), tiles_per_group, output_size=n_tiles)
        self.cap, self.tile, self.n_tiles, self.dense_rows = cap, tile, n_tiles, g * cap
        self.rows = g * cap + n_tiles * tile  # P, the padded row count (M in sorted mode)
        if self.sorted_mode:
            self.rows = m
        self.src_slot = torch.full((self.rows,), m, dtype=torch.int64, device=dev)  # m marks a padding row
        self.src_slot[dest] = order
        self.src_token = torch.where(self.src_slot < m, self.src_slot // k, 0)
        self.pos = torch.empty(m, dtype=torch.int64, device=dev)
        self.pos[order] = dest

    @property
    def can_append_rows(self) -> bool:
        """Whether gemm(..., extra_rows=n) can leave room for n more rows in its output buffer."""
        return not self.sorted_mode

    # -- moving rows in and out
    def gather(self, x: Tensor, workspace: Optional[str] = None, zero_padding: bool = False) -> Tensor:
        """[T, D] token rows -> [P, D] padded rows (padding rows hold some real token's row, or zeros
        with `zero_padding`: the backward's weight gradients sum over padding rows times zeros, and
        a copied NaN or inf times zero would reach another group's gradient). With `workspace`, the
        result lives in that reusable buffer (it must not leave the caller)."""
        if workspace is None:
            out = x.index_select(0, self.src_token)
        else:
            out = cpu_workspace(workspace, (self.rows, x.shape[1]), x.dtype, x.device)
            torch.index_select(x, 0, self.src_token, out=out)
        if zero_padding and self.rows > self.num_tokens * self.topk:
            out.index_fill_(0, self.padding_rows, 0)
        return out

    @functools.cached_property
    def padding_rows(self) -> Tensor:
        """int64 [P - M]: the padding rows' positions (found once per layout: the backward zeroes
        them in both gathered x and dy, and the search is a host sync on CUDA)."""
        return (self.src_slot == self.num_tokens * self.topk).nonzero()[:, 0]

    def slot_values(self, values: Optional[Tensor], dtype: torch.dtype) -> Tensor:
        """[M] per-slot values (None: all ones) -> [P], zero on padding rows."""
        m = self.num_tokens * self.topk
        v = torch.ones(m, dtype=dtype, device=self.pos.device) if values is None else values.reshape(-1).to(dtype)
        return torch.cat([v, v.new_zeros(1)]).index_select(0, self.src_slot)

    def take_slots(self, rows: Tensor) -> Tensor:
        """[P, ...] padded rows -> [M, ...] in slot order."""
        return rows.index_select(0, self.pos)

    def combine(self, table: Tensor, weights: Optional[Tensor] = None, bias_base: Optional[int] = None) -> Tensor:
        """y[t] = sum_j w[t, j] * (table[pos[t, j]] + table[bias_base + g[t, j]]) -> [T, N], in one pass."""
        t, k = self.num_tokens, self.topk
        bags = self.pos.view(t, k)
        psw = None if weights is None else weights.reshape(t, k).to(table.dtype)
        if bias_base is not None:
            bags = torch.cat([bags, bias_base + self.ids.view(t, k)], 1)
            psw = None if psw is None else torch.cat([psw, psw], 1)
        if bags.shape[1] == 1 and psw is None:
            return table.index_select(0, bags[:, 0])
        return F.embedding_bag(bags, table, per_sample_weights=psw, mode="sum")

    # -- per-group matmuls on the padded rows
    def _parts(self, rows: Tensor):
        d = self.dense_rows
        dense = rows[:d].view(self.num_groups, self.cap, rows.shape[1]) if self.cap else None
        tiles = rows[d:self.rows].view(self.n_tiles, self.tile, rows.shape[1]) if self.n_tiles else None
        return dense, tiles

    def gemm(self, a: Tensor, w: Tensor, extra_rows: int = 0, workspace: Optional[str] = None) -> Tensor:
        """[P, K] @ w[group] ([G, K, N], any strides) -> [P + extra_rows, N] (extra rows left unset).
        With `workspace` (padded mode), the result lives in that reusable buffer (see gather)."""
        if self.sorted_mode:
            assert extra_rows == 0, "sorted mode cannot append rows"
            return torch._grouped_mm(a, w, offs=self.offs)
        shape = (self.rows + extra_rows, w.shape[2])
        out = (torch.empty(shape, dtype=a.dtype, device=a.device) if workspace is None
               else cpu_workspace(workspace, shape, a.dtype, a.device))
        (ad, at), (od, ot) = self._parts(a), self._parts(out)
        if ad is not None:
            torch.bmm(ad, w, out=od)
        if at is not None:
            torch.bmm(at, self._tile_weights(w), out=ot)
        return out

    def _tile_weights(self, w: Tensor) -> Tensor:
        """[n_tiles, K, N]: each overflow tile's group weights, gathered into a reused CPU buffer (up to
        cpu_workspace's 64 MB; an expert of D=1024, H=3584 in fp32 is 14.7 MB a matrix, whose fresh
        pages faulted on every call)."""
        out = cpu_workspace("tile_weights", (self.n_tiles, w.shape[1], w.shape[2]), w.dtype, w.device)
        return torch.index_select(w, 0, self.tile_group, out=out)

    def add_bias_(self, z: Tensor, bias: Tensor) -> Tensor:
        """z[p] += bias[group of row p], in place."""
        if self.sorted_mode:
            return z.add_(bias.index_select(0, self.sorted_ids))
        zd, zt = self._parts(z)
        if zd is not None:
            zd += bias[:, None, :]
        if zt is not None:
            zt += bias.index_select(0, self.tile_group)[:, None, :]
        return z

    def wgrad(self, a: Tensor, b: Tensor) -> Tensor:
        """[G, Da, Nb]: sum over group g's rows of a_row^T b_row (padding rows of b must be zero)."""
        if self.sorted_mode:
            return torch._grouped_mm(a.t(), b, offs=self.offs)
        (ad, at), (bd, bt) = self._parts(a), self._parts(b)
        if ad is not None:
            out = torch.bmm(ad.transpose(1, 2), bd)
        else:
            out = a.new_zeros(self.num_groups, a.shape[1], b.shape[1])
        if at is not None:
            out.index_add_(0, self.tile_group, torch.bmm(at.transpose(1, 2), bt))
        return out

    def rowdot(self, a: Tensor, vectors: Tensor) -> Tensor:
        """[P]: a_row . vectors[group of the row] (vectors [G, N])."""
        if self.sorted_mode:
            return (a * vectors.index_select(0, self.sorted_ids)).sum(1)
        return self.gemm(a, vectors.unsqueeze(2))[:, 0]

    def colsum(self, b: Tensor) -> Tensor:
        """[G, N]: sum of group g's rows (padding rows must be zero)."""
        if self.sorted_mode:
            return b.new_zeros(self.num_groups, b.shape[1]).index_add_(0, self.sorted_ids, b)
        bd, bt = self._parts(b)
        out = bd.sum(1) if bd is not None else b.new_zeros(self.num_groups, b.shape[1])
        if bt is not None:
            out.index_add_(0, self.tile_group, bt.sum(1))
        return out


# ----------------------------------------------------------------------------- activations

def hidden_forward(u: Tensor, name: Optional[str], inplace: bool = False) -> Tensor:
    """The leaf hidden layer from its pre-activation u; swiglu: silu(u[:, :H]) * u[:, H:]."""
    if name == "swiglu":
        h = u.shape[1] // 2
        return F.silu(u[:, :h]) * u[:, h:]
    if inplace and name == "relu":
        return u.relu_()
    if inplace and name == "silu":
        return F.silu(u, inplace=True)
    return torch_activation(u, None if name == "none" else name)


def hidden_backward(dh: Tensor, u: Tensor, name: Optional[str]) -> Tensor:
    """d loss / d u from d loss / d hidden (hidden = hidden_forward(u))."""
    if name == "swiglu":
        h = u.shape[1] // 2
        gate, up = u[:, :h], u[:, h:]
        silu, dsilu = activation_and_grad(gate, "silu")
        return torch.cat([dh * up * dsilu, dh * silu], 1)
    _, da = activation_and_grad(u, name)
    return dh if da is None else dh * da


def _flat_indices(indices: Tensor) -> Tensor:
    """[T] or [T, k] -> [T, k]."""
    return indices.unsqueeze(1) if indices.dim() == 1 else indices


#: the in-place path's cost per weight element it reads, in _row_cost's element units (fitted on
#: the 2-core CPU machine: leaf_mlp D=768 G=256 H=16 at T = 64 to 4096, against the layout's cost)
_IN_PLACE_ELEMENT_COST = 0.5
#: the padded layout's fixed cost (counting on the host, sorting, a dozen small ops), element units
_LAYOUT_OVERHEAD = 1_500_000


def _layout_counts(indices: Tensor, num_groups: int, row_cost: int,
                   group_cost: int) -> Optional[tuple[Tensor, np.ndarray]]:
    """None when the in-place path (module docstring) costs less than the padded layout here, else
    the group counts for SlotLayout (counted once). group_cost: the weight elements of one group
    (all layers), which is also what the in-place path reads per slot; row_cost as SlotLayout."""
    in_place = indices.numel() * group_cost * _IN_PLACE_ELEMENT_COST
    if in_place <= _LAYOUT_OVERHEAD:
        return None
    counts = group_counts(indices, num_groups)
    return None if in_place < _choose_padded(counts[1], row_cost, group_cost)[0] + _LAYOUT_OVERHEAD else counts


def _bag_rows(ids: Tensor, width: int) -> Tensor:
    """[M, width] row ids g * width + 0..width-1 of group g = ids[s] in a [G * width, N] table."""
    return ids[:, None] * width + torch.arange(width, device=ids.device)


def _times_group_matrix(a: Tensor, w: Tensor, ids: Tensor) -> Tensor:
    """[M, N]: row s of a [M, K] times its group's matrix w[ids[s]] (w [G, K, N], read in place)."""
    g, kdim, n = w.shape
    return F.embedding_bag(_bag_rows(ids, kdim), w.reshape(g * kdim, n), per_sample_weights=a, mode="sum")


def _in_place_output_layer(hidden: Tensor, w2: Tensor, b2: Optional[Tensor], indices: Tensor,
                           route_weights: Optional[Tensor]) -> Tensor:
    """[T, O]: y[t] = sum_j rw[t, j] * (hidden[t*k + j] @ w2[g] + b2[g]), g = indices[t, j], one bag per
    token (its k slots' rows of w2, the route weights folded into the per-sample weights)."""
    t, k = indices.shape
    g, h, o = w2.shape
    ids = indices.reshape(-1)
    rw = None if route_weights is None else route_weights.reshape(t * k, 1).to(hidden.dtype)
    psw = hidden if rw is None else hidden * rw
    y = F.embedding_bag(_bag_rows(ids, h).view(t, k * h), w2.reshape(g * h, o),
                        per_sample_weights=psw.reshape(t, k * h), mode="sum")
    if b2 is not None:
        y += F.embedding_bag(indices, b2, per_sample_weights=None if rw is None else rw.view(t, k), mode="sum")
    return y


def _slot_rows(x: Tensor, k: int) -> Tensor:
    """[T, D] -> [T * k, D]: each token's row once per slot."""
    return x if k == 1 else x.unsqueeze(1).expand(-1, k, -1).reshape(-1, x.shape[1])


def _sum_slots(v: Tensor, t: int, k: int, route_weights: Optional[Tensor]) -> Tensor:
    """[T * k, N] per-slot rows -> [T, N], times the route weights, summed over k in a fixed order."""
    if route_weights is not None:
        v = v * route_weights.reshape(-1, 1).to(v.dtype)
    return v if k == 1 else v.view(t, k, -1).sum(1)


# ----------------------------------------------------------------------------- gather_matmul_scatter

@torch.no_grad()  # autograd is the ops' own formula; this is plain compute (bmm out= needs it)
def gather_matmul_scatter_torch(x: Tensor, weight: Tensor, indices: Tensor, bias: Optional[Tensor],
                                route_weights: Optional[Tensor], activation: Optional[str]) -> Tensor:
    """y[t] = sum_j rw[t, j] * act(x[t] @ weight[g] + bias[g]), g = indices[t, j]; x [T, D], indices [T, k]."""
    indices = _flat_indices(indices)
    cdt = compute_dtype(x)
    _, d, n = weight.shape
    row_cost, group_cost = _row_cost(d + 2 * n, 2 * d * n), d * n
    counts = _layout_counts(indices, weight.shape[0], row_cost, group_cost)
    if counts is None:
        t, k = indices.shape
        ids = indices.reshape(-1).to(torch.int64)
        z = _times_group_matrix(_slot_rows(x.to(cdt), k), weight.to(cdt), ids)
        if bias is not None:
            z += bias.to(cdt).index_select(0, ids)
        return _sum_slots(hidden_forward(z, activation, inplace=True), t, k, route_weights).to(x.dtype)
    lay = SlotLayout(indices, weight.shape[0], row_cost=row_cost, group_cost=group_cost, widths=(d, n), counts=counts)
    z = lay.gemm(lay.gather(x, "a").to(cdt), weight.to(cdt), workspace="out")
    if bias is not None:
        lay.add_bias_(z, bias.to(cdt))
    a = hidden_forward(z, activation, inplace=True)
    return lay.combine(a, route_weights).to(x.dtype)


@torch.no_grad()  # autograd is the ops' own formula; this is plain compute (bmm out= needs it)
def gather_matmul_scatter_backward_torch(dy: Tensor, x: Tensor, weight: Tensor, indices: Tensor,
                                         bias: Optional[Tensor], route_weights: Optional[Tensor],
                                         activation: Optional[str]):
    """(dx, dweight, dbias | None, droute_weights | None) of gather_matmul_scatter."""
    indices = _flat_indices(indices)
    cdt = compute_dtype(x)
    _, d, n = weight.shape
    lay = SlotLayout(indices, weight.shape[0], row_cost=_row_cost(3 * d + 4 * n, 6 * d * n), group_cost=3 * d * n,
                     widths=(d, n), matmuls=3)
    w = weight.to(cdt)
    xp = lay.gather(x, zero_padding=True).to(cdt)
    z = lay.gemm(xp, w)
    if bias is not None:
        lay.add_bias_(z, bias.to(cdt))
    a, da = activation_and_grad(z, activation)
    dyp = lay.gather(dy, zero_padding=True).to(cdt)
    drw = None
    if route_weights is not None:
        drw = lay.take_slots((a * dyp).sum(1)).view(route_weights.shape).to(route_weights.dtype)
    dz = dyp * lay.slot_values(route_weights, cdt)[:, None]  # zero on padding rows
    if da is not None:
        dz *= da
    dw = lay.wgrad(xp, dz).to(weight.dtype)
    db = None if bias is None else lay.colsum(dz).to(bias.dtype)
    dx = lay.combine(lay.gemm(dz, w.transpose(1, 2))).to(x.dtype)
    return dx, dw, db, drw


# ----------------------------------------------------------------------------- leaf_mlp

@torch.no_grad()  # autograd is the ops' own formula; this is plain compute (bmm out= needs it)
def leaf_mlp_torch(x: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                   activation: Optional[str], route_weights: Optional[Tensor] = None) -> Tensor:
    """y[t] = sum_j rw[t, j] * (act(x[t] @ w1[g] + b1[g]) @ w2[g] + b2[g]), g = indices[t, j].

    x [T, D], indices [T, k] (or [T]), w1 [G, D, H] ([G, D, 2H] for swiglu), w2 [G, H, O].
    """
    indices = _flat_indices(indices)
    cdt = compute_dtype(x)
    g, d, h1 = w1.shape
    h, o = w2.shape[1], w2.shape[2]
    row_cost, group_cost = _row_cost(d + 2 * h1 + o, 2 * (d * h1 + h * o)), d * h1 + h * o
    counts = _layout_counts(indices, g, row_cost, group_cost)
    if counts is None:
        indices = indices.to(torch.int64)
        ids = indices.reshape(-1)
        u = _times_group_matrix(_slot_rows(x.to(cdt), indices.shape[1]), w1.to(cdt), ids)
        if b1 is not None:
            u += b1.to(cdt).index_select(0, ids)
        hidden = hidden_forward(u, activation, inplace=True)
        return _in_place_output_layer(hidden, w2.to(cdt), None if b2 is None else b2.to(cdt), indices,
                                      route_weights).to(x.dtype)
    lay = SlotLayout(indices, g, row_cost=row_cost, group_cost=group_cost, widths=(d, h1, h, o), matmuls=2,
                     counts=counts)
    u = lay.gemm(lay.gather(x, "a").to(cdt), w1.to(cdt))
    if b1 is not None:
        lay.add_bias_(u, b1.to(cdt))
    hidden = hidden_forward(u, activation, inplace=True)
    bias_rows = b2 is not None and lay.can_append_rows and g <= lay.rows  # append the biases to the buffer: combine adds them
    v = lay.gemm(hidden, w2.to(cdt), extra_rows=g if bias_rows else 0, workspace="out")
    if bias_rows:
        v[lay.rows:] = b2
        return lay.combine(v, route_weights, bias_base=lay.rows).to(x.dtype)
    if b2 is not None:
        lay.add_bias_(v, b2.to(cdt))
    return lay.combine(v, route_weights).to(x.dtype)


@torch.no_grad()  # autograd is the ops' own formula; this is plain compute (bmm out= needs it)
def leaf_mlp_backward_torch(dy: Tensor, x: Tensor, indices: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                            b2: Optional[Tensor], route_weights: Optional[Tensor], activation: Optional[str]):
    """(dx, dw1, db1 | None, dw2, db2 | None, droute_weights | None) of leaf_mlp."""
    indices = _flat_indices(indices)
    cdt = compute_dtype(x)
    g, d, h1 = w1.shape
    h, o = w2.shape[1], w2.shape[2]
    lay = SlotLayout(indices, g, row_cost=_row_cost(3 * d + 6 * h1 + 3 * o, 6 * (d * h1 + h * o)),
                     group_cost=3 * (d * h1 + h * o), widths=(d, h1, h, o), matmuls=5)
    w1c, w2c = w1.to(cdt), w2.to(cdt)
    xp = lay.gather(x, zero_padding=True).to(cdt)
    u = lay.gemm(xp, w1c)
    if b1 is not None:
        lay.add_bias_(u, b1.to(cdt))
    hidden = hidden_forward(u, activation)
    dyp = lay.gather(dy, zero_padding=True).to(cdt)
    gp = lay.gemm(dyp, w2c.transpose(1, 2))  # dy_t @ w2[g]^T
    drw = None
    if route_weights is not None:  # d/d rw = <hidden @ w2 + b2, dy>
        r = (hidden * gp).sum(1)
        if b2 is not None:
            r += lay.rowdot(dyp, b2.to(cdt))
        drw = lay.take_slots(r).view(route_weights.shape).to(route_weights.dtype)
    rwp = lay.slot_values(route_weights, cdt)[:, None]  # zero on padding rows
    dv = dyp.mul_(rwp)
    dw2 = lay.wgrad(hidden, dv).to(w2.dtype)
    db2 = None if b2 is None else lay.colsum(dv).to(b2.dtype)
    du = hidden_backward(gp.mul_(rwp), u, activation)
    dw1 = lay.wgrad(xp, du).to(w1.dtype)
    db1 = None if b1 is None else lay.colsum(du).to(b1.dtype)
    dx = lay.combine(lay.gemm(du, w1c.transpose(1, 2))).to(x.dtype)
    return dx, dw1, db1, dw2, db2, drw
