"""Participants of a DICOM tree, found by header: files grouped by PatientID at any depth.

    from data_prep.dicom.participants import find_participants
    found = find_participants("dicom", visit_folder="00m", other_visit_folders=["12m", "24m"])
    for p in found.participants:          # sorted by key (PatientID)
        p.key, p.paths(), p.problems      # PHI in memory only
    found.problems                        # unusable files no participant could be given

Folder names and depth do not matter: OAI's `<visit>/<batch>/<ID>/<date>/<series>/<image>`,
a site's `<ID>/<visit>/<series>/...` and a flat export of one folder all give the same
participants, and a participant whose series lie in two batch folders is one participant.
Every file is opened once here and only its first few KiB are read (fast.read_text: about
16 us per file; pydicom for the files it declines).

Rules, in order:
- Scope: with a visit folder (a spec's `visits[...].folder` or `dicom.visit_folder`), only
  `<root>/<visit>` when it exists, else every folder of that name at any depth (e.g.
  `<ID>/00m/...`); folders named like the other visits are never entered. Files outside
  the scope are counted (`n_outside_visit`), not read.
- Key: the tag `tag` (default PatientID) of each file, stripped. A DICOM image without it
  takes the folder name `participant_depth` levels below the scan root when that is given
  (an anonymised tree whose folders carry the IDs); otherwise it is a `no_patient_id`
  problem.
- Problem files (not DICOM, truncated, no image, no key; categories of series.REASONS and
  `no_patient_id`) are reported under the participant whose files are in their folder or
  below it (e.g. `<ID>/notes.txt` beside `<ID>/<date>/<series>/`) when that is exactly one
  participant; else under nobody (`ParticipantScan.problems`). They are never read as
  images.

Work is split by folder (`map_fn`, e.g. a process pool's `map`), so large trees are read in
parallel; a folder whose files all belong to one participant is kept as the folder alone.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.datadict import tag_for_keyword

import data_prep.dicom.fast as dicom_fast
from data_prep.dicom.series import _quiet_pydicom, scan_tree

DEFAULT_TAG = "PatientID"
NO_KEY = "no_patient_id"  # a DICOM image without the participant tag (not in series.REASONS)
# Folders handed to map_fn per worker: enough to keep every worker busy to the end.
FOLDERS_PER_WORKER = 8


class DicomTreeError(ValueError):
    """A DICOM tree that cannot be scanned as asked (e.g. no folder of the chosen visit)."""


def participant_tag(keyword: str) -> int:
    """The tag number of a DICOM keyword (`PatientID` -> 0x00100020); ValueError otherwise."""
    tag = tag_for_keyword(str(keyword))
    if tag is None:
        raise ValueError(f"dicom.participant_tag {keyword!r} is not a DICOM keyword; use the "
                         "keyword of the header element holding the cohort table's key, e.g. "
                         "PatientID (the default) or OtherPatientIDs")
    return int(tag)


@dataclass
class Participant:
    """One participant's files. `key` and file names are PHI: in memory only."""

    key: str
    # (folder, file names in it) with this key; names None: every file of the folder
    parts: list[tuple[str, tuple[str, ...] | None]] = field(default_factory=list)
    # problem files attributed to this participant: (path, category, detail)
    problems: list[tuple[str, str, str]] = field(default_factory=list)

    def paths(self) -> list[Path]:
        """The participant's image files (problem files excluded), sorted."""
        out: list[Path] = []
        for folder, names in self.parts:
            if names is None:
                with os.scandir(folder) as it:
                    names = tuple(e.name for e in it if e.is_file())
            out += (Path(folder, n) for n in names)
        return sorted(out)


@dataclass
class ParticipantScan:
    """Outcome of find_participants."""

    root: Path  # the folder scanned (the visit folder when it lies directly under the root)
    participants: list[Participant]  # sorted by key
    problems: list[tuple[str, str, str]]  # unattributed problem files: (path, category, detail)
    n_files: int  # files read (in scope)
    n_outside_visit: int  # files not under a folder of the chosen visit (not read)


@dataclass(frozen=True)
class _Config:
    tag: int
    keyword: str
    visit: str | None  # files count only under a folder of this name (None: every file)
    prune: frozenset[str]  # folder names never entered (the other visits)
    depth: int | None  # participant_depth: key fallback from the folder name at this depth


