"""Which source a measurement ran: the exact commit, whether the tree had uncommitted changes,
and a hash of the source files themselves.

A benchmark or soak records `source_revision()` in its report. Where git is at hand the commit
and a dirty flag come from it. A GPU host often receives a copy of the tree without `.git`; there
the commit comes from a `REVISION.json` stamp written beside the sources before the copy
(`python -m client.provenance --stamp`), and `tree_sha256` is computed on the host from the
files it actually ran, so a recorded run can be matched to a commit afterwards
(`git checkout <commit> && python -m client.provenance` prints the same hash only for the same
sources). Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = "REVISION.json"
# The sources that decide what a run measures (the hash covers these, sorted by path).
SOURCE_DIRS = ("bench", "client", "engines", "proto", "scripts", "server", "tests")
SOURCE_SUFFIXES = (".py", ".sh", ".proto", ".yaml", ".json", ".toml")


def tree_sha256(root: Path = ROOT) -> str:
    """sha256 over the paths and bytes of the source files under SOURCE_DIRS plus pyproject.toml
    and every file of the packaged models (engines/assets); caches, hidden folders, recorded
    results and stamps excluded. Symbolic links are followed (a copy may link its assets)."""
    files = [root / "pyproject.toml"] if (root / "pyproject.toml").exists() else []
    for d in SOURCE_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / d, followlinks=True):
            rel = Path(dirpath).relative_to(root)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith(".") and n not in ("__pycache__", "results"))
            assets = rel.parts[:2] == ("engines", "assets")
            files += [Path(dirpath) / n for n in filenames if assets or Path(n).suffix in SOURCE_SUFFIXES]
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_revision(root: Path = ROOT) -> dict | None:
    """{"commit", "dirty", "changed"} from git, or None where the tree is no git checkout."""
    top = (_git(root, "rev-parse", "--show-toplevel") or "").strip()
    if not top or Path(top).resolve() != root.resolve():
        return None  # no checkout, or a copy of the tree inside another checkout
    commit = (_git(root, "rev-parse", "HEAD") or "").strip()
    if not commit:
        return None
    status = _git(root, "status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "changed": changed[:50]}


def source_revision(root: Path = ROOT) -> dict:
    """What a report records: commit, dirty flag, where they came from, and the tree hash."""
    rev = git_revision(root)
    tree = tree_sha256(root)
    stamp = json.loads((root / STAMP).read_text()) if (root / STAMP).exists() else None
    if rev is not None and not (rev.get("dirty") and stamp and stamp.get("tree_sha256") == tree):
        rev["source"] = "git"
    elif stamp is not None:
        # No git, or a git whose HEAD is older than the files (a device copy carries the
        # checkout's .git as it was when that copy was first made, so it reads "changed"): a
        # stamp whose tree hash is the tree's names the commit that really ran.
        rev = {**stamp, "source": STAMP}
    else:
        rev = {"commit": "unknown", "dirty": None, "changed": [], "source": "none"}
    if rev.get("source") == STAMP and rev.get("tree_sha256") not in (None, tree):
        # The files changed after the stamp was written: the stamp's commit is not what ran.
        rev["dirty"] = True
        rev["stamp_tree_sha256"] = rev["tree_sha256"]
    rev["tree_sha256"] = tree
    return rev


def describe(rev: dict) -> str:
    """One line for a summary: `abc1234 (uncommitted changes)`."""
    commit = str(rev.get("commit", "unknown"))[:12]
    flag = {True: " (uncommitted changes)", False: "", None: " (dirty state unknown)"}[rev.get("dirty")]
    return f"{commit}{flag}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stamp", action="store_true",
                   help=f"write {STAMP} (commit, dirty flag, tree hash) for a copy of the tree without .git")
    args = p.parse_args(argv)
    rev = source_revision()
    if args.stamp:
        if rev["source"] != "git":
            print("--stamp needs a git checkout", file=sys.stderr)
            return 1
        (ROOT / STAMP).write_text(json.dumps({k: rev[k] for k in ("commit", "dirty", "changed", "tree_sha256")},
                                             indent=1) + "\n")
    print(json.dumps(rev, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
