"""Positioned file reads shared by checkpoint loading and the disk offload tier (no mmap: what a read
brings in is the caller's buffer, not file pages counted as this process's memory)."""
from __future__ import annotations

import os


def pread_exactly(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` with the file's bytes at ``offset``; a short file is an error, not a partial buffer."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"unexpected end of file at byte {offset + done} (file truncated?)")
        done += n
