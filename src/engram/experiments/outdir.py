"""Output folders: one writer at a time, one experiment per folder, and who wrote it.

Every command that writes a folder (`engram run`/`demo`, `sweep`, `profile`, `plasticity`,
`window`) opens it with `OutputFolder`, which

1. takes an exclusive OS lock on `OUT/.engram.lock` for the whole command (non-blocking): a
   second process is refused with a one-line message naming the holder, whose PID, host,
   command and start time are in `OUT/.engram.lock.json`. The OS drops the lock when its
   holder dies, however it dies, so a killed run never blocks the next one (its stale
   `.engram.lock.json` is simply overwritten);
2. checks, in `claim`, that the folder holds results of the same command and the same
   experiment: `OUT/experiment.json` records the command, the engram version and git commit
   that wrote the folder and the experiment's identity (the settings that determine its
   numbers, as dotted keys). A folder holding results is refused when
   - it has no `experiment.json` (made by an older engram or by hand: nothing proves which
     experiment its rows belong to),
   - another command wrote it,
   - another engram version wrote it (runs made by different code are not mixed),
   - any identity key differs, except the `extensible` keys (lists such as `seeds`), which
     may change: the record then holds the union, so a folder may grow by seeds (or a
     sweep's alternatives, a profile's measures, ...) but never mix two settings.
   The same version at another git commit is allowed with a one-line warning naming both
   commits (every row keeps the run id of the settings that made it);
3. appends one line per invocation to `OUT/provenance.jsonl`: engram version, git commit and
   whether the tree was dirty (when engram runs from a git checkout), Python, torch,
   platform, device, host, PID, command line and start time.

A folder holds results when its `results.csv` is not empty; an empty folder (or one whose
results.csv was deleted) is claimed afresh whatever its old record said.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from engram.errors import EngramError

LOCK_FILE = ".engram.lock"
LOCK_INFO = ".engram.lock.json"
RECORD = "experiment.json"
PROVENANCE = "provenance.jsonl"


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str, bool] | None:
    """(commit, dirty) of the git checkout engram's source files belong to; None when engram
    is not run from a git checkout (an installed wheel), git is missing or slow. The package's
    __init__.py must be tracked there, so an installation inside some other repository
    (a venv in a project folder) is not mistaken for engram's own checkout."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True,
                              timeout=3, check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return commit, dirty


def provenance(device: str = "") -> dict[str, Any]:
    """What made a folder's rows: versions, git commit (when known), machine, command."""
    from engram.version import __version__

    entry: dict[str, Any] = {"started": datetime.datetime.now().astimezone().isoformat(
        timespec="seconds"), "engram": __version__}
    git = _git_state()
    if git is not None:
        entry["git_commit"], entry["git_dirty"] = git
    try:
        import torch
        entry["torch"] = torch.__version__
    except ImportError:  # every command needs torch, but provenance must not fail
        pass
    entry.update(python=platform.python_version(), platform=platform.platform(),
                 device=device, host=socket.gethostname(), pid=os.getpid(),
                 argv=" ".join(sys.argv))
    return entry


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys ({"train": {"lr": 1}} -> {"train.lr":
    1}), with JSON values (tuples become lists), so that a stored record and a new identity
    compare equal exactly when they hold the same settings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.loads(json.dumps(value))
    return flat


