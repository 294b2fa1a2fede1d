"""Run a workflow job with its output in the job's log, and bad-input errors also on the console."""

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from latent_atlas.errors import LatentAtlasError


@contextlib.contextmanager
def job_log(path: str | Path) -> Iterator[logging.Logger]:
    """Send stdout, stderr and logging to ``path`` for the duration of a job.

    A :class:`LatentAtlasError` (bad config, missing or corrupt input) is also printed to the console,
    so the user reads the problem and the fix without opening the log; it is then re-raised so the job
    fails.
    """
    log_path = Path(path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    console = sys.__stderr__
    with open(log_path, "w", buffering=1) as handle:
        logging.basicConfig(
            stream=handle, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
        )
        with contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
            try:
                yield logging.getLogger("latent_atlas")
            except LatentAtlasError as error:
                message = f"latent-atlas: {error}"
                print(message, file=handle)
                if console is not None:
                    print(message, file=console)
                raise
