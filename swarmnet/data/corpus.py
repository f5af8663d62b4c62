"""Where training text comes from: the Python standard library's sources, or a folder of files.

Both sources give the same bytes on every call (files are read in sorted path order), so every
process of a run that names the same source sees the same corpus.
"""

from __future__ import annotations

import logging
import os
import sysconfig
from pathlib import Path

from swarmnet.config import DataConfig
from swarmnet.errors import ConfigError

logger = logging.getLogger(__name__)

STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
"""Folders of the standard library left out of the `stdlib` corpus."""

TEXT_SUFFIXES = frozenset({".txt", ".md", ".py", ".rst", ".toml", ".json", ".csv"})
"""File suffixes read from a folder source (files without a suffix are read if they are UTF-8)."""

SEPARATOR = b"\n"
"""Bytes put between two files."""


def load_corpus(cfg: DataConfig) -> bytes:
    """The corpus named by `cfg.source`, at most `cfg.max_bytes` long."""
    if cfg.max_bytes <= 0:
        raise ConfigError("data.max_bytes must be positive")
    if cfg.source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in _walk(root, STDLIB_SKIPPED_DIRS) if p.suffix == ".py"]
    else:
        root = Path(cfg.source).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.source {cfg.source!r} is neither 'stdlib' nor a folder")
        files = [p for p in _walk(root, frozenset()) if p.suffix.lower() in TEXT_SUFFIXES or not p.suffix]
    corpus = _concatenate(files, cfg.max_bytes)
    if not corpus:
        raise ConfigError(f"data.source {cfg.source!r} holds no text files")
    logger.info("loaded %d bytes of corpus from %s", len(corpus), root)
    return corpus


def _walk(root: Path, skipped: frozenset[str]) -> list[Path]:
    """Regular files under `root` in sorted relative-path order, without hidden or skipped dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skipped and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _concatenate(files: list[Path], max_bytes: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as e:
            logger.debug("skipping unreadable %s: %s", path, e)
            continue
        if not path.suffix and not _is_utf8(data):
            continue
        if parts:
            data = SEPARATOR + data
        parts.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    return b"".join(parts)[:max_bytes]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
