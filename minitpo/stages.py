"""The stage protocol: how one stage of an iteration runs, resumes and writes.

A stage is named by the file in iter-N/ that marks it done (written last, atomically, by minitpo/io.py):
a resumed run skips a done stage and reads that file back. `Stages(it).run(STAGE, work)`

- asks whether the stage is done (rank 0's reading of the file, told to every rank);
- when not, runs `work()` on every rank (under torchrun each does its share: minitpo/dist.py); work
  returns, on rank 0, the stage's files as {name in iter-N/: content} (None on the other ranks);
- writes them on rank 0 alone, in order, the stage's own file last: a list as JSONL, a dict as JSON,
  a function as fn(path) (an adapter folder, a cache merged from the ranks' parts);
- records in iter-N/stages.json the stage's wall time, the world size, the peak memory the plan
  predicted (`predicted_peak_gib`, minitpo/plan.py) and the measured one: on a GPU the most memory torch
  held during the stage (this rank's, `peak_gpu_gib`); on a Linux CPU the process's peak resident memory
  during it (`peak_rss_gib`, reset at the stage's start) and its resident memory at the start
  (`start_rss_gib`): the difference is what the stage added, libraries it imported included;
  `record` adds what a stage chose at run time (the sampler's slots under batch_size auto,
  `sampling_slots`);
- returns the stage's rows read back from its file, so a run that stopped and one that did not go on
  from the same data.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from minitpo import dist, errors, io, rundir
from minitpo.device import reset_peak_rss, rss_bytes, trim_heap


@dataclass(frozen=True)
class Stage:
    name: str
    output: str  # in iter-N/, written last: the stage is done


SAMPLE = Stage("sample", rundir.CANDIDATES)
JUDGE = Stage("judge", rundir.SCORES)
PAIR = Stage("pair", rundir.PAIRS)
TRAIN = Stage("train", rundir.TRAIN_SUMMARY)
# what stages.json holds beside the stages' wall times
_NOT_TIMES = ("world_size", "peak_gpu_gib", "sampling_slots", "predicted_peak_gib", "peak_rss_gib", "start_rss_gib")


class Stages:
    """The stages of one iteration folder `it`, and their times (iter-N/stages.json)."""

    def __init__(self, it: Path, predicted: dict | None = None):
        self.it = Path(it)
        path = self.it / rundir.STAGES
        self.times = io.read_json(path) if path.exists() else {}
        self.predicted = predicted or {}  # {stage name: GiB}, from the plan

    def run(self, stage: Stage, work: Callable[[], dict | None]):
        path = self.it / stage.output
        errors.check_terminated()  # a SIGTERM dropped inside a __del__ stops the run here, between stages
        if not dist.broadcast(path.exists()):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            start_rss = None if torch.cuda.is_available() else _reset_peak_rss()
            t0 = time.perf_counter()
            files = work()  # every rank
            if dist.is_main():
                assert files and list(files)[-1] == stage.output, f"{stage.name}: {list(files or ())} must end with {stage.output}"
                for name, content in files.items():
                    _write(self.it / name, content)
            dist.barrier()
            self.times[stage.name] = round(time.perf_counter() - t0, 2)
            self.times["world_size"] = dist.world_size()
            if torch.cuda.is_available():
                self.times.setdefault("peak_gpu_gib", {})[stage.name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            elif start_rss is not None:
                self.times.setdefault("peak_rss_gib", {})[stage.name] = round(rss_bytes("VmHWM") / 2**30, 3)
                self.times.setdefault("start_rss_gib", {})[stage.name] = round(start_rss / 2**30, 3)
            if self.predicted.get(stage.name) is not None:
                self.times.setdefault("predicted_peak_gib", {})[stage.name] = self.predicted[stage.name]
            self._save_times()
        elif stage.name not in self.times:  # killed between writing the output and its time: the time is lost
            self.times[stage.name] = None
            self._save_times()
        return io.read_jsonl(path) if path.suffix == ".jsonl" else io.read_json(path)

    def record(self, key: str, value) -> None:
        """Keep `value` in stages.json under `key` (one of _NOT_TIMES): what a stage chose at run time."""
        assert key in _NOT_TIMES, f"{key} is not a stages.json key beside the times"
        self.times[key] = value
        self._save_times()

    def wall_times(self) -> dict:
        """{stage name: seconds} (None for a time lost to a kill), for the iteration's summary."""
        return {k: v for k, v in self.times.items() if k not in _NOT_TIMES}

    def _save_times(self) -> None:
        if dist.is_main():
            io.write_json(self.it / rundir.STAGES, self.times)


def _write(path: Path, content) -> None:
    if callable(content):
        content(path)
    elif isinstance(content, list):
        io.write_jsonl(path, content)
    else:
        io.write_json(path, content)


def _reset_peak_rss() -> int | None:
    """The heap's free pages handed back (what the last stage freed would otherwise be reused unseen), then
    this process's peak resident memory reset to its current one, which is returned (None without /proc)."""
    trim_heap()
    return reset_peak_rss()
