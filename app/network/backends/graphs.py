"""The whole network as one CUDA graph per shape bucket: every exit's logits in one
replay, for the batches that per-batch dispatch sends through in one pass
(`app.engine.dispatch`).

A batch of B rows of at most T tokens is padded up to the smallest bucket (b, t) that
holds it: extra rows hold one real token (so no row is all padding), extra positions are
masked out. One graph per bucket is captured the first time a bucket is needed (start-up
dispatch measurement touches the common ones), all in one shared memory pool, and
replayed with the batch copied into its static inputs: one launch for the whole network
where eager runs launch hundreds of kernels. On a device without CUDA graphs (the CPU,
where tests run this code) the same padding and slicing wrap an eager call, so the
bucketing is what is tested there and replay is the only part that is not. A batch
larger than the largest bucket runs eagerly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from app.network.multi_exit import MultiExitNetwork

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)
Runner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # ids, mask -> (L, b, C)


def bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding n, or None when n is above every bucket."""
    return next((b for b in buckets if b >= n), None)


class WholeGraphs:
    """`MultiExitNetwork.forward`'s logits (L, B, C) for a padded batch, by bucket."""

    def __init__(
        self,
        model: MultiExitNetwork,
        max_rows: int = ROW_BUCKETS[-1],
        max_length: int | None = None,
        capture: bool | None = None,
    ) -> None:
        self.model = model
        longest = max_length or model.cfg.max_seq_len
        self.rows = (*(b for b in ROW_BUCKETS if b < max_rows), max_rows)
        self.lengths = (*(t for t in LENGTH_BUCKETS if t < longest), longest)
        self.capture = model.device.type == "cuda" if capture is None else capture
        self._runners: dict[tuple[int, int], Runner] = {}
        self._pool: Any = None  # one memory pool shared by every captured graph

    @property
    def captured(self) -> int:
        """Graphs captured so far (what /info reports)."""
        return len(self._runners) if self.capture else 0

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        b, t = bucket(B, self.rows), bucket(T, self.lengths)
        if b is None or t is None:
            with torch.inference_mode():
                return self.model(ids, mask).logits
        pad_ids = ids.new_zeros(b, t)
        pad_ids[:B, :T] = ids
        pad_mask = mask.new_zeros(b, t)
        pad_mask[:B, :T] = mask
        pad_mask[B:, 0] = 1  # a filler row holds one token: no row is all padding
        runner = self._runners.get((b, t))
        if runner is None:
            runner = self._runners[(b, t)] = self._runner(b, t, pad_ids, pad_mask)
        with torch.inference_mode():
            return runner(pad_ids, pad_mask)[:, :B]

    def _runner(self, b: int, t: int, ids: torch.Tensor, mask: torch.Tensor) -> Runner:
        model = self.model
        if not self.capture:
            return lambda i, m: model(i, m).logits
        static_ids, static_mask = ids.clone(), mask.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm the kernels and the allocator before capture
                model(static_ids, static_mask)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool), torch.inference_mode():
            static_out = model(static_ids, static_mask).logits

        def replay(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            static_ids.copy_(i)
            static_mask.copy_(m)
            graph.replay()
            return static_out.clone()

        return replay
