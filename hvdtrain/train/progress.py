"""What a run shows while it trains, on rank 0: progress within an epoch (a tqdm bar
on a terminal; under a launcher, whose pipes are no terminal, a line every
`log.every_seconds`) and TensorBoard event files written with the tensorboard
package's own writer."""
from __future__ import annotations

import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from ..errors import UserError
from ..spec import JobSpec, LogSpec, dump


TENSORBOARD_DIR = "tensorboard"


def require_tensorboard(log: LogSpec) -> None:
    """Before anything starts, on every rank: log.tensorboard needs the package."""
    if log.tensorboard:
        try:
            import tensorboard.summary.writer.event_file_writer  # noqa: F401
        except ImportError:
            raise UserError("log.tensorboard: the tensorboard package is not installed "
                            "(pip install 'hvdtrain[tensorboard]')") from None


class EventLog:
    """Scalars and text as TensorBoard event files (tensorboard's EventFileWriter)."""

    def __init__(self, directory: Path):
        if "tensorflow" not in sys.modules:
            # tensorboard's writer imports TensorFlow where it is installed (seconds, its
            # start-up notices, hundreds of MB per rank); the module `notf` makes it take
            # its own pure-Python file layer instead, as its no_tensorflow build does.
            sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
        from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.proto = event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(directory))

    def _write(self, step: int, value) -> None:
        event_pb2, summary_pb2 = self.proto[:2]
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary_pb2.Summary(value=[value])))

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._write(step, self.proto[1].Summary.Value(tag=tag, simple_value=float(value)))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        _, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2 = self.proto
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING, string_val=[text.encode()],
            tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=1)]))
        self._write(step, summary_pb2.Summary.Value(tag=tag, metadata=metadata, tensor=tensor))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def epoch_scalars(events: EventLog, record: dict[str, Any]) -> None:
    for key, value in record.items():
        if key != "epoch" and isinstance(value, (int, float)):
            events.scalar(f"epoch/{key}", value, record["epoch"])


def open_event_log(spec: JobSpec) -> EventLog:
    """A new event file in the run's tensorboard directory, headed by the resolved spec."""
    events = EventLog(spec.run_dir / TENSORBOARD_DIR)
    events.text("spec", "```\n" + dump(spec) + "\n```")
    return events


def duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Rank 0's view of the steps; on other ranks (and with log.level quiet) it
    shows nothing. The loop asks `due` after each step whether to end the
    training call there (the loss is read from the device only then)."""

    def __init__(self, spec: JobSpec, rank: int, size: int, per_epoch: int, say: Callable[[str], None]):
        self.spec, self.size, self.per_epoch, self.say = spec, size, per_epoch, say
        self.shown = rank == 0 and spec.log.level != "quiet"
        self.tty = self.shown and sys.stderr.isatty()
        self.events = open_event_log(spec) if rank == 0 and spec.log.tensorboard else None
        self.bar: tqdm | None = None
        self.began = self.last = time.monotonic()
        self.steps_run = 0
        self.samples = 0.0

    def begin_epoch(self, epoch: int, first_step: int) -> None:
        if self.tty:
            self.bar = tqdm(total=self.per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{self.spec.train.epochs}",
                            unit="step", leave=False, dynamic_ncols=True)

    def step_done(self) -> None:
        self.steps_run += 1
        if self.bar is not None:
            self.bar.update(1)

    def due(self, step: int) -> bool:
        """After `step` steps of the epoch: end the training call here?"""
        if self.events is not None and step % self.spec.log.every_steps == 0:
            return True
        if not self.shown:
            return False
        wait = 1.0 if self.tty else self.spec.log.every_seconds
        return time.monotonic() - self.last >= wait

    def segment(self, epoch: int, step: int, loss_sum: float, seen: float, lr: float) -> None:
        """A training call ended after `step` steps of the epoch, its loss and samples given."""
        self.samples += seen * self.size
        if not seen:
            return
        loss = loss_sum / seen
        if self.events is not None:
            global_step = epoch * self.per_epoch + step
            self.events.scalar("train/step_loss", loss, global_step)
            self.events.scalar("train/lr", lr, global_step)
        if not self.shown:
            return
        now = time.monotonic()
        per_step = (now - self.began) / max(self.steps_run, 1)
        left = (self.spec.train.epochs - epoch - 1) * self.per_epoch + self.per_epoch - step
        rate = self.samples / max(now - self.began, 1e-9)
        # a language model's samples are blocks of max_length tokens: its rate in tokens
        unit, rate = ("tokens/s", rate * self.spec.data.tokenizer.max_length) \
            if self.spec.task == "language_modeling" else ("samples/s", rate)
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{loss:.4f}", unit: f"{rate:.0f}"}, refresh=False)
            self.last = now
        elif now - self.last >= self.spec.log.every_seconds and step < self.per_epoch:
            self.say(f"epoch {epoch + 1}/{self.spec.train.epochs}  step {step}/{self.per_epoch}  loss {loss:.4f}  "
                     f"{rate:.0f} {unit}  ETA {duration(left * per_step)}")
            self.last = now

    def end_epoch(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.last = time.monotonic()
        if self.events is not None:
            epoch_scalars(self.events, record)
            self.events.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.events is not None:
            self.events.close()
