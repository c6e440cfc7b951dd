"""Output safety: one rule for every path a command writes.

- A command never writes to, truncates or deletes one of its inputs (paths compared resolved, symlinks
  followed; a path inside an input folder counts as the input): `check_outputs` refuses with an
  `OutputError` naming both.
- A folder output is an `OutputFolder`: every write is confined under it (checked names, no
  ``..``, no absolute paths), recorded in the command's manifest (``.bimedix-COMMAND.jsonl``) before it
  happens, and the command deletes only what that manifest lists, never the folder's other contents.
- Writing into a non-empty folder that the command did not create (no manifest of that command) needs
``overwrite=True``
  (``--overwrite``), which still never touches inputs or deletes anything it did not write.
- Temporaries left by a killed run (`bimedix.core.io.atomic_open` names them ``.NAME.PID.XXXXXXXX.tmp``)
  are removed, once their process is gone, by the next write of ``NAME`` (`remove_stale_temporaries_of`)
  and by the next run that owns their folder.
- A folder that must never be seen half-written (a merged model and its report, a built dataset) is written
  whole in a hidden sibling and swapped into place (`staged_folder`): a kill leaves either the old folder or
  the new one.

Examples:

```python
check_outputs({"--output": args.output, "--rejects": rejects}, {"--input": args.input})
folder = OutputFolder(args.output, "build-data", inputs={"--input": args.input}, overwrite=args.overwrite)
with atomic_open(folder.path("data", "train.parquet"), "wb") as handle: ...
folder.remove_tree("data")  # only the files this command wrote there
```
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from glob import escape as glob_escape
from pathlib import Path

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[a-z0-9_]{8}\.tmp")
STAGING = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.staging")

PathLike = str | os.PathLike


class OutputError(ValueError):
    """A write that would touch an input, escape the output folder, or clobber a folder the command did not
    make."""


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse outputs that are inputs, lie inside an input folder, or coincide with each other.

    Args:
        outputs (`Mapping[str, PathLike | None]`): label (e.g. ``"--output"``) → path the command writes.
        inputs (`Mapping[str, PathLike | None]`): label → path the command reads; ``None`` values are skipped.

    Raises:
        `OutputError`: naming both labels and paths, e.g.
            ``--rejects data.json would overwrite the input --input data.json: ...``.
    """
    inputs = {label: path for label, path in inputs.items() if path is not None}
    seen: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        _check_not_input(label, Path(path), inputs)
        target = _resolve(path)
        if target in seen:
            raise OutputError(f"{label} {path} is the same file as "
                              f"{seen[target]}; give them different paths.")
        seen[target] = f"{label} {path}"


def safe_name(name: str, what: str) -> str:
    """Return ``name`` if it is a safe file-name component (a slug: letters, digits, ``._+-``), else raise.

    Args:
        name (`str`): a name taken from a recipe or a record, used in a path.
        what (`str`): where it comes from, for the message (e.g. ``"source name"``).

    Raises:
        `OutputError`: for ``..``, absolute paths, separators, empty or hidden names.
    """
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or ".." in name:
        raise OutputError(f"{what} {name!r} cannot be used in a file "
                          "name: use letters, digits and . _ + - only "
                          "(no path separators, no '..', not starting with a dot).")
    return name


def remove_stale_temporaries_of(path: PathLike) -> int:
    """Delete the `atomic_open` temporaries of ``path`` (``.NAME.PID.XXXXXXXX.tmp`` beside it) whose process
    is gone; return how many."""
    path = Path(path)
    removed = 0
    if path.parent.is_dir():
        for candidate in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
            match = TEMPORARY.fullmatch(candidate.name)
            if match and match["name"] == path.name and candidate.is_file() and not _alive(int(match["pid"])):
                candidate.unlink()
                removed += 1
    return removed