@dataclass
class _Folder:
    """What one folder's own files hold (from a worker)."""

    path: str
    rel: tuple[str, ...]  # folder names from the scan root down to this folder
    keyed: dict[str, tuple[str, ...] | None]  # key -> file names (None: all files)
    problems: list[tuple[str, str, str]]  # (file name, category, detail)
    n_files: int = 0  # files read
    n_outside: int = 0  # files not read: outside the visit's folders


def scan_root(dicom: str | os.PathLike, visit_folder: str | None,
              other_visit_folders: Iterable[str] = ()) -> tuple[Path, bool]:
    """(folder to scan, whether the visit folder must still be found on each file's path).

    `<dicom>/<visit>` when it exists; else `dicom` itself, with files kept only under a
    folder named `visit` at any depth. Raises DicomTreeError when there is no such folder.
    """
    dicom = Path(dicom)
    if not dicom.is_dir():
        raise DicomTreeError(f"DICOM folder {dicom} does not exist")
    if not visit_folder:
        return dicom, False
    if (dicom / visit_folder).is_dir():
        return dicom / visit_folder, False
    prune = set(other_visit_folders) - {visit_folder}
    others, queue, seen = set(), [str(dicom)], set()
    while queue:  # breadth first: a visit folder is usually near the top
        folder = queue.pop(0)
        real = os.path.realpath(folder)
        if real in seen:  # a symlink loop
            continue
        seen.add(real)
        with os.scandir(folder) as it:
            subs = sorted((e.name, e.path) for e in it if e.is_dir())
        if any(name == visit_folder for name, _ in subs):
            return dicom, True
        others.update(name for name, _ in subs if name in prune)
        queue += [path for name, path in subs if name not in prune]
    found = f"; folders of other visits found: {sorted(others)}" if others else ""
    raise DicomTreeError(f"no folder named {visit_folder!r} (the visit's image folder) under "
                         f"{dicom}{found}")


def find_participants(dicom: str | os.PathLike, *, visit_folder: str | None = None,
                      other_visit_folders: Iterable[str] = (), tag: str = DEFAULT_TAG,
                      participant_depth: int | None = None,
                      map_fn: Callable[..., Iterable] = map, workers: int = 1
                      ) -> ParticipantScan:
    """Group every DICOM file under `dicom` into participants by its `tag` (module docstring).

    Args:
        dicom: the tree's root.
        visit_folder: the chosen visit's folder name, or None (every file counts).
        other_visit_folders: folder names of the other visits (never entered).
        tag: DICOM keyword of the participant key; the cohort table joins on its value.
        participant_depth: for images without the tag, the folder level below the scan
            root whose name is the key (1: `<visit>/<ID>`, 2: `<visit>/<batch>/<ID>`; the
            scan root is `<dicom>/<visit>`, or `dicom` when the visit folder lies deeper).
        map_fn: `map`, or a process pool's `map` (ordered) to read folders in parallel.
        workers: processes behind `map_fn`: the tree is split into about
            FOLDERS_PER_WORKER x workers folders.
    """
    root, need_visit = scan_root(dicom, visit_folder, other_visit_folders)
    config = _Config(tag=participant_tag(tag), keyword=str(tag),
                     visit=visit_folder if need_visit else None,
                     prune=frozenset(set(other_visit_folders) - {visit_folder or ""}),
                     depth=participant_depth)
    n_jobs = FOLDERS_PER_WORKER * workers if workers > 1 else 1
    items = _split(root, config, n_jobs)
    jobs = [items[i::n_jobs] for i in range(min(n_jobs, len(items)))]  # round robin: balanced
    folders: list[_Folder] = []
    for found in map_fn(functools.partial(_scan_job, config=config), jobs):
        folders += found
    folders.sort(key=lambda f: f.path)
    return _group(root, folders)


def _split(root: Path, config: _Config, target: int) -> list[tuple[str, tuple[str, ...], bool]]:
    """Jobs (folder, rel, recursive): the tree cut into about `target` subtrees, breadth
    first; the folders cut through are jobs for their own files only."""
    frontier = [(str(root), ())]
    jobs: list[tuple[str, tuple[str, ...], bool]] = []
    while 1 < target and frontier and len(frontier) < target:
        below = []
        for folder, rel in frontier:
            jobs.append((folder, rel, False))
            below += [(p, (*rel, n)) for p, n in _subfolders(folder, config)]
        frontier = below
    return jobs + [(folder, rel, True) for folder, rel in frontier]


