"""Target attention: the DIN attention unit over the recent behaviors and the (similarity-aware) target
attention TA / SA-TA over the K behaviors of the ESU.

All softmaxes run over valid positions only: invalid positions get exactly zero weight, and a sample without
any valid position pools to a zero vector.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from model import din_native, esu_native
from model.jagged import length_mask, pad_values
from model.tower import MLP, Dice

# DinAttention.shared_weights: (query, key) pairs per block, sized so a block's [pairs, H] activations stay in cache.
SHARED_PAIRS = 4096


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax of scores [B, L] over positions where mask [B, L] is True; exactly 0 elsewhere (all-0 rows stay 0)."""
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * mask


def attention_pool(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted sum: weights [B, L], values [B, L, E] -> [B, E]."""
    return torch.bmm(weights.unsqueeze(1), values).squeeze(1)


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(distinct [U, E], slot int64 [R]) with rows[i] == distinct[slot[i]] for rows [R, E] (float32: bit patterns).

    The rows are told apart by a 64-bit hash of their bits (a 1-D unique, a few elementwise passes), and the result
    is checked to give every row back exactly; a collision (never seen; it would fail the check) falls back to
    ``torch.unique(rows, dim=0)``, which sorts the rows by comparing them one by one."""
    if rows.dtype != torch.float32 or rows.dim() != 2 or rows.shape[0] < 2:
        return torch.unique(rows, dim=0, return_inverse=True)
    bits = rows.contiguous().view(torch.int32).to(torch.int64)
    hashed = (bits * _row_multipliers(rows.shape[1])).sum(1)  # wraps modulo 2**64: still a function of the bits
    keys, slot = torch.unique(hashed, return_inverse=True)
    first = torch.full((keys.shape[0],), rows.shape[0], dtype=torch.int64).scatter_reduce_(
        0, slot, torch.arange(rows.shape[0]), "amin")
    distinct = rows.index_select(0, first)
    if torch.equal(distinct.index_select(0, slot).view(torch.int32), rows.contiguous().view(torch.int32)):
        return distinct, slot
    return torch.unique(rows, dim=0, return_inverse=True)


@functools.lru_cache(maxsize=8)
def _row_multipliers(width: int) -> torch.Tensor:
    """int64 [width] fixed odd multipliers (a seeded draw) for ``distinct_rows``' hash."""
    with torch.inference_mode(False):
        generator = torch.Generator().manual_seed(0x5EED)
        return torch.randint(1, 2 ** 62, (width,), generator=generator, dtype=torch.int64) * 2 + 1


class DinAttention(nn.Module):
    """DIN's attention unit: score_j = MLP([q, k_j, q - k_j, q * k_j]), softmax over valid j, sum of w_j k_j
    (the first layer computed without materialising that input, ``_first_layer``).

    The MLP runs on the jagged behaviors only (no padded rows), so padding neither costs compute nor shifts
    Dice's batch statistics.
    """

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: str, device: torch.device | None = None) -> None:
        super().__init__()
        self.mlp = MLP(4 * dim, hidden, activation, device=device)
        self.score = nn.Linear(self.mlp.out_dim, 1, device=device)

    def weights(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """Attention weights [B, length] for query [B, E] and jagged keys [N, E] (lengths [B], offsets [B + 1])."""
        sample = torch.repeat_interleave(torch.arange(query.shape[0], device=query.device), lengths, output_size=keys.shape[0])
        scores = self.score(self._mlp(query, keys, sample))
        padded = pad_values(scores, offsets, length).squeeze(-1)
        return masked_softmax(padded, length_mask(lengths, length))

    def _mlp(self, query: torch.Tensor, keys: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """MLP([q, k, q - k, q * k]) [N, H] for query [B, E], keys [N, E], sample [N] (each key's query)."""
        if len(self.mlp) == 0:
            q = query[sample]
            return torch.cat([q, keys, q - keys, q * keys], dim=1)
        hidden = self._first_layer(query, keys, sample)
        for layer in list(self.mlp)[1:]:
            hidden = layer(hidden)
        return hidden

    def _first_layer(self, query: torch.Tensor, keys: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The MLP's first Linear on [q, k, q - k, q * k] without building that [N, 4E] input: with W = [W_q | W_k |
        W_d | W_p], it is q (W_q + W_d)^T (once per sample, then gathered) + k (W_k - W_d)^T + (q * k) W_p^T + b,
        the same function in about half the multiply-adds. query [B, E], keys [N, E], sample [N] -> [N, H]."""
        first = self.mlp[0]
        w_q, w_k, w_d, w_p = first.weight.chunk(4, dim=1)
        q = query[sample]
        out = torch.nn.functional.linear(query, w_q + w_d)[sample]
        out = torch.addmm(out, keys, (w_k - w_d).t())
        return torch.addmm(out, q * keys, w_p.t()) + first.bias

    def forward(self, query: torch.Tensor, keys: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor, length: int) -> torch.Tensor:
        """Pooled interest [B, E]: query [B, E], jagged keys [N, E] of at most ``length`` behaviors per sample."""
        weights = self.weights(query, keys, lengths, offsets, length)
        return attention_pool(weights, pad_values(keys, offsets, length))

    @torch.no_grad()
    def shared_weights(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, R] of B queries [B, E] over the same R keys [R, E] (one user's recent behaviors
        ranked against B candidates): ``weights`` of B samples that all hold these keys, without repeating them.

        Equal keys (a behavior repeated in the window) are scored once and their score used at each of their
        positions. The keys' first-layer term k (W_k - W_d)^T is taken once per key, the query's once per query, and
        the rest of the MLP runs on blocks of about ``SHARED_PAIRS`` (query, key) pairs in buffers allocated once, so
        its activations stay in the CPU's cache instead of streaming [B * R, H] tensors through memory (and no block
        pays for fresh pages). Inference only (Dice's batch statistics would need every pair at once; no gradient):
        raises RuntimeError in training mode."""
        if self.training:
            raise RuntimeError("DinAttention.shared_weights: inference only (call .eval() first)")
        b, r = query.shape[0], keys.shape[0]
        if r == 0 or b == 0:
            return query.new_zeros(b, r)
        distinct, slot = distinct_rows(keys)  # a behavior repeated: scored once
        scores = din_native.scores(self, query, distinct) if query.dtype == torch.float32 else None
        if scores is None:  # the torch blocks
            u = distinct.shape[0]
            step = max(1, SHARED_PAIRS // u)
            block = _SharedBlock(self, distinct, min(b, step))
            scores = torch.empty(b, u, dtype=query.dtype)
            for s in range(0, b, step):
                scores[s:s + step] = block.scores(query[s:s + step])
        return torch.softmax(scores.index_select(1, slot), dim=1)

    def forward_shared(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Pooled interest [B, E] of B queries [B, E] over the same R keys [R, E] (``shared_weights``); zeros when
        R = 0, as ``forward`` gives a sample without behaviors."""
        return self.shared_weights(query, keys) @ keys


class Projection(nn.Linear):
    """``SiLU(W x + b)``, the released SA-TA's query/key/value layer: [..., in] -> [..., out].

    Initialised as the released code does: W normal with std 1/sqrt(in), b = 0.1.
    """

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.in_features))
        nn.init.constant_(self.bias, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class TargetAttention(nn.Module):
    """Target attention over ID embeddings, optionally similarity-aware (SA-TA).

    Without projections (``projections=False``):
      a_id_j = (W_q q + b_q) . (W_k e_j) / sqrt(h)  -- computed as e_j . (W_k^T (W_q q + b_q)), so the behaviors
      are never projected (cheap over a whole history for TWIN); values v_j = e_j.
    With projections (the released SA-TA): q' = SiLU(W_q q + b_q), k'_j = SiLU(W_k e_j + b_k),
      v_j = SiLU(W_v e_j + b_v) (width E), a_id_j = q' . k'_j (unscaled).
    TA:    a_j = a_id_j
    SA-TA: a_j = g1 * a_id_j + g2 * R'_j + g3 * a_id_j * R'_j, learnable scalars g (initialised to 1), with
           R'_j = R_j / tau for a learned temperature tau initialised to ``r_temperature`` (released: 0.1), or
           R'_j = R_j when ``r_temperature`` is None.
    Output: sum_j softmax_valid(a)_j v_j  [B, E].
    """

    def __init__(self, dim: int, attention_dim: int, similarity_aware: bool, device: torch.device | None = None,
                 r_temperature: float | None = None, projections: bool = False) -> None:
        super().__init__()
        self.projections = projections
        if projections:
            self.query: nn.Linear = Projection(dim, attention_dim, device=device)
            self.key: nn.Linear = Projection(dim, attention_dim, device=device)
            self.value = Projection(dim, dim, device=device)
            self.scale = 1.0
        else:
            self.query = nn.Linear(dim, attention_dim, device=device)
            self.key = nn.Linear(dim, attention_dim, bias=False, device=device)
            self.scale = 1.0 / math.sqrt(attention_dim)
        self.similarity_aware = similarity_aware
        self.gates = nn.Parameter(torch.empty(3, device=device)) if similarity_aware else None
        self.r_temperature_init = r_temperature
        self.temperature = (
            nn.Parameter(torch.empty(1, device=device)) if similarity_aware and r_temperature is not None else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.gates is not None:
            nn.init.ones_(self.gates)
        if self.temperature is not None:
            nn.init.constant_(self.temperature, self.r_temperature_init)

    def id_scores(self, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """a_id [B, L] for query [B, E] and behaviors [B, L, E]."""
        keys = self.key(keys) if self.projections else keys
        return torch.bmm(keys, self._query_vector(query).unsqueeze(-1)).squeeze(-1) * self.scale

    def _query_vector(self, query: torch.Tensor) -> torch.Tensor:
        """The vector a behavior's key is dotted with, [B, A] or [B, E]: SiLU(W_q q + b_q) with projections, else
        (W_q q + b_q) W_k (so the behaviors are never projected); a_id = that dot times ``scale``."""
        return self.query(query) if self.projections else self.query(query) @ self.key.weight

    def scores(self, query: torch.Tensor, keys: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores a [B, L]; similarity R [B, L] is used by SA-TA only."""
        return self._combine(self.id_scores(query, keys), similarity)

    def _combine(self, a_id: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """a [B, L] from a_id [B, L] (and, SA-TA, R [B, L])."""
        return self._mix(a_id, self._similarity(similarity)) if self.gates is not None else a_id

    def _mix(self, a_id: torch.Tensor, similarity: torch.Tensor | None) -> torch.Tensor:
        """SA-TA's g1 a_id + g2 R' + g3 a_id R' for R' = ``_similarity(R)``; a_id itself for TA (R' unused)."""
        if self.gates is None:
            return a_id
        return self.gates[0] * a_id + self.gates[1] * similarity + self.gates[2] * a_id * similarity

    def _similarity(self, similarity: torch.Tensor) -> torch.Tensor:
        """R' [B, L]: R over the learned temperature, or R itself without one."""
        return similarity / self.temperature if self.temperature is not None else similarity

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """Attention weights [B, L], zero at invalid positions (mask [B, L] False)."""
        return masked_softmax(self.scores(query, keys, similarity), mask)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """Pooled values [B, E]."""
        values = self.value(keys) if self.projections else keys
        return attention_pool(self.weights(query, keys, mask, similarity), values)

    def forward_shared(self, query: torch.Tensor, distinct: torch.Tensor, index: torch.Tensor, mask: torch.Tensor,
                       similarity: torch.Tensor) -> torch.Tensor:
        """``forward`` with keys[b, j] = distinct[index[b, j]]: query [B, E], distinct [U, E], index int64 [B, K]
        (-1 where mask [B, K] is False), similarity [B, K] -> pooled [B, E]. With projections, each distinct
        behavior's key and value are projected once (not once per slot), then gathered."""
        if distinct.shape[0] == 0:  # no behavior at all: every slot is masked, the pool is zeros
            distinct = distinct.new_zeros(1, distinct.shape[1])
        key_rows = self.key(distinct) if self.projections else distinct
        value_rows = self.value(distinct) if self.projections else key_rows
        query_vector = self._query_vector(query)
        r = self._similarity(similarity) if self.gates is not None else None  # SA-TA's R' (TA: none)
        pooled = esu_native.attend(query_vector, key_rows, value_rows, torch.where(mask, index, -1), r, self.gates,
                                   self.scale)
        if pooled is not None:  # one C pass over each candidate's slots (inference: no gradient needed)
            return pooled
        slots, (b, k) = index.clamp_min(0).reshape(-1), index.shape

        def gather(rows: torch.Tensor) -> torch.Tensor:  # [U, W] -> [B, K, W] (index_select: no generic indexing)
            return rows.index_select(0, slots).view(b, k, rows.shape[1])

        keys = gather(key_rows)
        values = gather(value_rows) if self.projections else keys
        a_id = (keys * query_vector.unsqueeze(1)).sum(-1) * self.scale  # [B, K], no [B, K, 1] bmm
        return attention_pool(masked_softmax(self._mix(a_id, r), mask), values)


class _SharedBlock:
    """``DinAttention``'s MLP on blocks of up to ``rows`` queries against the same R keys [R, E], in buffers
    allocated once: scores(query [b, E]) -> pre-softmax scores [b, R]. The first layer is computed as in
    ``DinAttention._first_layer`` (the keys' term once, the query's per block), the layers after it through their
    own eval arithmetic (Dice in place, ``Dice.apply_``; other activations as modules)."""

    def __init__(self, din: DinAttention, keys: torch.Tensor, rows: int) -> None:
        self.din, self.keys = din, keys
        r, e = keys.shape
        layers = list(din.mlp)
        self.pairs = [layers[i:i + 2] for i in range(0, len(layers), 2)]  # (Linear, activation) per hidden width
        if self.pairs:
            w_q, w_k, w_d, w_p = layers[0].weight.chunk(4, dim=1)
            self.w_query = w_q + w_d
            self.per_key = keys @ (w_k - w_d).t()  # [R, H1]
            self.w_p = w_p.t().contiguous()  # [E, H1]
        self.products = torch.empty(rows, r, e, dtype=keys.dtype)
        self.hidden = [(torch.empty(rows * r, lin.out_features, dtype=keys.dtype),
                        torch.empty(rows * r, lin.out_features, dtype=keys.dtype)) for lin, _ in self.pairs]
        self.weights_t = [lin.weight.t() for lin, _ in self.pairs[1:]]
        self.dice = [act.eval_parameters() if isinstance(act, Dice) else None for _, act in self.pairs]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        b, (r, e) = query.shape[0], self.keys.shape
        n = b * r
        if not self.pairs:  # no hidden layer: DinAttention's own [q, k, q - k, q * k] input to the score layer
            sample = torch.arange(b).repeat_interleave(r)
            return self.din.score(self.din._mlp(query, self.keys.repeat(b, 1), sample)).view(b, r)
        first, activation = self.pairs[0]
        hidden, scratch = (t[:n] for t in self.hidden[0])
        per_query = torch.nn.functional.linear(query, self.w_query, first.bias)  # [b, H1]
        torch.add(per_query[:, None, :], self.per_key[None, :, :], out=hidden.view(b, r, -1))
        products = torch.mul(query[:, None, :], self.keys[None, :, :], out=self.products[:b]).view(n, e)
        hidden = self._activate(activation, hidden.addmm_(products, self.w_p), scratch, self.dice[0])
        for (linear, activation), (out, scratch), w_t, dice in zip(self.pairs[1:], self.hidden[1:], self.weights_t,
                                                                    self.dice[1:]):
            hidden = self._activate(activation, torch.addmm(linear.bias, hidden, w_t, out=out[:n]), scratch[:n], dice)
        return self.din.score(hidden).view(b, r)

    @staticmethod
    def _activate(activation: nn.Module, x: torch.Tensor, scratch: torch.Tensor,
                  dice: torch.Tensor | None) -> torch.Tensor:
        return activation.apply_(x, scratch, dice) if isinstance(activation, Dice) else activation(x)
