"""A CPU-bound processor: count the primes below a limit by trial division, in pure Python.

It holds the GIL for seconds at a time. Run by ``bullmq.Worker`` on the worker's own event loop,
it would stall lock renewal for that long. Run by sandbox-runtime, it has a child process to itself.
"""

from __future__ import annotations

import time

DEFAULT_LIMIT = 2_000_000

# The processor checks the abort signal after every block of numbers, so a cooperative cancel
# stops it at the end of the current block.
BLOCK_SIZE = 5_000
PROGRESS_STEPS = 10


def is_prime(number: int) -> bool:
    """Return whether ``number`` is prime, by trial division with odd factors."""
    if number < 2:
        return False
    if number % 2 == 0:
        return number == 2
    factor = 3
    while factor * factor <= number:
        if number % factor == 0:
            return False
        factor += 2
    return True


def count_primes(job, token, signal):
    """Count the primes below ``job.data["below"]`` (default 2 000 000).

    Reports progress in percent about every 10 % and stops with ``AbortError`` at the next block
    boundary once the job is cancelled. Returns ``{"below": N, "primes": count, "elapsed_s": s}``.
    """
    limit = int((job.data or {}).get("below", DEFAULT_LIMIT))
    if limit < 0:
        raise ValueError(f"below must be >= 0, got {limit}")
    job.log(f"counting primes below {limit}")

    started = time.monotonic()
    count = 0
    next_report = 1
    for block_start in range(0, limit, BLOCK_SIZE):
        signal.throw_if_aborted()
        block_end = min(block_start + BLOCK_SIZE, limit)
        count += sum(1 for number in range(block_start, block_end) if is_prime(number))

        percent = block_end * 100 // limit
        if percent >= next_report * 100 // PROGRESS_STEPS:
            job.updateProgress(percent)
            next_report = percent * PROGRESS_STEPS // 100 + 1

    return {"below": limit, "primes": count, "elapsed_s": round(time.monotonic() - started, 3)}
