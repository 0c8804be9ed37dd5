"""Safe output directories: nothing half-written, nothing of the user's deleted, one writer at a time.

A run claims ``OUT`` with :class:`OutputDir` before any merge work:

- ``OUT`` must not be, contain or lie inside an input (VLM, experts, base, recipe file), and must not
  be or contain the current directory or the home directory, ``--force`` or not;
- an existing ``OUT`` must be empty, or (with ``force``) a previous skillgraft output holding only
  the files its record lists: ``skillgraft_report.json`` (inject, tune, ``skill export-lora``) or a
  skill's ``skill.json`` (``skill extract``), see :data:`RECORDS`;
- a lock file beside ``OUT`` (``.OUT.skillgraft-lock``, ``fcntl.flock``) is held for the whole run, so
  a second run to the same ``OUT`` fails at once;
- temporary directories left by killed runs (``.OUT.skillgraft-tmp-PID`` of a dead PID) are removed.

The result is written into ``.OUT.skillgraft-tmp-PID`` and moved into place only when complete. The
swap re-checks ``OUT`` under the lock: a previous output is replaced only if it still holds nothing
but skillgraft's files, and an ``OUT`` that was empty or absent is taken with one ``rename``, which
fails rather than replace a directory that is no longer empty. Anything that appeared in ``OUT``
during the run is left untouched; the finished result is then kept beside it, under a visible name
the error message gives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SkillgraftError
from .paths import inside_checkpoint

MARKER = "skillgraft_report.json"
# the record each kind of skillgraft output holds, and the key that marks it as skillgraft's own; both
# list the files written (a report under weight_files/copied_files/files, a skill under files)
RECORDS = {MARKER: "skillgraft_version", "skill.json": "skillgraft_skill"}
_ALWAYS_OURS = frozenset({MARKER, "skillgraft_recipe.yaml", "README.md", "model.safetensors.index.json"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
_SKIP_FILES = {"README.md", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_HIDDEN = re.compile(r"^\.(?P<name>.+)\.skillgraft-(?:tmp|old)-(?P<pid>\d+)$")

Inputs = Iterable[tuple[str, "str | Path"]]


def _resolve(p: str | Path) -> Path:
    return Path(os.path.expanduser(str(p))).resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _record(path: Path, key: str) -> dict | None:
    """The JSON object in ``path`` if it is a regular file holding ``key``; else None."""
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and key in data else None


def skillgraft_files(out: Path) -> set[str] | None:
    """The names a previous skillgraft output in ``out`` consists of (from its record); None if it is not one.

    A record (:data:`RECORDS`) lists its files under ``weight_files``, ``copied_files`` or ``files``.
    """
    for record, key in RECORDS.items():
        data = _record(out / record, key)
        if data is None:
            continue
        names = set(_ALWAYS_OURS) | {record}
        for field in ("weight_files", "copied_files", "files"):
            if isinstance(data.get(field), list):
                names |= {x for x in data[field] if isinstance(x, str)}
        return names
    return None


def foreign_entries(out: Path) -> list[str] | None:
    """Entries of a previous skillgraft output that skillgraft did not write; None if ``out`` is not one."""
    owned = skillgraft_files(out)
    if owned is None:
        return None
    return sorted(p.name for p in out.iterdir() if p.name not in owned or p.is_symlink() or not p.is_file())


def local_inputs(refs: Iterable[tuple[str, str | Path]]) -> list[tuple[str, Path]]:
    """The (role, reference) pairs that name local paths; a hub id is checked once resolved (``check_inputs``)."""
    return [(role, Path(ref).expanduser()) for role, ref in refs if Path(ref).expanduser().exists()]


def _check_inputs(o: Path, out: str | Path, inputs: Inputs) -> None:
    for role, p in inputs:
        rp = _resolve(p)
        if o == rp:
            raise SkillgraftError(f"output {out} is the {role} {p}; write the result to a new directory")
        if _within(rp, o):
            raise SkillgraftError(f"output {out} contains the {role} {p}; write the result to a new directory")
        if _within(o, rp):
            raise SkillgraftError(f"output {out} lies inside the {role} {p}; write the result elsewhere")


def check_output_dir(out: str | Path, force: bool, inputs: Inputs = ()) -> Path:
    """Refuse an unsafe ``out`` (see the module docstring) before any work; return it resolved."""
    o = _resolve(out)
    if o.parent == o:
        raise SkillgraftError(f"output {out} is the filesystem root; give a new directory")
    _check_inputs(o, out, inputs)
    for place, where in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        where = where.resolve()
        if _within(where, o):
            raise SkillgraftError(
                f"output {out} {'is' if o == where else 'contains'} {place}; give a new directory name such as {o / 'merged'}"
            )
    ancestor = o.parent
    while not ancestor.exists() and ancestor.parent != ancestor:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SkillgraftError(f"cannot create output {out}: {ancestor} is not a directory")
    if not o.exists():
        return o
    if not o.is_dir():
        raise SkillgraftError(f"output {out} exists and is not a directory")
    if os.path.ismount(o):
        raise SkillgraftError(f"output {out} is a mount point and cannot be replaced; write into a new directory inside it")
    if not any(o.iterdir()):
        return o
    if not force:
        what = f"output directory {out} exists and is not empty"
        raise SkillgraftError(f"{what}; pass force=True to replace a previous skillgraft output",
                              cli=f"{what}; pass --force to replace a previous skillgraft output")
    foreign = foreign_entries(o)
    if foreign is None:
        what = f"output directory {out} holds files skillgraft did not write (it has no {' or '.join(RECORDS)})"
        why = "replaces only an empty directory or a previous skillgraft output: choose another directory"
        raise SkillgraftError(f"{what}; force {why}", cli=f"{what}; --force {why}")
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise SkillgraftError(
            f"output directory {out} holds {foreign[0]}{more}, which skillgraft did not write; "
            f"move it away or choose another directory"
        )
    return o


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """Claim ``out`` for one run: check it, lock it, clean what killed runs left; ``stage()`` writes and swaps."""

    def __init__(self, out: str | Path, force: bool = False, *, inputs: Inputs = (),
                 log: Callable[[str], None] | None = None):
        self.requested = out
        self.force = force
        self.inputs = list(inputs)
        self.log = log or (lambda _msg: None)
        self.out = _resolve(out)
        self.final: Path | None = None
        self._lock_fd = -1
        self._created: list[Path] = []
        self._replace = False

    # ------------------------------------------------------------------ claim and release
    def __enter__(self) -> "OutputDir":
        self.out = check_output_dir(self.requested, self.force, self.inputs)
        try:
            self._make_parent()
            self._lock()
            # again under the lock: another run may have finished into OUT since the first look
            check_output_dir(self.requested, self.force, self.inputs)
            self._replace = self.out.is_dir() and any(self.out.iterdir())
            self._remove_stale()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def check_inputs(self, inputs: Inputs) -> None:
        """Apply the input rules to more inputs (hub snapshots known only once resolved)."""
        inputs = list(inputs)
        self.inputs += inputs
        _check_inputs(self.out, self.requested, inputs)

    @property
    def _lock_path(self) -> Path:
        return self.out.parent / f".{self.out.name}.skillgraft-lock"

    def _make_parent(self) -> None:
        missing = []
        p = self.out.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            d.mkdir()
            self._created.append(d)

    def _lock(self) -> None:
        path = self._lock_path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise SkillgraftError(
                    f"another skillgraft run{who} is writing {self.requested}; wait for it to finish or choose another directory"
                ) from None
            try:  # the previous holder unlinks the file on release: retry if ours is no longer the one at path
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd >= 0:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self.final is None:
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:
                    break

    def _remove_stale(self) -> None:
        for entry in self.out.parent.iterdir():
            m = _HIDDEN.match(entry.name)
            if not m or m["name"] != self.out.name or entry.is_symlink() or not entry.is_dir():
                continue
            pid = int(m["pid"])
            if pid == os.getpid() or not _alive(pid):
                shutil.rmtree(entry, ignore_errors=True)
                self.log(f"removed {entry}, a stale temporary directory left by an interrupted run (pid {pid})")

    # ------------------------------------------------------------------ write and swap
    @contextmanager
    def stage(self) -> Iterator[Path]:
        """A fresh hidden sibling of OUT to write into; moved into place when the block succeeds."""
        tmp = self.out.parent / f".{self.out.name}.skillgraft-tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            _sync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.final = self._commit(tmp)
        _sync(self.out.parent)

    def _commit(self, tmp: Path) -> Path:
        o = self.out
        if self._replace and o.is_dir() and not o.is_symlink() and foreign_entries(o) == []:
            old = o.parent / f".{o.name}.skillgraft-old-{os.getpid()}"
            os.rename(o, old)
            os.rename(tmp, o)
            if foreign_entries(old) == []:
                shutil.rmtree(old, ignore_errors=True)
            else:  # written into in the instant between the check and the rename: keep it
                kept = self._free_name("previous")
                os.rename(old, kept)
                self.log(f"files appeared in {self.requested} while it was replaced; its previous content is in {kept}")
            return o
        try:
            os.rename(tmp, o)  # atomic; replaces an empty directory, fails on one that is not empty
            return o
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        kept = self._free_name("merged")
        os.rename(tmp, kept)
        self.final = kept
        what = ", ".join(sorted(os.listdir(o))[:3]) if o.is_dir() else "a file"
        raise SkillgraftError(
            f"{self.requested} changed during the run ({what} appeared); it was left untouched and the "
            f"finished result was written to {kept}"
        )

    def _free_name(self, tag: str) -> Path:
        for k in range(1, 10_000):
            cand = self.out.parent / (f"{self.out.name}-{tag}" + (f"-{k}" if k > 1 else ""))
            if not cand.exists() and not cand.is_symlink():
                return cand
        raise SkillgraftError(f"no free name beside {self.requested} to keep the result in")


def _sync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to the disk; a file system that cannot is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """Flush every file written under ``root`` and the directories that name them, so that the rename
    that publishes ``root`` never exposes a directory whose files a power loss could leave incomplete."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _sync(Path(dirpath) / f)
        _sync(Path(dirpath))


def copy_side_files(src: Path, dst: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Copy every non-weight file of a checkpoint (config, tokenizer, processor, chat template, ...).

    Only regular files inside the checkpoint are copied (a link is followed when it stays inside);
    returns the names copied and, for the files skipped, ``{"name", "reason"}``.
    """
    copied: list[str] = []
    skipped: list[dict[str, str]] = []
    for f in sorted(src.iterdir()):
        if f.name.startswith(".") or f.name in _SKIP_FILES or f.name.startswith("skillgraft_"):
            continue
        if f.suffix in _WEIGHT_SUFFIXES:
            continue
        if f.is_symlink() and not inside_checkpoint(f, src):
            skipped.append({"name": f.name, "reason": f"a link to {os.readlink(f)}, outside the checkpoint"})
            continue
        try:
            mode = f.stat().st_mode
        except OSError:
            skipped.append({"name": f.name, "reason": "a broken link"})
            continue
        if stat.S_ISDIR(mode):
            continue
        if not stat.S_ISREG(mode):
            skipped.append({"name": f.name, "reason": "not a regular file"})
            continue
        shutil.copyfile(f, dst / f.name)
        shutil.copystat(f, dst / f.name)
        copied.append(f.name)
    return copied, skipped
