"""Reading weight files without running code: safetensors, and ``torch.load(weights_only=True)`` with readable
refusals.

Exports, training checkpoints and reference-checkpoint conversion all read weights through these two readers, so a
damaged or hostile file fails the same way everywhere: one :class:`CheckpointFormatError` whose message names the
file, never a parser's traceback, and never torch's advice to load it with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import io as _io
import os
import pickle
import pickletools
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from m2d2 import io

__all__ = ["CheckpointFormatError", "UnsafeCheckpointError", "local_copy", "read_safetensors", "torch_load_weights"]


class CheckpointFormatError(ValueError):
    """A weights file that cannot be read as weights: truncated, corrupt, not the format it claims, or unsafe.

    One type with a one-line message naming the file, so every loader (exports, conversion, resume) reports a
    damaged file the same way instead of with a parser's traceback.
    """


class UnsafeCheckpointError(CheckpointFormatError):
    """A file that can only be read by executing arbitrary pickled Python objects."""


@contextlib.contextmanager
def local_copy(src: str | os.PathLike) -> Iterator[Path]:
    """A local path of ``src``: the file itself, or a temporary download of a remote one."""
    if io.is_local(src):
        path = io.local_path(src)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {src} does not exist")
        yield path
        return
    import fsspec

    with tempfile.TemporaryDirectory() as tmp:
        fs, remote = fsspec.core.url_to_fs(str(src))
        path = Path(tmp) / Path(remote).name
        io.retrying(lambda: fs.get(remote, str(path)), str(src), "download")
        yield path


def read_safetensors(source: str | os.PathLike | bytes, name: str | None = None,
                     device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (a path) or blob (bytes, ``name`` for messages); nothing is unpickled.

    A malformed file (truncated, random bytes, a header claiming sizes the file does not hold) raises
    :class:`CheckpointFormatError` ``"<name>: not a valid safetensors file (<reason>)"``; a missing one
    ``FileNotFoundError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    label = name if name is not None else ("<bytes>" if isinstance(source, bytes) else os.fspath(source))
    try:
        return load(source) if isinstance(source, bytes) else load_file(os.fspath(source), device=device)
    except SafetensorError as exc:
        reason = str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)  # drop "Error while deserializing"
        raise CheckpointFormatError(f"{label}: not a valid safetensors file ({_one_line(reason)})") from exc


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _pickle_globals(data: bytes) -> list[str]:
    """``module.name`` of every global the pickles in ``data`` would import, read opcode by opcode: nothing runs.

    ``torch.serialization.get_unsafe_globals_in_checkpoint`` only reads zip checkpoints; this covers plain pickles
    and the legacy format (several pickles in a row). ``STACK_GLOBAL`` takes its names from the last two strings
    pushed (directly or from the memo), which is how ``pickle`` writes them.
    """
    found: list[str] = []
    stream = _io.BytesIO(data)
    while stream.tell() < len(data):  # genops stops after each pickle's STOP: the next one follows
        strings: list[str | None] = []
        memo: dict[int, str | None] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(".".join(str(arg).split(" ", 1)))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2 and None not in strings[-2:]:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
                    strings.append(arg)
                elif op.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = strings[-1] if strings else None
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(int(arg)))
        except Exception:  # not (or no longer) a pickle: e.g. the raw tensor bytes after the legacy format's pickles
            break
    return sorted(set(found), key=found.index)


def _torch_allowed_globals() -> set[str]:
    """What ``weights_only`` loads without being told (tensor rebuilders, storages, ``OrderedDict``): the same
    private table ``get_unsafe_globals_in_checkpoint`` filters with; empty if a torch release moves it."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return set(_get_allowed_globals())
    except Exception:
        return set()


def torch_load_weights(source: Path | bytes, name: str | None = None,
                       safe_globals: Sequence[Any] = ()) -> object:
    """``torch.load(weights_only=True)`` of a file or blob, with the refusals and failures as one-line errors.

    A pickle that needs more than tensors, containers and ``safe_globals`` raises :class:`UnsafeCheckpointError`
    naming those globals; it is never retried unsafely, and torch's advice to do so (``weights_only=False``) is not
    passed on. A truncated or corrupt file raises :class:`CheckpointFormatError`.
    """
    label = name if name is not None else ("<bytes>" if isinstance(source, bytes) else os.fspath(source))
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(_io.BytesIO(source) if isinstance(source, bytes) else source, map_location="cpu",
                              weights_only=True)
    except pickle.UnpicklingError as exc:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        try:
            needed = torch.serialization.get_unsafe_globals_in_checkpoint(_io.BytesIO(data))
        except Exception:  # not a zip checkpoint: read the globals from the pickle opcodes
            needed = [g for g in _pickle_globals(data) if g not in _torch_allowed_globals()]
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in safe_globals}
        needed = [g for g in needed if g not in allowed]
        if needed:
            raise UnsafeCheckpointError(
                f"{label}: refusing to unpickle: the file needs Python objects beyond tensors and containers "
                f"({', '.join(needed)}). Only weights are read from checkpoints; re-save its state dict "
                "(torch.save(model.state_dict()) or safetensors) where you trust the file."
            ) from None
        raise CheckpointFormatError(f"{label}: not a valid PyTorch checkpoint ({_unpickling_reason(exc)})") from None
    except OSError:  # missing or unreadable: a file-system problem, not the file's content
        raise
    except Exception as exc:  # a damaged zip or pickle surfaces as anything from EOFError to IndexError
        reason = _one_line(str(exc).split(". ")[0]) if str(exc).strip() else "the file ends early"
        raise CheckpointFormatError(f"{label}: not a valid PyTorch checkpoint ({reason})") from exc


def _unpickling_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler objected to, without its advice to load the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and "torch.load" not in line
              and not line.startswith(("Please file an issue", "Check the documentation"))]
    return _one_line(useful[0]) if useful else "not a pickle of tensors and containers"
