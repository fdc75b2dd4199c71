"""client/provenance.py: what a benchmark records as the source that ran."""

from __future__ import annotations

import json
import subprocess

from client.provenance import STAMP, describe, source_revision, tree_sha256


def _tree(root):
    (root / "server").mkdir(parents=True)
    (root / "server" / "a.py").write_text("x = 1\n")
    (root / "engines" / "assets" / "m").mkdir(parents=True)
    (root / "engines" / "assets" / "m" / "weights.pt").write_bytes(b"\0\1")
    (root / "pyproject.toml").write_text("[project]\n")


def test_this_checkout_has_a_commit_and_a_tree_hash():
    rev = source_revision()
    assert rev["source"] == "git" and len(rev["commit"]) == 40 and rev["dirty"] in (True, False)
    assert len(rev["tree_sha256"]) == 64


def test_a_copy_without_git_reads_its_stamp_and_notices_changes(tmp_path):
    root = tmp_path / "copy"
    _tree(root)
    assert source_revision(root)["commit"] == "unknown" and source_revision(root)["dirty"] is None
    (root / STAMP).write_text(json.dumps({"commit": "c" * 40, "dirty": False, "changed": [],
                                          "tree_sha256": tree_sha256(root)}))
    rev = source_revision(root)
    assert (rev["commit"], rev["dirty"], rev["source"]) == ("c" * 40, False, STAMP)
    assert describe(rev) == "c" * 12
    (root / "engines" / "assets" / "m" / "weights.pt").write_bytes(b"\0\2")  # the packaged model counts too
    rev = source_revision(root)
    assert rev["dirty"] is True and rev["stamp_tree_sha256"] != rev["tree_sha256"]
    assert "uncommitted" in describe(rev)


def test_a_copy_inside_another_checkout_does_not_take_its_commit(tmp_path):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    root = tmp_path / ".wt99"
    _tree(root)
    assert source_revision(root)["source"] == "none"


def test_a_stale_git_beside_a_matching_stamp_names_the_stamped_commit(tmp_path):
    # A device copy: the checkout's old .git (HEAD older than the files, so git says "changed")
    # and the REVISION.json written for this tree. The stamp's commit is what ran.
    root = tmp_path / "copy"
    _tree(root)
    git = ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "old"], check=True)
    (root / "server" / "a.py").write_text("x = 2\n")
    assert source_revision(root)["source"] == "git" and source_revision(root)["dirty"] is True
    (root / STAMP).write_text(json.dumps({"commit": "d" * 40, "dirty": False, "changed": [],
                                          "tree_sha256": tree_sha256(root)}))
    rev = source_revision(root)
    assert (rev["commit"], rev["dirty"], rev["source"]) == ("d" * 40, False, STAMP)
    # a stamp of another tree does not override git's answer
    (root / "server" / "a.py").write_text("x = 3\n")
    rev = source_revision(root)
    assert rev["source"] == "git" and rev["dirty"] is True
