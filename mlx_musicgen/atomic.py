"""Writing outputs so that a reader only ever sees the old one or the complete new one.

Everything is first written under a temporary name in the destination's folder (same filesystem, so the final
rename is atomic): `.NAME.PID.RANDOM.part`, and, while a folder is being swapped, the old folder waits in
`.NAME.PID.RANDOM.old`. An error or an interrupt (Ctrl-C, SIGTERM) removes them on the way out. A process
killed outright (SIGKILL, power loss) cannot clean up after itself; the next write to the same destination
removes what such a dead process left (the PID in the name tells whether its writer is still running) and,
if the kill fell between the two renames of a folder swap, puts the old folder back first; clean_stale_in
does so for a whole folder (the studio's, at start).
"""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def temp_file(path: Path) -> Path:
    """A new empty file beside `path` to write into, then `os.replace` onto it."""
    fd, name = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".part", dir=path.parent)
    os.close(fd)
    return Path(name)


def temp_folder(path: Path, suffix: str = ".part") -> Path:
    return Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=suffix, dir=path.parent))


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK_AT_IMPORT = _umask_by_setting()  # where /proc does not show it: set and restored while single-threaded


def umask() -> int:
    """The process's umask, read without setting it where Linux shows it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return UMASK_AT_IMPORT


def give_normal_mode(path: Path) -> None:
    """The mode a file (0666) or folder (0777) created the ordinary way gets under the umask: temporaries are
    made 0600 / 0700, and the mode survives the rename, so other programs and users could not read outputs."""
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask())


def out_of_space(error: BaseException, folder: Path) -> OSError | None:
    """A one-line ENOSPC error for `error` if it came from a full disk, else None. An OSError says so by its
    errno; other libraries do not (soundfile raises an AssertionError when a write comes up short, MLX a
    RuntimeError), so for them a disk left with under 1 MiB free, by the write that filled it, counts."""
    if not isinstance(error, Exception):  # Ctrl-C stays Ctrl-C
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if isinstance(error, OSError):
        if error.errno not in NO_SPACE:
            return None
    elif free is None or free >= 2**20:
        return None
    left = "" if free is None else f" ({free / 2**20:.1f} MiB free)"
    return OSError(errno.ENOSPC, f"no space left on the device holding {folder}{left}: free some space or write "
                                 f"elsewhere")


@contextmanager
def removed_on_error(remove: Callable[[], None], folder: Path) -> Iterator[None]:
    """On any error in the block: `remove()` the temporaries, and a full disk becomes one ENOSPC line (judged
    before the removal frees the space again)."""
    try:
        yield
    except BaseException as e:
        full = out_of_space(e, folder)
        remove()
        if full is not None:
            raise full from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """A file written under a temporary name and renamed into place, with the normal mode."""
    path = Path(path)
    tmp = temp_file(path)
    with removed_on_error(lambda: tmp.unlink(missing_ok=True), path.parent):
        tmp.write_bytes(data)
        give_normal_mode(tmp)
        os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    """A text file (UTF-8), written as write_bytes writes."""
    write_bytes(path, text.encode("utf-8"))


def save_safetensors(path: Path, arrays: dict, metadata: dict | None = None) -> None:
    """MLX arrays -> a safetensors file, written in a temporary folder beside it and renamed into place."""
    import shutil

    import mlx.core as mx

    path = Path(path)
    staging = temp_folder(path)
    with removed_on_error(lambda: shutil.rmtree(staging, ignore_errors=True), path.parent):
        mx.save_safetensors(str(staging / path.name), arrays, metadata=metadata)
        give_normal_mode(staging / path.name)
        os.replace(staging / path.name, path)
    shutil.rmtree(staging, ignore_errors=True)


def _writer_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)


def clean_stale(path: Path) -> list[Path]:
    """Remove the temporaries that writers of `path` killed outright left behind; returns what was removed."""
    if os.name != "posix":  # os.kill(pid, 0) would not be a harmless probe elsewhere
        return []
    removed = []
    for entry in Path(path.parent).glob(f".{glob.escape(path.name)}.*"):
        rest = entry.name[len(path.name) + 2 :]  # PID.RANDOM.part / PID.RANDOM.old
        pid, _, tail = rest.partition(".")
        if not pid.isdigit() or not tail.endswith((".part", ".old")) or _writer_alive(int(pid)):
            continue
        if tail.endswith(".old") and not entry.is_symlink() and (entry / path.name).exists() \
                and not os.path.lexists(path):
            os.replace(entry / path.name, path)  # killed between the two renames of a swap: undo the first
        _remove(entry)
        removed.append(entry)
    return removed


TEMP_NAME = re.compile(r"\.(?P<name>.+)\.\d+\.[^.]+\.(?:part|old)")  # .NAME.PID.RANDOM.part / .old


def clean_stale_in(folder: Path) -> list[Path]:
    """clean_stale for every destination in `folder` that has temporaries (whatever a killed writer was
    writing there: a new take has a new name, so no later write to it would clean up); returns what was
    removed. Temporaries of live processes are kept."""
    names = {found["name"] for entry in Path(folder).glob(".*") if (found := TEMP_NAME.fullmatch(entry.name))}
    return [removed for name in sorted(names) for removed in clean_stale(Path(folder) / name)]


def replace_folder(staging: Path, path: Path) -> None:
    """Move the complete folder `staging` to `path`, replacing what is there, so that `path` holds the old or
    the new content whenever this is interrupted (and is put back if interrupted between the renames)."""
    if not os.path.lexists(path):
        os.replace(staging, path)
        return
    aside = temp_folder(path, ".old")
    moved = False
    try:
        os.replace(path, aside / path.name)
        moved = True
        os.replace(staging, path)
    except BaseException:
        if moved and not os.path.lexists(path):
            os.replace(aside / path.name, path)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
