"""One live run per work directory: an exclusive `flock` on DIR/jft.lock, which the operating system lets go of
when the process ends however it ends, so a crashed or killed run never leaves it stuck."""

import fcntl
import os

from jft.errors import UserError

LOCK_FILE = 'jft.lock'


class WorkdirLock:
  """Holds DIR/jft.lock while in use; a second holder gets a `UserError` naming the live run's process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.file = None

  def __enter__(self) -> 'WorkdirLock':
    self.file = open(self.path, 'a+')  # held open for as long as the lock
    try:
      fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self.file.seek(0)
      holder = self.file.read().strip() or 'another process'
      self.file.close()
      raise UserError(f'the work directory {os.path.dirname(self.path)} is in use by a live run ({holder}); '
                      'wait for it to finish (or stop it), or give another --workdir') from None
    self.file.seek(0)
    self.file.truncate()
    self.file.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    self.file.flush()
    return self

  def __exit__(self, *exc) -> None:
    fcntl.flock(self.file, fcntl.LOCK_UN)
    self.file.close()
