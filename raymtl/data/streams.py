"""Streams of training batches from Ray Data."""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np

from raymtl.data.multitask import collate


def cycle_batches(shard, batch_size: int, seed: int, bucket: int, collate_fn=collate, skip: int = 0):
    """Endless stream of padded batches from a Ray Data shard, reshuffled every epoch; the
    first ``skip`` batches are drawn (the same shuffles) but not collated or yielded, so a
    resumed run continues the stream where its checkpoint left it.

    Length bucketing: a window of ``bucket`` batches is sorted by row length (the summed
    length of its ``ids_*`` columns) and cut into batches, which are then yielded in random
    order, so a batch pads to a similar length.
    """
    rng = np.random.default_rng(seed)
    epoch = 0
    while True:
        yielded = False
        for window in shard.iter_batches(batch_size=batch_size * bucket, batch_format="numpy",
                                         local_shuffle_buffer_size=4 * batch_size * bucket,
                                         local_shuffle_seed=seed + epoch):
            id_cols = [k for k in window if k.startswith("ids_")]
            n = len(window[id_cols[0]]) // batch_size * batch_size   # drop the ragged tail
            lengths = np.array([sum(len(window[c][i]) for c in id_cols) for i in range(n)])
            order = np.argsort(lengths + rng.random(n), kind="stable") if bucket > 1 else np.arange(n)
            chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
            for j in rng.permutation(len(chunks)):
                yielded = True
                if skip:
                    skip -= 1
                    continue
                yield collate_fn({k: v[chunks[j]] for k, v in window.items()})
        if not yielded:
            raise ValueError(f"a training shard has fewer rows than one batch ({batch_size}); "
                             "lower batch_size or num_workers")
        epoch += 1


class Prefetched:
    """An iterator pulled ahead by a daemon thread of its own, up to ``depth`` items: the
    stream's start-up (a Ray Data execution) and its batches' collation run while the loop
    does other work. The order is the stream's own; an error the stream raises reaches the
    caller at the item where it happened (and again on every later call). ``close()`` stops
    the thread (it also stops with the process)."""

    def __init__(self, it: Iterator, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._fill, args=(it,), daemon=True, name="raymtl-prefetch")
        self.thread.start()

    def _fill(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put((item, None)):
                    return
            self._put((None, StopIteration()))
        except BaseException as e:              # handed to the caller, raised there
            self._put((None, e))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._error is not None:
            raise self._error
        item, error = self._q.get()
        if error is not None:
            self._error = error
            raise error
        return item

    def close(self) -> None:
        self._stop.set()


def prefetched(streams: dict[str, Iterator], depth: int = 2) -> dict[str, Prefetched]:
    """Every stream pulled ahead at once (``Prefetched``): their start-ups overlap each other and
    whatever the loop does meanwhile (building the model), instead of running one after another
    at the first steps that draw them."""
    return {name: Prefetched(it, depth) for name, it in streams.items()}


def configure_ray_data(verbose: bool = True) -> None:
    """Ray Data's per-dataset progress bars drown raymtl's own progress lines (and without
    ``verbose`` its per-dataset log lines go too). And by default
    Ray Data hands blocks on in the order its tasks finish, so the same seeds trained on the
    rows in another order from run to run (tokenizing, filtering, reading a shard): keep the
    order, so a run is reproducible and two setups on one seed see the same batches."""
    import logging
    import warnings

    import ray.data
    if not verbose:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", message=r".*exclude_resources.*is deprecated")
    ctx = ray.data.DataContext.get_current()
    # Ray 2.60's V2 file reads list the files in a 1-CPU task at execution time, which waits
    # forever beside training workers that hold every CPU; V1 lists them on the driver when
    # the dataset is made, and its read tasks take the CPUs asked (none: Prepared.dataset).
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True


def ingest_options():
    """Ray Train's options for the workers' dataset shards, in order (``configure_ray_data``)."""
    import ray.train
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return options
