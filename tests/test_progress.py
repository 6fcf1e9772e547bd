"""Long work's progress in the log (`hded_jax.progress`)."""

import logging

from hded_jax import progress


def test_progress_is_logged_at_most_every_interval_and_at_the_end(monkeypatch, caplog):
  now = [0.0]
  monkeypatch.setattr(progress.time, 'monotonic', lambda: now[0])
  caplog.set_level(logging.INFO, logger='absl')
  items = []
  for item in progress.logged(range(4), 4, what='Rendering', unit='frames', every_s=30):
    items.append(item)
    now[0] += 20  # Each frame takes 20 s: a line after the second (40 s), then the last.
  assert items == [0, 1, 2, 3]
  assert [r.getMessage() for r in caplog.records] == [
      'Rendering: 2 / 4 frames, 0.05 frames/s, 0m40s left.',
      'Rendering: 4 / 4 frames, 0.05 frames/s, 0m00s left.']
  assert progress.duration(3723) == '1h02m03s'