class OutputFolder:
    """A folder a command writes into: confined, input-safe, and deleting only what it recorded writing.

    The manifest ``.bimedix-COMMAND.jsonl`` lists each file claimed with `path` (``{"path":
    "data/x.parquet"}``) and each folder this command created (``{"path": "data/"}``; ``"./"`` when it created
    ``root`` itself). Everything inside a folder it created (other than ``root``) counts as its own for
    temporaries and empty folders; files are deleted only when listed.

    Args:
        root (`PathLike`): the output folder (created if missing).
        command (`str`): the command writing it (``"build-data"``); names its manifest, so a folder another
            command made counts as foreign.
        inputs (`Mapping[str, PathLike | None]`, *optional*): label → input path; nothing that is (or lies
            inside) one of them is ever written or deleted.
        overwrite (`bool`, *optional*, defaults to `False`): allow writing into a non-empty folder this
            command did not create (its other files are kept; files with the names this command writes are
            replaced).
        flag (`str`, *optional*, defaults to ``"--output"``): how the user named ``root``, for messages.

    Raises:
        `OutputError`: ``root`` is a file, is (or is inside) an input, or is a foreign non-empty folder
            and ``overwrite`` is not set.
    """

    def __init__(self, root: PathLike, command: str, *, inputs: Mapping[str, PathLike | None] | None = None,
                 overwrite: bool = False, flag: str = "--output"):
        self.root = Path(root)
        self.command = command
        self.flag = flag
        self.overwrite = overwrite
        self.inputs = {label: path for label, path in (inputs or {}).items() if path is not None}
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(f"{flag} {self.root} is a file; give a folder.")
        _check_not_input(flag, self.root, self.inputs)
        self.manifest = self.root / f".bimedix-{safe_name(command, 'command')}.jsonl"
        fresh = not self.root.exists() or not any(self.root.iterdir())
        if not fresh and not self.manifest.is_file() and not overwrite:
            raise OutputError(f"{flag} {self.root} is not empty and was not "
                              f"made by `bimedix {command}`; choose a new or "
                              "empty folder, or pass --overwrite to write into it (its other files are kept, "
                              "files with the names this command writes are replaced).")
        self._entries: set[str] = set()
        if self.manifest.is_file():
            self._entries = {json.loads(line)["path"]
                             for line in self.manifest.read_text("utf-8").splitlines()
                             if line.strip()}
        self._created_root = fresh  # recorded with the first write, so a run that fails first leaves nothing
        self.remove_stale_temporaries()

    def path(self, *parts: str) -> Path:
        """Claim the file ``root/part/...`` for writing: check the names, refuse inputs, record it; return it.

        Missing folders on the way are created and recorded as this command's.
        """
        if not parts:
            raise OutputError("no output file name given")
        target = self.folder(*parts[:-1]) / _component(parts[-1])
        _check_not_input(f"{self.flag} file", target, self.inputs)
        self._check_inside(target)
        self._record("/".join(parts))
        return target

    def folder(self, *parts: str) -> Path:
        """Return the folder ``root/part/...``, creating (and recording as this command's) what is missing."""
        for depth in range(1, len(parts) + 1):
            folder = self.root.joinpath(*(_component(part) for part in parts[:depth]))
            _check_not_input(f"{self.flag} folder", folder, self.inputs)
            self._check_inside(folder)
            if not folder.is_dir():
                self._record("/".join(parts[:depth]) + "/")
                folder.mkdir()
        return self.root.joinpath(*parts)

    def owns(self, path: PathLike) -> bool:
        """Whether this command recorded writing the file ``path`` (and it is not an input)."""
        relative = self._relative(path)
        return relative in self._entries and _is_input(Path(path), self.inputs) is None

    def remove(self, path: PathLike) -> bool:
        """Delete the file ``path`` if this command owns it (see `owns`); return whether it did."""
        path = Path(path)
        if not path.is_file() or not self.owns(path):
            return False
        path.unlink()
        return True

    def remove_tree(self, *parts: str) -> int:
        """Delete the files this command wrote under ``root/part/...``, then the folders it created that are
        left empty; other files stay. Returns the number of files deleted."""
        top = self.root.joinpath(*(_component(part) for part in parts))
        if not top.is_dir():
            return 0
        removed = sum(self.remove(path) for path in sorted(top.rglob("*")) if path.is_file())
        for folder in sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts)):
            if self._created(folder) and not any(folder.iterdir()):
                folder.rmdir()
        return removed

    def remove_stale_temporaries(self) -> int:
        """Delete `atomic_open` temporaries that killed runs left for files (or in folders) of this
        command."""
        removed = 0
        for folder in self._folders():
            for path in folder.glob(".*.tmp"):
                match = TEMPORARY.fullmatch(path.name)
                if match and path.is_file() and not _alive(int(match["pid"])) \
                        and (self.owns(path.with_name(match["name"])) or self._created(folder)):
                    path.unlink()
                    removed += 1
        return removed

    def _folders(self) -> set[Path]:
        """The folders holding this command's files, and every folder under the ones it created."""
        folders = set()
        for entry in self._entries:
            path = self.root / entry
            if entry == "./":
                folders.add(self.root)
            elif entry.endswith("/"):
                if path.is_dir():
                    folders.update([path, *(p for p in path.rglob("*") if p.is_dir())])
            elif path.parent.is_dir():
                folders.add(path.parent)
        return folders

    def _created(self, folder: Path) -> bool:
        relative = self._relative(folder)
        if relative is None:
            return False
        if relative == ".":
            return self._created_root or "./" in self._entries
        return any(entry in self._entries for entry in _ancestors(relative))

    def _record(self, relative: str) -> None:
        if relative in self._entries:
            return
        new = [relative]
        if self._created_root and "./" not in self._entries:
            new.insert(0, "./")
        self.root.mkdir(parents=True, exist_ok=True)
        self._entries.update(new)
        with open(self.manifest, "a", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"path": entry}) + "\n" for entry in new)

    def _check_inside(self, path: Path) -> None:
        if self._relative(path) is None:  # a symbolic link on the way leads elsewhere
            raise OutputError(f"{path} resolves to {path.resolve()}, outside {self.flag} {self.root}; "
                              "a command writes only inside its output folder.")

    def _relative(self, path: PathLike) -> str | None:
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return None


