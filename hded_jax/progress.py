"""Long work's progress in the log: how much is done, how fast, and how long is left."""

from collections.abc import Iterable, Iterator
import time
from typing import TypeVar

from absl import logging

T = TypeVar('T')


class Progress:
  """Logs 'WHAT: done / total UNIT, rate UNIT/s, time left' at most every ``every_s`` seconds,
  and once all is done."""

  def __init__(self, total: int, *, what: str, unit: str, every_s: float):
    self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
    self.done = 0
    self.start = self.last_log = time.monotonic()

  def update(self, count: int = 1) -> None:
    self.done += count
    now = time.monotonic()
    if now - self.last_log < self.every_s and self.done < self.total:
      return
    self.last_log = now
    rate = self.done / max(now - self.start, 1e-9)
    logging.info('%s: %d / %d %s, %.2f %s/s, %s left.', self.what, self.done, self.total,
                 self.unit, rate, self.unit,
                 duration((self.total - self.done) / rate) if rate else 'unknown time')


def logged(items: Iterable[T], total: int, *, what: str, unit: str,
           every_s: float) -> Iterator[T]:
  """Yields ``items``, logging their `Progress`."""
  progress = Progress(total, what=what, unit=unit, every_s=every_s)
  for item in items:
    yield item
    progress.update()


def duration(seconds: float) -> str:
  """'1h02m03s', '2m03s'."""
  minutes, seconds = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m{seconds:02d}s' if hours else f'{minutes}m{seconds:02d}s'