def _subfolders(folder: str, config: _Config) -> list[tuple[str, str]]:
    with os.scandir(folder) as it:
        return sorted((e.path, e.name) for e in it
                      if e.is_dir() and e.name not in config.prune)


def _walk(folder: str, rel: tuple[str, ...], config: _Config, recursive: bool
          ) -> Iterator[tuple[str, tuple[str, ...], list[str]]]:
    """(folder, rel, file names) for `folder` and, if recursive, every folder below it
    (symlinks followed, each real folder once)."""
    stack, seen = [(folder, rel)], set()
    while stack:
        path, parts = stack.pop()
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        names, subs = [], []
        with os.scandir(path) as it:
            for e in it:
                if e.is_dir():
                    if recursive and e.name not in config.prune:
                        subs.append((e.path, (*parts, e.name)))
                elif e.is_file():
                    names.append(e.name)
        if names:
            yield path, parts, sorted(names)
        stack += sorted(subs, reverse=True)


def _scan_job(job: list[tuple[str, tuple[str, ...], bool]], config: _Config) -> list[_Folder]:
    """Read the key of every file in one job's folders (runs in a worker)."""
    return [f for folder, rel, recursive in job
            for f in _scan_folders(folder, rel, recursive, config)]


def _scan_folders(folder: str, rel: tuple[str, ...], recursive: bool, config: _Config
                  ) -> Iterator[_Folder]:
    for path, parts, names in _walk(folder, rel, config, recursive):
        if config.visit is not None and config.visit not in parts:
            yield _Folder(path, parts, {}, [], n_outside=len(names))
            continue
        keyed: dict[str, list[str]] = {}
        problems = []
        for name in names:
            key, problem = _file_key(os.path.join(path, name), config)
            if key is None and problem[0] == NO_KEY and config.depth and len(parts) >= config.depth:
                key = parts[config.depth - 1]  # the spec says folders at this depth are IDs
            if key is None:
                problems.append((name, *problem))
            else:
                keyed.setdefault(key, []).append(name)
        whole = len(keyed) == 1 and not problems  # one participant's folder: keep no names
        yield _Folder(path, parts, {k: None if whole else tuple(v) for k, v in keyed.items()},
                      problems, n_files=len(names))


def _file_key(path: str, config: _Config) -> tuple[str | None, tuple[str, str]]:
    """(key, ("", "")) for a participant's file, else (None, (category, detail))."""
    key = dicom_fast.read_text(path, config.tag)
    if key:
        return key, ("", "")
    with _quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[config.tag])
            key = str(ds.get(config.keyword, "") or "").strip()
        except Exception:  # noqa: BLE001 - classified below, as scan_tree does it
            key = ""
    if key:
        return key, ("", "")
    skipped = scan_tree(os.path.dirname(path), files=[Path(path)]).skipped
    if skipped:
        return None, (skipped[0].category, skipped[0].reason)
    return None, (NO_KEY, f"DICOM image without {config.keyword}: belongs to no participant "
                          "(set dicom.participant_depth in the spec if folder names are IDs)")


def _group(root: Path, folders: list[_Folder]) -> ParticipantScan:
    by_key: dict[str, Participant] = {}
    below: dict[str, set[str]] = {}  # folder -> keys of the files in it and below it
    n_files = n_outside = 0
    for f in folders:
        n_outside += f.n_outside
        n_files += f.n_files
        for key, names in f.keyed.items():
            by_key.setdefault(key, Participant(key)).parts.append((f.path, names))
        if f.keyed:
            for depth in range(len(f.rel) + 1):
                below.setdefault(_ancestor(root, f.rel, depth), set()).update(f.keyed)
    unattributed = []
    for f in folders:
        keys = below.get(f.path, set())
        owner = next(iter(keys)) if len(keys) == 1 else None
        for name, category, detail in f.problems:
            problem = (os.path.join(f.path, name), category, detail)
            (by_key[owner].problems if owner else unattributed).append(problem)
    participants = [by_key[k] for k in sorted(by_key)]
    return ParticipantScan(root=root, participants=participants, problems=unattributed,
                           n_files=n_files, n_outside_visit=n_outside)


def _ancestor(root: Path, rel: tuple[str, ...], depth: int) -> str:
    return os.path.join(root, *rel[:depth])

