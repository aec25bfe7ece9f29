"""Command-line checks shared by the tools: every argument is checked before any work starts, and a
mistake gets one line (and exit status 2), never a traceback."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `tool: error: what is wrong (see --help)`."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def _number(kind, lowest, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} expected, got {text!r}") from None
        if value < lowest or value != value:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        return value
    return parse


positive_int = _number(int, 1, "a whole number")
non_negative_int = _number(int, 0, "a whole number")
positive_float = _number(float, 1e-12, "a number")
non_negative_float = _number(float, 0.0, "a number")


def int_list(text: str) -> list[int]:
    """"0, 3, 5" -> [0, 3, 5]; at least one entry."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("a comma-separated list of whole numbers expected, got nothing")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of whole numbers expected, got {text!r}") from None


def choice_list(valid):
    """A comma-separated subset of `valid`, in the given order; unknown names are refused."""
    def parse(text: str) -> list[str]:
        names = [p.strip() for p in text.split(",") if p.strip()]
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or '(none)'}; choose from {', '.join(valid)}")
        return names
    return parse


def out_file(text: str) -> Path:
    """An --out file: an empty name, or a name of an existing folder, is refused when the arguments are read."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a file name expected, got an empty string")
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; name a file to write")
    return Path(text)


def out_dir(text: str) -> Path:
    """An --out folder: an empty name, or a name of an existing file, is refused when the arguments are read."""
    if not text.strip():
        raise argparse.ArgumentTypeError("a folder name expected, got an empty string")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; name a folder to write into")
    return Path(text)


def writable_dir(parser: argparse.ArgumentParser, path: Path, what: str = "--out"):
    """Create `path` if needed and make sure a file can be written there, before any work starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"{what}: cannot write to {path}: {e.strerror or e}")


def writable_file(parser: argparse.ArgumentParser, path: Path | None, what: str = "--out"):
    if path is not None:
        writable_dir(parser, path.parent if str(path.parent) else Path(os.curdir), what)


def weights_file(parser: argparse.ArgumentParser, path: Path, what: str):
    """Refuse, in one line, a reference-model weights file that is missing or cannot be loaded (truncated, not
    safetensors, another model's), before any work starts."""
    from tools import reference_dit
    if not Path(path).is_file():
        parser.error(f"{what}: no weights file {path}")
    try:
        reference_dit.load_weights(path)
    except reference_dit.WeightsError as e:
        parser.error(f"{what}: {e}")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's CPU threads set to `n` (0: torch's default) for the block, and restored after it."""
    import torch
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
