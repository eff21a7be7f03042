"""``comm.binary_weights: packed`` (with ``binary_grads`` ``none`` or ``onebit``): binary latents and their Adam
state sharded over the ranks, module weights kept as signs: 1 bit each (``comm.resident_bits``) or +-1 floats.

Why a mode of its own: a binary layer needs only the signs of its latents in the forward pass, so no rank has
to hold (or receive) every latent at full precision. Each rank owns one slice of the flat latent vector
(:mod:`dbgen.sync.layout`), receives only its slice of the averaged gradient (a reduce-scatter, or 1-bit
messages after the warm-up) and sends back 1 bit per weight; its checkpoint part is that slice. With resident
bits the layers read those bits where the all-gather puts them (:class:`dbgen.nn.resident.ResidentSigns`), and
the binary gradients never exist as one flat vector (bucket by bucket, :meth:`PackedSync._bucket_rows`): a
worker holds its slice's state, the bits of every weight and the buckets in flight.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.distributed as dist

from ..nn import binary_layers, pack_signs
from .accounting import comm_kind
from .base import ExchangeSync, nan_as_inf, set_lr
from .buckets import GradBuckets
from .collectives import Pending, all_gather_flat, start_all_reduce_mean, start_slice_sum
from .layout import load_partitions, save_partition
from .onebit import ONEBIT_CHUNK, OneBitExchange

__all__ = ["PackedSync"]

log = logging.getLogger(__name__)

PACK_WINDOW = 2**24  # elements of a flat vector packed or squared at a time (64 MiB of fp32)


def _pack_slice(x: torch.Tensor) -> torch.Tensor:
    """:func:`pack_signs` of a (n,) vector, n a multiple of 8, a window at a time: the same bytes, with
    temporaries of one window (packing all at once needs 2 bytes per element)."""
    return torch.cat([pack_signs(x[a : a + PACK_WINDOW]) for a in range(0, x.numel(), PACK_WINDOW)])


def _square_sum(x: torch.Tensor) -> torch.Tensor:
    """0-dim fp32 sum of squares of a (n,) vector: ``x.pow(2).sum()`` per window, the windows' sums added in
    order. One window (up to 16M elements: every slice the tests train) is exactly ``x.pow(2).sum()``; a bigger
    slice needs no temporary of its size (at 2 workers that temporary would be a fourth of the slice's state)."""
    return torch.stack([x[a : a + PACK_WINDOW].float().pow(2).sum() for a in range(0, x.numel(), PACK_WINDOW)]).sum()


class PackedSync(ExchangeSync):
    """``comm.binary_weights: packed``: binary latents and their Adam state sharded over the ranks; module
    weights are the signs, refreshed from a packed all-gather after every step: with ``resident`` (the
    default), the layers read them as bits from ``self._packed`` (the all-gather's destination), else each holds
    +-1 floats written from it.

    Per step (every rank)::

        backward                 local; DeepSpeed's all-reduce is off (ZeRO stage 0 required)
        reduce     grad          full-precision gradients: all-reduced, averaged (as DeepSpeed's would)
                                 binary gradients: per bucket, the chunks of the flat vector it completes
                                 (_bucket_rows) reduce-scattered (all_to_all + local sum), averaged -> this
                                 rank's slice; or, with binary_grads: onebit after the warm-up, 1-bit messages
                                 (OneBitExchange, over the whole flat vector, which becomes the next error)
        grad_norm  other         sqrt(full-precision part + all-reduced sum of the slices' squares)
        step       weight        Adam (ClientAdam: skip, clip_coef, clamp) on the full-precision params and on
                                 this rank's latent slice; then the slice's signs, 8 per byte, all-gathered and
                                 written into every rank's module (a skipped step changes nothing, sends nothing);
                                 overlapped: per bucket in forward order, each binary layer's forward pre-hook
                                 waiting for its signs (``weights_ready()`` before reading them elsewhere)

    The full-precision params stay in the engine's client optimizer; the binary group moves into
    ``self.binary_optimizer`` (a ClientAdam over the slice), so the per-element math is the one plain data
    parallelism runs: with 2 ranks on gloo the reduced gradients are bit-identical to DeepSpeed's all-reduce.

    ``onebit_warmup_steps``: None for uncompressed binary gradients (``binary_grads: none``); else the steps
    before 1-bit gradients (``binary_grads: onebit``). Then only the sender side of :class:`OneBitExchange` is
    used: the receiver owns the optimizer of its slice and consumes the averaged gradient at full precision,
    and what goes back is the lossless sign all-gather, so unlike 1-bit Adam's compressed all-reduce there is
    no second compression and nothing for a receiver-side error buffer to hold (:class:`DataParallelOnebitSync`
    has both sides).

    Adam runs unchanged on the decoded 1-bit gradients. 1-bit Adam freezes the second moment after its
    warm-up (it compresses the momentum); we measured that rule here and dropped it: frozen from a short
    warm-up it diverged (paper RVAE, 1 warm-up step: elements whose first gradient was tiny got huge steps,
    and steps were skipped), and it was not better on the tiny RVAE (0.6% vs 0.2% above uncompressed after
    80 steps, 15 warm-up). The per-chunk scale keeps the decoded gradients, and so the second moment, at the
    gradient's scale; the warm-up keeps the first, fastest-changing steps exact.

    The module's binary weights are +-1, so an EMA (``train.ema_decay``) averages signs, not latents: EMA
    weights then use the sign of a running average of signs (a majority vote over recent steps).

    ``overlap`` (``comm.overlap``): the exchange runs in buckets of ``bucket_mb`` started during the last
    micro-step's backward (:class:`GradBuckets`, gradient-ready order); ``reduce`` waits for them. A bucket's
    binary gradients go as the 1-bit chunks of the flat vector its launch completes, so chunks, scales and
    errors are those of the whole vector: the numbers do not depend on the schedule or on ``bucket_mb`` (bit
    for bit on 2 ranks). Without it, ``reduce`` runs one bucket holding everything after backward (serial).

    Checkpoints: every rank writes ``packed/rank_<r>_of_<W>.pt`` (latent slice, Adam moments and step, sender
    error) next to DeepSpeed's files; on resume every rank reads the element ranges it now owns from whichever
    files hold them (:func:`load_partitions`), so any number of workers can resume any packed checkpoint.
    """

    mode = "packed"
    option = "binary_weights=packed"

    def __init__(
        self,
        engine,
        optimizer,
        onebit_warmup_steps: int | None = None,
        overlap: bool = False,
        bucket_mb: float = 25.0,
        resident: bool = True,
    ):
        super().__init__(engine, optimizer, onebit_warmup_steps)
        group = self.binary_group
        optimizer.param_groups.remove(group)  # the engine's optimizer keeps the full-precision params only
        lay = self.layout
        latents = [p.detach() for p in lay.params]  # identical on every rank (broadcast)
        self.latent = torch.nn.Parameter(lay.window(lay.start, lay.start + lay.slice, latents))  # (slice,)
        self.binary_optimizer = type(optimizer)([dict(group, params=[self.latent])], lr=group["lr"])
        # Every rank's signs, 8 per byte in the flat vector's order: the sign all-gathers land here.
        self._packed = torch.empty(lay.padded // 8, dtype=torch.uint8, device=self.latent.device)
        for a in range(0, lay.padded, PACK_WINDOW):  # never the whole flat vector at once
            b = min(lay.padded, a + PACK_WINDOW)
            self._packed[a // 8 : b // 8] = pack_signs(lay.window(a, b, latents))
        del latents
        self.resident = resident  # comm.resident_bits: the layers read _packed; else they hold +-1 floats
        if resident:
            layer_of = {id(m.weight): m for _, m in binary_layers(engine.module)}
            for p, o in zip(lay.params, lay.offsets, strict=True):
                layer_of[id(p)].keep_signs_resident(self._packed, o)
        else:
            lay.write_signs(self._packed)  # from here on the module holds signs only
        self.onebit = onebit_warmup_steps is not None
        self.exchange = OneBitExchange(self.layout, receiver_side=False) if self.onebit else None
        self.overlap = overlap
        self._offset = {id(p): o for p, o in zip(self.layout.params, self.layout.offsets, strict=True)}
        self._fp_pending: list[Pending] = []
        self._binary_pending: list[tuple[torch.Tensor, Pending]] = []  # (my chunks among them, exchange)
        size = bucket_mb * 2**20 if overlap else math.inf
        self.buckets = GradBuckets(engine.module, size, self._launch, self._plan, overlap)
        self._flat: torch.Tensor | None = None  # 1-bit steps: (padded,) the binary gradients, then their errors
        self._spilled: dict[int, list] = {}  # bucket -> [(offset in its rows, gradient piece)] (earlier buckets')
        self._mine: torch.Tensor | None = None  # (slice,) this step's averaged gradient, filled as buckets finish
        self._gathers: list[tuple[torch.Tensor, Pending | None, list]] = []  # in forward order, not yet written
        self._written = 0  # gathers of this step already written into the module
        if overlap:  # each module holding latents waits for their signs before its forward
            for module in engine.module.modules():
                mine = [p for p in module.parameters(recurse=False) if id(p) in self._offset]
                if mine:
                    module.register_forward_pre_hook(self._before_forward)
        log.info(
            "packed sync: %d binary latents in %d tensors, slice %d per rank (%d real), %s, signs %s",
            self.layout.numel,
            len(self.layout.params),
            self.layout.slice,
            self.layout.valid,
            f"1-bit gradients after {self.warmup} steps" if self.onebit else "uncompressed gradients",
            "resident as bits" if resident else "held as +-1 floats",
        )

    def _plan(self, buckets) -> None:
        """Which chunks of the flat binary vector each bucket sends: a chunk goes with the bucket whose launch
        completes it (the last launched of the buckets holding a latent that overlaps it; padding-only chunks
        with bucket 0), in ascending order, ``counts[r]`` of them in rank r's slice."""
        c, per_rank = ONEBIT_CHUNK, self.layout.slice // ONEBIT_CHUNK
        last = torch.zeros(self.layout.padded // c, dtype=torch.int64)
        for i, bucket in enumerate(buckets):
            for p in bucket:
                o = self._offset.get(id(p))
                if o is not None:
                    last[o // c : (o + p.numel() - 1) // c + 1].clamp_(min=i)
        self._chunks = []
        row = torch.zeros_like(last)  # each chunk's row in its bucket's buffer
        for i in range(len(buckets)):
            ids = (last == i).nonzero().flatten()
            row[ids] = torch.arange(ids.numel())
            counts = torch.bincount(ids // per_rank, minlength=self.world).tolist()
            self._chunks.append((ids.to(self.latent.device), counts))
        # Where each latent's gradient goes: (start, length, bucket, offset in that bucket's rows) for its first
        # chunk, the chunks only it covers (all sent by its own bucket, in consecutive rows) and its last chunk.
        self._segments = {}
        for p, o in zip(self.layout.params, self.layout.offsets, strict=True):
            end, j0, j1 = o + p.numel(), o // c, (o + p.numel() - 1) // c
            cuts = sorted({o, end, *[x for x in ((j0 + 1) * c, j1 * c) if o < x < end]})
            self._segments[id(p)] = [
                (a - o, b - a, int(last[a // c]), int(row[a // c]) * c + a - (a // c) * c)
                for a, b in zip(cuts, cuts[1:], strict=False)
            ]
        # The signs come back in forward order, the reverse of the buckets: gather k carries bucket L-1-k's
        # chunks, and a latent is complete after the last gather holding one of its chunks.
        gather_of_chunk = len(buckets) - 1 - last
        self._completes = [[] for _ in buckets]
        self._done_at = {}
        for p, o in zip(self.layout.params, self.layout.offsets, strict=True):
            k = int(gather_of_chunk[o // c : (o + p.numel() - 1) // c + 1].max())
            self._completes[k].append(p)
            self._done_at[id(p)] = k

    def backward(self, loss, last):
        if last:
            self._next_compressed()  # this step's exchange, decided before its first bucket goes
            if self.overlap:
                self.buckets.arm()
        super().backward(loss, last)

    @torch.no_grad()
    def _launch(self, index: int, params) -> None:
        """Start bucket ``index``: its full-precision gradients' all-reduce and the binary chunks it completes."""
        with comm_kind("grad"):  # hooks may run on autograd's device threads: label the bytes here
            fp = [p for p in params if id(p) not in self._offset]
            if fp:
                self._fp_pending.append(start_all_reduce_mean(fp))
            self._drain(wait=False)  # release what has arrived before this bucket's buffers are made
            chunks, counts = self._chunks[index]
            c = ONEBIT_CHUNK
            if self._compressed:  # error feedback: the whole flat vector becomes the next send_error
                if self._flat is None:
                    self._flat = torch.zeros(self.layout.padded, device=self.latent.device)
                for p in params:
                    o = self._offset.get(id(p))
                    if o is not None:
                        if p.grad is not None:
                            self._flat[o : o + p.numel()].copy_(p.grad.reshape(-1))
                        p.grad = None
                if not chunks.numel():
                    return
                pending = self.exchange.start_reduce_scatter(self._flat, chunks, counts)  # errors into _flat
            else:
                rows = self._bucket_rows(index, params)
                if not chunks.numel():
                    return
                pending = start_slice_sum(rows, [n * c for n in counts])
            first = self.layout.start // c
            mine = chunks[(chunks >= first) & (chunks < first + self.layout.slice // c)] - first
            self._binary_pending.append((mine, pending))
            self._drain(wait=False)

    def _bucket_rows(self, index: int, params) -> torch.Tensor:
        """(k * ONEBIT_CHUNK,) the chunks bucket ``index`` sends, from its latents' gradients and the pieces
        earlier buckets left for it; the gradients are released (pieces of chunks a later bucket sends are
        kept for it). Only buffers of buckets in flight exist: never the whole flat gradient."""
        ids, _ = self._chunks[index]
        rows = torch.zeros(ids.numel() * ONEBIT_CHUNK, device=self.latent.device)
        for at, piece in self._spilled.pop(index, ()):
            rows[at : at + piece.numel()] = piece
        for p in params:
            segments = self._segments.get(id(p))
            if segments is None:
                continue
            if p.grad is not None:
                g = p.grad.reshape(-1)
                for start, n, bucket, at in segments:
                    if bucket == index:
                        rows[at : at + n] = g[start : start + n]
                    else:
                        self._spilled.setdefault(bucket, []).append((at, g[start : start + n].clone()))
            p.grad = None
        return rows

    @torch.no_grad()
    def _drain(self, wait: bool) -> None:
        """Finish the binary exchanges in flight, oldest first: those already completed, or (``wait``) all.
        Each lands in this rank's slice of the averaged gradient, and its buffers are released."""
        if self._mine is None:
            self._mine = torch.zeros(self.layout.slice, device=self.latent.device)
        while self._binary_pending and (wait or self._binary_pending[0][1].done()):
            chunks, pending = self._binary_pending.pop(0)
            part = pending.wait()
            if not self._compressed:
                part.mul_(1.0 / self.world)
            self._mine.view(-1, ONEBIT_CHUNK)[chunks] = part.view(-1, ONEBIT_CHUNK)

    @torch.no_grad()
    def reduce(self):
        self.buckets.finish()
        for pending in self._fp_pending:
            pending.wait()
        self._drain(wait=True)
        mine, self._mine = self._mine, None
        mine[self.layout.valid :] = 0
        self._fp_pending.clear()
        self._flat = None
        self.latent.grad = mine  # (slice,); padding is zero

    @torch.no_grad()
    def grad_norm(self):
        with comm_kind("other"):
            fp = torch.stack([p.grad.float().pow(2).sum() for p in self.fp_params]).sum()
            mine = _square_sum(self.latent.grad).reshape(1)
            dist.all_reduce(mine)  # identical on every rank, as is the full-precision part
        return nan_as_inf(torch.sqrt(fp + mine[0]))

    def step(self, lr, clip_coef, skip):
        skip = bool(skip)  # a host decision: whether to send this step's signs and keep its errors depends on it
        self.weights_ready()  # what no forward waited for (a latent the step did not use)
        super().step(lr, clip_coef, skip)  # full-precision update (ClientAdam), DeepSpeed's counters, grads cleared
        set_lr(self.binary_optimizer, lr)
        self.binary_optimizer.step(clip_coef=clip_coef, skip=skip)  # Adam + clamp on the slice
        self._settle(skip)
        self.latent.grad = None
        if not skip:
            self._start_gathers() if self.overlap else self._gather_signs()

    @torch.no_grad()
    def _start_gathers(self) -> None:
        """Start the sign all-gather bucket by bucket in forward order (each rank's bytes of the chunks a bucket
        sends, to every rank); the next forward writes each module's signs as it reaches it."""
        c, first = ONEBIT_CHUNK, self.layout.start // ONEBIT_CHUNK
        mine = _pack_slice(self.latent).view(-1, c // 8)  # (slice/c, c/8) uint8: this rank's chunks
        with comm_kind("weight"):
            for k, i in enumerate(reversed(range(len(self._chunks)))):
                ids, counts = self._chunks[i]
                pending = None
                if ids.numel():
                    send = mine[ids[(ids >= first) & (ids < first + mine.shape[0])] - first].reshape(-1)
                    recv = send.new_empty(len(ids) * c // 8)
                    sizes = [n * c // 8 for n in counts]
                    work = dist.all_to_all_single(recv, send.repeat(self.world), sizes, [send.numel()] * self.world,
                                                  async_op=True)  # fmt: skip
                    pending = Pending(work, lambda recv=recv: recv)
                self._gathers.append((ids, pending, self._completes[k]))

    def _before_forward(self, module, args) -> None:
        if self._gathers:  # nothing in flight on most forwards (eval, recomputation, before the first step)
            done = [self._done_at[id(p)] for p in module.parameters(recurse=False) if id(p) in self._offset]
            self.weights_ready(max(done))

    @torch.no_grad()
    def weights_ready(self, upto: int | None = None) -> None:
        """Write the signs of the gathers in flight into the module, up to gather ``upto`` (all by default):
        the module's binary weights are current inside forward and after this call."""
        c = ONEBIT_CHUNK
        while self._gathers and (upto is None or self._written <= upto):
            ids, pending, latents = self._gathers[0]
            if pending is not None:
                self._packed.view(-1, c // 8)[ids] = pending.wait().view(-1, c // 8)
            if latents and not self.resident:
                self.layout.write_signs(self._packed, latents)
            self._gathers.pop(0)
            self._written += 1
        if not self._gathers:
            self._written = 0

    @torch.no_grad()
    def _gather_signs(self) -> None:
        with comm_kind("weight"):
            all_gather_flat(self._packed, _pack_slice(self.latent))  # in place: resident layers read these words
        if not self.resident:
            self.layout.write_signs(self._packed)

    # ---------------------------------------------------------------------------------------- checkpoints
    def rank_tensors(self) -> list[torch.Tensor]:
        return [self.latent]

    def save_partition(self, directory: str | Path):
        state = self.binary_optimizer.state.get(self.latent, {})
        ranged = {"latent": self.latent, "exp_avg": state.get("exp_avg"), "exp_avg_sq": state.get("exp_avg_sq")}
        full = {"send_error": self.exchange.send_error if self.exchange else None}
        step = state["step"].cpu().clone() if state else None
        return save_partition(directory, self.layout, ranged, full, {"step": step})

    @torch.no_grad()
    def load_partition(self, directory: str | Path):
        part = load_partitions(
            directory, self.layout, ["latent", "exp_avg", "exp_avg_sq"], ["send_error"] if self.onebit else []
        )
        if part["latent"] is None:
            raise RuntimeError(f"{directory}: the partitions hold no latents (written by another comm mode?)")
        self.latent.copy_(part["latent"])
        self.binary_optimizer.state.pop(self.latent, None)
        if part["step"] is not None and part["exp_avg"] is not None:
            self.binary_optimizer.state[self.latent] = {
                "step": part["step"].clone(),
                "exp_avg": part["exp_avg"],
                "exp_avg_sq": part["exp_avg_sq"],
            }
        if self.onebit and part["send_error"] is not None:
            self.exchange.send_error = part["send_error"]
        self._gather_signs()

    def full_state(self) -> dict[str, torch.Tensor]:
        """The whole (unsharded) binary state on every rank: latents, Adam moments and, with 1-bit gradients,
        the sum of the ranks' sender errors. For tests and inspection (all-gathers everything)."""
        self.weights_ready()
        state = self.binary_optimizer.state.get(self.latent, {})
        parts = {"latent": self.latent.detach()}
        if state:
            parts.update(exp_avg=state["exp_avg"], exp_avg_sq=state["exp_avg_sq"])
        out = {}
        with comm_kind("other"):
            for k, t in parts.items():
                out[k] = all_gather_flat(t.new_empty(self.layout.padded), t.contiguous())[: self.layout.numel]
            if self.exchange is not None:
                e = self.exchange.send_error.clone()
                dist.all_reduce(e)
                out["send_error_sum"] = e[: self.layout.numel]
        return out
