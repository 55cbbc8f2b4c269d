"""Live metrics: what a run logs to TensorBoard or Weights & Biases while it runs (recipe key log.to).

Consumes the rows the loop already writes: each optimizer update's row of iter-N/train_log.jsonl
(minitpo.train) and each iteration's summary (minitpo.summary) with the peak memory of its
stages.json. Produces TensorBoard event files under RUN_DIR/logs/ (`tensorboard --logdir RUN_DIR/logs`)
or a W&B run whose files are under RUN_DIR/logs/wandb/. Nothing here computes a number: the files
in the run directory stay the source of truth, and `minitpo report` draws from them afterwards.

  train/<key>           per update, x = the global update step (continued across iterations):
                        loss, chosen_reward, rejected_reward, margin, reward_accuracy, lr, tokens_per_s, grad_norm
  iteration/<key>       per iteration, x = the iteration: every number of its summary (parse_rate,
                        marker_rate, judge_score, thought_chars, response_chars, pairs, ...)
  stage_wall_s/<stage>  per iteration: each stage's wall time
  peak_gpu_gib/<stage>  per iteration, on a GPU: the most memory torch held during each stage

A resumed run continues the same curves, each step once. The global step of iteration t's update u
is u plus the updates of iterations 1..t-1 (their train_summary.json), so a rerun of a killed
iteration writes the steps its killed attempt wrote. TensorBoard: a process's first event file of
each kind starts with a purge at its first step (SummaryWriter's purge_step), which hides every
point a killed process wrote from that step on. W&B cannot take a point back: logs/wandb.json keeps
the run's id and the last step sent, and a resumed process sends only later steps (so the curve of a
rerun iteration holds the killed attempt's first points, and train_log.jsonl the rerun's).

Under torchrun only rank 0 logs.
"""

from pathlib import Path

from minitpo import io, rundir

UPDATE_KEYS = ("loss", "chosen_reward", "rejected_reward", "margin", "reward_accuracy", "lr", "tokens_per_s",
               "grad_norm")  # of a train_log.jsonl row
WANDB_STATE = "wandb.json"  # in RUN_DIR/logs/: the W&B run's id and the last steps sent to it


class Live:
    """The run's live log: `update(t, row)` per optimizer update, `iteration(t, summary)` per finished
    iteration, `close()` at the end. `to` is the recipe's log.to; with "none", or off rank 0, it does nothing."""

    def __init__(self, to: str, out: Path, config: dict | None = None, main: bool = True):
        self.to = to if main else "none"
        self.out, self.logs = Path(out), Path(out) / rundir.LOGS
        self.writers = {}  # TensorBoard: "train" and "iteration", each opened at its first point
        self.offsets = {}  # iteration -> updates of the iterations before it
        self.wandb = self.sent = None
        if self.to == "wandb":
            self._open_wandb(config or {})

    def update(self, t: int, row: dict) -> None:
        """One optimizer update of iteration t: a train_log.jsonl row (its "step" counts from 1 in t)."""
        if self.to == "none":
            return
        step = self._offset(t) + row["step"]
        values = {f"train/{k}": row[k] for k in UPDATE_KEYS if row.get(k) is not None}
        if self.to == "tensorboard":
            self._scalars("train", step, values)
        elif step > self.sent["train_step"]:
            self.wandb.log({"train/step": step, **values})
            self._sent(train_step=step)

    def iteration(self, t: int, summary: dict) -> None:
        """Iteration t's summary (summary.json) and its stages' peak memory (stages.json)."""
        if self.to == "none":
            return
        values = {f"iteration/{k}": v for k, v in summary.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "iteration"}
        values |= {f"stage_wall_s/{k}": v for k, v in summary.get("stage_wall_s", {}).items() if v is not None}
        stages = rundir.iteration_dir(self.out, t) / rundir.STAGES
        peaks = io.read_json(stages).get("peak_gpu_gib", {}) if stages.exists() else {}
        values |= {f"peak_gpu_gib/{k}": v for k, v in peaks.items()}
        if self.to == "tensorboard":
            self._scalars("iteration", t, values)
        elif t > self.sent["iteration"]:
            self.wandb.log({"iteration": t, **values})
            self._sent(iteration=t)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers = {}
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _offset(self, t: int) -> int:
        if t not in self.offsets:
            done = (rundir.iteration_dir(self.out, s) / rundir.TRAIN_SUMMARY for s in range(1, t))
            self.offsets[t] = sum(io.read_json(p).get("updates", 0) for p in done if p.exists())
        return self.offsets[t]

    def _scalars(self, kind: str, step: int, values: dict) -> None:
        if kind not in self.writers:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a killed process's points from this step on are hidden (see the docstring)
            self.writers[kind] = SummaryWriter(str(self.logs / kind), purge_step=step)
        writer = self.writers[kind]
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
        writer.flush()  # on disk now: for whoever watches, and so a later kill cannot lose it

    def _open_wandb(self, config: dict) -> None:
        import os
        import uuid

        import wandb

        path = self.logs / WANDB_STATE
        self.sent = io.read_json(path) if path.exists() else {"id": uuid.uuid4().hex[:8], "train_step": 0,
                                                              "iteration": 0}
        self.logs.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "minitpo"), name=self.out.name,
                                id=self.sent["id"], resume="allow", dir=str(self.logs), config=config)
        self.wandb.define_metric("train/step")
        self.wandb.define_metric("train/*", step_metric="train/step")
        self.wandb.define_metric("iteration")
        for prefix in ("iteration", "stage_wall_s", "peak_gpu_gib"):
            self.wandb.define_metric(f"{prefix}/*", step_metric="iteration")
        self._sent()

    def _sent(self, **last) -> None:
        self.sent.update(last)
        io.write_json(self.logs / WANDB_STATE, self.sent)