@contextlib.contextmanager
def staged_folder(final: OutputFolder, *, keep: Collection[str] = ()) -> Iterator[OutputFolder]:
    """Write a whole output folder in a hidden sibling, then swap it into ``final.root`` in one step.

    Yields an `OutputFolder` for the sibling (``.NAME.PID.XXXXXXXX.staging`` beside the resolved
    ``final.root``, same command and inputs). When the block ends, the files of ``final.root`` the command
    does not own (a user's, kept under ``overwrite``) and those under ``keep`` are carried into it (hard
    links, else copies), the two folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)`` on Linux;
    elsewhere the old folder is first renamed aside to ``.NAME.PID.XXXXXXXX.old``), and the old one is
    deleted. A kill at any point leaves ``final.root`` wholly old or wholly new; the next staging of the same
    folder removes what a killed run left. If the block raises, the sibling is deleted and ``final.root`` is
    untouched.

    Args:
        final (`OutputFolder`): the output folder, checked (inputs, ``overwrite``) before any work.
        keep (`Collection[str]`, *optional*): top-level names in ``final.root`` of the command's own files or
            folders that the new folder keeps as its own (a resumable cache written in place, such as
            build-data's ``.work``).

    Examples:

    ```python
    folder = OutputFolder(args.output, "merge", inputs=inputs, overwrite=args.overwrite)  # checked first
    with staged_folder(folder) as staging:
        model.save_pretrained(staging.root)
        write_json(staging.path("merge_report.json"), report)
    ```
    """
    target = final.root.resolve()  # `.` and symbolic links: swap the folder itself
    staging = staging_path(target)
    try:
        new = OutputFolder(staging, final.command, inputs=final.inputs, flag=final.flag)
        new._created_root = final._created(final.root)  # a user's folder (--overwrite) stays theirs
        yield new
        for entry in sorted(final._entries):
            if entry != "./" and entry.split("/")[0] in keep:
                new._record(entry)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # wholly this run's: nothing else is in it
        raise
    # the user's files and the kept ones are carried over; this command's others are all in the staging
    swap_in_folder(staging, target, lambda path: path.name != final.manifest.name and (
        not final.owns(path) or path.relative_to(target).parts[0] in keep))


def staging_path(target: Path, pid: int | None = None) -> Path:
    """A new hidden sibling of ``target`` to write its next version in (``.NAME.PID.XXXXXXXX.staging``,
    beside the real folder when ``target`` is ``.`` or a link); the stagings that killed runs left beside it
    are deleted first."""
    target = target.resolve()
    _remove_stale_stagings(target)
    return target.parent / f".{target.name}.{pid or os.getpid()}.{uuid.uuid4().hex[:8]}.staging"