def _short(value: Any, limit: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _union(old: list, new: list) -> list:
    """old, then the entries of new that old lacks (compared as canonical JSON)."""
    seen = {json.dumps(v, sort_keys=True) for v in old}
    return old + [v for v in new if json.dumps(v, sort_keys=True) not in seen]


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


# Folders this process holds, with how many `OutputFolder` blocks hold each: the CLI holds a
# folder through a whole command (training, then the summary and plots) while the
# experiment function inside holds it too; a second OS lock from the same process would
# refuse its own holder.
_HELD: dict[Path, list] = {}  # resolved path -> [lock, depth, command]


class OutputFolder:
    """`with OutputFolder(out, "run") as folder:` holds `out`'s lock until the block ends;
    inside, `folder.claim(identity, extensible, device)` checks and records the experiment
    before anything is written. Blocks of one command on the same folder nest within one
    process. See the
    module docstring for the rules."""

    def __init__(self, path: str | Path, command: str) -> None:
        self.path = Path(path)
        self.command = command
        self._lock: Any = None

    # ------------------------------------------------------------------ the lock
    def __enter__(self) -> "OutputFolder":
        from filelock import FileLock, Timeout

        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        held = _HELD.get(self.path.resolve())
        if held is not None and held[2] == self.command:  # an enclosing block holds it
            held[1] += 1
            self._lock = held[0]
            return self
        lock = FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            if held is not None:  # held by this process for another command
                raise Timeout(str(self.path / LOCK_FILE))
            lock.acquire()
        except Timeout:
            raise EngramError(f"{self.path} is in use: {self._holder()} is writing it; wait "
                              "for it to finish, or choose another --out") from None
        self._lock = lock
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        _write_json(self.path / LOCK_INFO, info)
        _HELD[self.path.resolve()] = [lock, 1, self.command]
        return self

    def __exit__(self, *exc: object) -> None:
        key = self.path.resolve()
        _HELD[key][1] -= 1
        if _HELD[key][1] == 0:  # the outermost block lets go
            del _HELD[key]
            (self.path / LOCK_INFO).unlink(missing_ok=True)
            self._lock.release()
            if self._created and {p.name for p in self.path.iterdir()} <= {LOCK_FILE}:
                # a command refused before writing anything leaves no folder behind
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                self.path.rmdir()
        self._lock = None

    def _holder(self) -> str:
        """Who holds the lock, from its info file. The holder writes that file just after
        locking, so a refusal in between waits a moment for it (or for a stale one from a
        killed holder to be replaced)."""
        deadline = time.monotonic() + 2.0
        while True:
            try:
                info = json.loads((self.path / LOCK_INFO).read_text())
                fresh = info.get("host") != socket.gethostname() or _pid_alive(info.get("pid"))
            except (OSError, ValueError, AttributeError):
                info, fresh = None, False
            if fresh or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if not info or not fresh:
            return "another engram process (PID unknown)"
        return (f"`engram {info.get('command')}` (PID {info.get('pid')} on {info.get('host')}, "
                f"since {info.get('started')})")

    # ------------------------------------------------------------------ the experiment
    def holds_results(self) -> bool:
        results = self.path / "results.csv"
        return results.is_file() and results.stat().st_size > 0

    def claim(self, identity: dict[str, Any], extensible: Iterable[str] = ("seeds",),
              device: str = "") -> None:
        """Refuse the folder unless its results belong to this command and experiment (see
        the module docstring); then record the experiment (the union of the extensible
        lists) and append this invocation's provenance. `identity`: the settings that
        determine the numbers (nested mappings allowed); `extensible`: dotted keys of list
        settings the folder may grow by."""
        assert self._lock is not None, "claim() inside `with OutputFolder(...)`"
        from engram.version import __version__

        new = flatten(identity)
        extensible = [key for key in extensible if isinstance(new.get(key), list)]
        git = _git_state()
        commit = git[0] if git is not None else None
        record_file = self.path / RECORD
        if self.holds_results():
            old = self._read_record(record_file)
            new = self._check(old, new, extensible, __version__, commit)
        record = {"command": self.command, "engram": __version__, "git_commit": commit,
                  "extensible": extensible, "identity": new}
        _write_json(record_file, record)
        with open(self.path / PROVENANCE, "a") as f:
            f.write(json.dumps({"command": self.command, **provenance(device)}) + "\n")

    def _read_record(self, record_file: Path) -> dict[str, Any]:
        if not record_file.is_file():
            raise EngramError(
                f"{self.path} holds results.csv but no {RECORD} (written by an older engram or "
                "by hand), so nothing shows which experiment its rows belong to; choose "
                "another --out, or move its results.csv away to start afresh there")
        try:
            old = json.loads(record_file.read_text())
            old["identity"], old["command"]  # noqa: B018 - the keys every record has
        except (OSError, ValueError, KeyError, TypeError):
            raise EngramError(f"{record_file} is not an engram experiment record; choose "
                              "another --out") from None
        return old

    def _check(self, old: dict[str, Any], new: dict[str, Any], extensible: list[str],
               version: str, commit: str | None) -> dict[str, Any]:
        """The merged identity when the folder's results are this experiment's; else raise."""
        if old["command"] != self.command:
            raise EngramError(f"{self.path} holds results of `engram {old['command']}`; "
                              f"`engram {self.command}` writes a folder of its own: choose "
                              "another --out")
        if old.get("engram") != version:
            raise EngramError(f"{self.path} was written by engram {old.get('engram')} and this "
                              f"is engram {version}: runs made by different code are not mixed; "
                              "choose another --out (or finish it with engram "
                              f"{old.get('engram')})")
        grows = [key for key in extensible if key in old.get("extensible", ())]
        stored = old["identity"]
        differing = sorted(key for key in set(stored) | set(new)
                           if key not in grows and stored.get(key) != new.get(key))
        if differing:
            shown = "; ".join(f"{key}: {_short(stored.get(key))} there, "
                              f"{_short(new.get(key))} here" for key in differing[:3])
            more = f" (and {len(differing) - 3} more)" if len(differing) > 3 else ""
            allowed = f"only {', '.join(grows)} may grow" if grows else "nothing may change"
            raise EngramError(f"{self.path} holds another experiment ({shown}{more}); rerun "
                              f"with its settings ({allowed}) or choose another --out")
        if old.get("git_commit") and commit and old["git_commit"] != commit:
            print(f"engram: warning: {self.path} was written at engram commit "
                  f"{old['git_commit'][:12]} and this is {commit[:12]} (both version "
                  f"{version}); its finished runs are kept", file=sys.stderr)
        return {**new, **{key: _union(stored[key], new[key]) for key in grows}}


def _write_json(path: Path, value: Any) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)
