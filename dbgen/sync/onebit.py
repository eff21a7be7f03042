"""1-bit compression of gradients: the message format and the error-feedback exchange (after 1-bit Adam).

Why its own module: the format (signs 8 per byte plus one fp32 scale per :data:`ONEBIT_CHUNK` elements) and
the error feedback that makes a biased 1-bit compressor converge are the same for every mode that sends 1-bit
gradients (``packed/onebit`` uses the sender side, ``dp/onebit`` both sides); the modes only decide when to
compress (after ``comm.onebit_warmup_steps``) and whether a step's errors are kept.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..nn import pack_signs, unpack_signs
from .collectives import Pending, all_gather_flat, sum_rows
from .layout import ALIGN, BinaryLayout, chunk_rows

__all__ = ["ONEBIT_CHUNK", "OneBitExchange", "onebit_compress", "onebit_decompress"]

ONEBIT_CHUNK = 2048  # elements that share one fp32 scale in a 1-bit message (1 + 32/2048 bits per element)
assert ALIGN % ONEBIT_CHUNK == 0, "a layout slice must hold whole 1-bit chunks"


def onebit_compress(x: torch.Tensor, chunk: int = ONEBIT_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (n,), n a multiple of ``chunk`` -> (signs packed 8 per byte (n/8,) uint8, scales (n/chunk,) fp32).

    The scale of a chunk is the mean of ``|x|`` over it: the ``s`` minimizing ``||x - s * sign(x)||^2``.
    """
    scales = x.view(-1, chunk).abs().mean(dim=1)  # (n/chunk,)
    return pack_signs(x), scales.float()


def onebit_decompress(bits: torch.Tensor, scales: torch.Tensor, chunk: int = ONEBIT_CHUNK) -> torch.Tensor:
    """``sign * scale`` per element, (n,): :func:`onebit_compress`'s input up to the compression error."""
    n = scales.numel() * chunk
    return (unpack_signs(bits, (scales.numel(), chunk)) * scales[:, None]).view(n)