def swap_in_folder(staging: Path, target: Path, carry: Callable[[Path], bool]) -> None:
    """Replace folder ``target`` by ``staging`` in one step, keeping the files of ``target`` that ``staging``
    does not rewrite and ``carry`` accepts (hard links, else copies).

    The folders are exchanged atomically (``renameat2(RENAME_EXCHANGE)`` on Linux; elsewhere the old folder
    is first renamed aside to ``.NAME.PID.XXXXXXXX.old``), then the old one is deleted. A kill at any point
    leaves ``target`` wholly old or wholly new. If carrying fails (or ``target`` holds a mount point, whose
    files deleting the old folder would reach: `OutputError`), ``staging`` is deleted and ``target`` is
    untouched. A process whose working folder was in ``target`` is moved to the same path in the new one.
    ``target`` may be ``.`` or a link: the real folder is swapped.
    """
    target = target.resolve()
    parent = target.parent
    cwd = Path.cwd()
    try:
        if not target.is_dir():
            os.rename(staging, target)
            return
        _carry_files(target, staging, carry)
        if not _exchange(staging, target):
            # not a `.staging` name: a kill between the two renames leaves it for the user to recover
            aside = parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old"
            os.rename(target, aside)
            os.rename(staging, target)
            staging = aside
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if cwd == target or target in cwd.parents:  # the working folder was in the old one
        os.chdir(cwd if cwd.is_dir() else target)
    shutil.rmtree(staging)  # the old folder: the files it kept are linked into the new one


def link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to the file ``source`` (the same bytes, no copy), else a copy of it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_files(source: Path, staging: Path, carry: Callable[[Path], bool]) -> None:
    """Link (or copy) into ``staging`` the files of ``source`` it lacks that ``carry`` accepts."""
    for path in sorted(source.rglob("*")):
        if path.is_dir() and os.path.ismount(path):  # deleting the old folder would empty that file system
            raise OutputError(f"{path} is a mount point inside the output folder {source}, which is replaced "
                              "whole; choose an output folder without mounted file systems inside.")
        relative = path.relative_to(source)
        new = staging / relative
        if path.is_dir() and not path.is_symlink() or new.exists() or new.is_symlink() or not carry(path):
            continue
        new.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), new)
            continue
        link_or_copy(path, new)


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swap two paths with Linux's ``renameat2(RENAME_EXCHANGE)``; False where it is missing."""
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if function(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(first), None, str(second))


def _remove_stale_stagings(target: Path) -> None:
    """Delete the staging siblings of ``target`` (a resolved path) that killed runs (processes now gone)
    left."""
    for candidate in target.parent.glob(f".{glob_escape(target.name)}.*.staging"):
        match = STAGING.fullmatch(candidate.name)
        if match and match["name"] == target.name and candidate.is_dir() and not _alive(int(match["pid"])):
            shutil.rmtree(candidate)


def _component(part: str) -> str:
    """One path component under the output folder: no separator, not empty, ``.`` or ``..``."""
    if not isinstance(part, str) or part in ("", ".", "..") or "/" in part or "\\" in part or "\0" in part:
        raise OutputError(f"output name {part!r} is not a single file or "
                          "folder name (no '/', '..' or empty names).")
    return part


def _ancestors(relative: str) -> list[str]:
    """``"a/b"`` → ``["a/", "a/b/"]``: the folder entries that make ``a/b`` a folder this command created.

    A created root (``"./"``) does not count: folders a user adds to an output later are theirs.
    """
    parts = relative.split("/")
    return ["/".join(parts[:depth]) + "/" for depth in range(1, len(parts) + 1)]


def _resolve(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _is_input(path: Path, inputs: Mapping[str, PathLike]) -> tuple[str, PathLike] | None:
    target = _resolve(path)
    for label, given in inputs.items():
        source = _resolve(given)
        if target == source or (source.is_dir() and source in target.parents):
            return label, given
    return None


def _check_not_input(label: str, path: Path, inputs: Mapping[str, PathLike]) -> None:
    """Refuse ``path`` when it is an input or lies inside an input folder."""
    found = _is_input(path, inputs)
    if found is not None:
        raise OutputError(f"{label} {path} would overwrite the input "
                          f"{found[0]} {found[1]}: a command never writes "
                          "over its inputs; choose another output path.")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
