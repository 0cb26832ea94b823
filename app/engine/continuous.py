"""Layer-wise continuous batching: rows from different requests meet at each depth.

Optional (EXITSERVE_BATCHING=continuous): on 2 cores it measured slower than static
batches (docs/decisions.md): shallowest-first steps run small groups, and small layer
steps waste the threads.

With early exit a batch thins out as it goes deeper: after a few layers one or two
hard rows remain, and in a static batch every new arrival waits until they reach the
last layer. Here the worker keeps one group of rows per depth. Each step runs one
layer for one group; rows that leave are answered, the rest move one depth down and
merge with the group already waiting there. New inputs enter at depth 0, so easy
inputs never queue behind hard ones, and the few rows that go deep ride along with
later arrivals that reach the same depth, which keeps the deep layers' batches full.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import torch

from app.engine.executor import decide_on_logits
from app.network import exit_rule
from app.network.backends import Backend, RunningBatch
from app.network.exit_rule import Prediction, Row

K = TypeVar("K")
log = logging.getLogger(__name__)


@dataclass
class _Group(Generic[K]):
    depth: int  # layers already run on these rows
    batch: RunningBatch
    rows: list[Row]
    keys: list[K]
    waited: int = 0  # steps this group has been passed over


@dataclass
class ContinuousBatcher(Generic[K]):
    """Holds rows at every depth; `step` advances one depth group by one layer."""

    backend: Backend
    max_batch_size: int = 32
    groups: dict[int, _Group[K]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(g.rows) for g in self.groups.values())

    def add(self, rows: Sequence[Row], keys: Sequence[K]) -> None:
        """Embed new rows and place them at depth 0."""
        if not rows:
            return
        exit_rule.check_rows(rows, self.backend.num_layers)
        with torch.inference_mode():
            batch = self.backend.begin([r.token_ids for r in rows])
        self._place(_Group(0, batch, list(rows), list(keys)))

    def _place(self, group: _Group[K]) -> None:
        held = self.groups.get(group.depth)
        if held is not None:
            with torch.inference_mode():
                batch = self.backend.join(held.batch, group.batch)
            group = _Group(
                group.depth,
                batch,
                held.rows + group.rows,
                held.keys + group.keys,
                max(held.waited, group.waited),
            )
        self.groups[group.depth] = group

    def _pick(self) -> _Group[K]:
        # The shallowest group runs: it catches up with the groups waiting deeper and
        # merges with them, which is where the batching gain comes from. A group passed
        # over for L steps runs next, so deep rows wait a bounded time under any load.
        L = self.backend.num_layers
        starved = [d for d, g in self.groups.items() if g.waited >= L]
        depth = min(self.groups)
        if starved:
            depth = max(starved, key=lambda d: self.groups[d].waited)
        group = self.groups.pop(depth)
        if len(group.rows) > self.max_batch_size:  # run a full batch, keep the rest waiting
            n, net = self.max_batch_size, self.backend
            with torch.inference_mode():
                first = net.keep(group.batch, range(n))
                rest = net.keep(group.batch, range(n, len(group.rows)))
            self.groups[depth] = _Group(depth, rest, group.rows[n:], group.keys[n:])
            group = _Group(depth, first, group.rows[:n], group.keys[:n])
        for g in self.groups.values():
            g.waited += 1
        group.waited = 0
        return group

    def step(
        self,
        on_answer: Callable[[K, Prediction], None],
        on_error: Callable[[K, Exception], None],
    ) -> int:
        """Run one layer for one group; returns how many rows it ran (0 when idle).

        If the layer fails, only that group's rows are failed (through `on_error`); the
        other groups stay and later steps go on.
        """
        if not self.groups:
            return 0
        g = self._pick()
        try:
            self._advance(g, on_answer)
        except Exception as e:
            log.exception("layer %d failed for %d rows", g.depth + 1, len(g.rows))
            for key in g.keys:
                on_error(key, e)
        return len(g.rows)

    def _advance(self, g: _Group[K], on_answer: Callable[[K, Prediction], None]) -> None:
        net, i = self.backend, g.depth
        with torch.inference_mode():
            batch = net.step(i, g.batch, exit=exit_rule.may_leave(i, g.rows, net.num_layers))
            keep = decide_on_logits(
                net, i, batch.logits, g.rows, lambda j, p: on_answer(g.keys[j], p)
            )
            if keep:
                if len(keep) < len(g.rows):
                    batch = net.keep(batch, keep)
                rows, keys = [g.rows[j] for j in keep], [g.keys[j] for j in keep]
                self._place(_Group(i + 1, batch, rows, keys))