def _encode(x: torch.Tensor, parts: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (parts * s,) -> (messages (parts, s/8 + 4 s/chunk) uint8: signs then scale bytes, decoded x)."""
    s = x.numel() // parts
    bits, scales = onebit_compress(x, chunk)
    msg = torch.cat([bits.view(parts, s // 8), scales.view(parts, s // chunk).view(torch.uint8)], dim=1)
    return msg, onebit_decompress(bits, scales, chunk)


def _decode(msgs: torch.Tensor, s: int, chunk: int) -> torch.Tensor:
    """(parts, s/8 + 4 s/chunk) uint8 messages -> (parts, s) values."""
    bits, scales = msgs[:, : s // 8], msgs[:, s // 8 :].contiguous().view(torch.float32)
    return onebit_decompress(bits.reshape(-1), scales.reshape(-1), chunk).view(msgs.shape[0], s)


class OneBitExchange:
    """1-bit gradient exchange with error feedback over a :class:`BinaryLayout` (after 1-bit Adam).

    * :meth:`reduce_scatter` (sender side): ``x = g + send_error``; every peer gets the signs of its slice of
      ``x`` plus one fp32 scale per :data:`ONEBIT_CHUNK` elements (``all_to_all``), and what the message did
      not carry, ``x - decoded``, is the new ``send_error``. The receiver averages the W decoded messages at
      full precision: this rank's slice of the averaged gradient. :meth:`start_reduce_scatter` does the same
      for any set of chunks of the vector (the overlapped schedule's buckets), with the same numbers.
    * :meth:`all_gather` (receiver side, for modes that must send the averaged gradient back to everyone):
      ``z = slice + recv_error`` is compressed the same way and all-gathered; ``z - decoded`` is the new
      ``recv_error``. Every rank decodes every slice: the full averaged gradient, identical on all ranks.

    New error buffers are pending until :meth:`commit` (the step was taken); :meth:`discard` drops them (a
    skipped step: its gradient is dropped, so is what it left unsent). Padding elements stay exactly zero.
    """

    def __init__(self, layout: BinaryLayout, receiver_side: bool):
        self.layout = layout
        dev = layout.params[0].device
        self.send_error = torch.zeros(layout.padded, device=dev)  # (padded,) indexed like the flat gradient
        self.recv_error = torch.zeros(layout.slice, device=dev) if receiver_side else None  # (slice,)
        self._pending: dict[str, torch.Tensor] = {}

    def reduce_scatter(self, g: torch.Tensor) -> torch.Tensor:
        """(padded,) local gradient (consumed) -> (slice,) this rank's slice of the average over ranks."""
        lay, c = self.layout, ONEBIT_CHUNK
        chunks = torch.arange(lay.padded // c, device=g.device)
        mine = self.start_reduce_scatter(g, chunks, [lay.slice // c] * lay.world).wait()
        mine[lay.valid :] = 0
        return mine

    def start_reduce_scatter(self, g: torch.Tensor, chunks: torch.Tensor, counts: list[int]) -> Pending:
        """Start the exchange of the chunks ``chunks`` (k,) (ascending; ``counts[r]`` of them in rank r's slice)
        of ``g`` (padded,), this rank's flat gradient. ``g`` is consumed: those chunks end up holding their new
        error, and ``g`` becomes the pending ``send_error`` (every chunk must be sent once before ``commit``).
        ``wait()`` returns this rank's chunks among them, averaged over ranks, (counts[rank] * ONEBIT_CHUNK,);
        padding in them is not zeroed. A chunk's scale and error depend on that chunk only: sending the vector
        in any grouping of chunks (the overlapped schedule's buckets) gives the numbers of sending it whole."""
        lay, c = self.layout, ONEBIT_CHUNK
        k = chunks.numel()
        x, in_place = chunk_rows(g, c, chunks)  # (k, c): a view of g, or a copy to write back
        x.add_(chunk_rows(self.send_error, c, chunks)[0])
        bits, scales = onebit_compress(x.view(-1), c)  # (k * c / 8,) uint8, (k,)
        error = x.sub_(onebit_decompress(bits, scales, c).view(k, c))
        for j in (chunks >= lay.numel // c).nonzero().flatten().tolist():  # padding carries no error
            error[j, max(0, lay.numel - int(chunks[j]) * c) :] = 0
        if not in_place:
            g.view(-1, c)[chunks] = error
        self._pending["send_error"] = g
        parts, o = [], 0  # one message per destination: the signs of its chunks, then their scales' bytes
        for n in counts:
            parts += [bits.view(k, c // 8)[o : o + n].reshape(-1), scales[o : o + n].view(torch.uint8)]
            o += n
        mine = counts[lay.rank]
        size = mine * (c // 8 + 4)
        recv = bits.new_empty(lay.world * size)
        sizes = [n * (c // 8 + 4) for n in counts]
        work = dist.all_to_all_single(recv, torch.cat(parts), [size] * lay.world, sizes, async_op=True)

        def finish():  # recv.view(world, size)[j]: rank j's message about my chunks
            if mine == 0:
                return x.new_zeros(0)
            return sum_rows(_decode(recv.view(lay.world, size), mine * c, c)).mul_(1.0 / lay.world)

        return Pending(work, finish)

    def all_gather(self, mine: torch.Tensor) -> torch.Tensor:
        """(slice,) this rank's averaged slice -> (padded,) every slice, as decoded 1-bit messages."""
        lay, c = self.layout, ONEBIT_CHUNK
        z = mine + self.recv_error
        msg, decoded = _encode(z, 1, c)  # (1, slice/8 + 4 slice/c)
        error = z.sub_(decoded)
        error[lay.valid :] = 0
        self._pending["recv_error"] = error
        out = all_gather_flat(msg.new_empty(lay.world * msg.numel()), msg.view(-1))
        full = _decode(out.view(lay.world, -1), lay.slice, c).view(-1)
        full[lay.numel :] = 0
        return full

    def commit(self) -> None:
        for name, t in self._pending.items():
            setattr(self, name, t)
        self._pending.clear()

    def discard(self) -> None:
        self._pending.clear()
