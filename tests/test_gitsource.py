"""A config that lives in git: parsing the source form, fetching a branch from a real bare
repository (file:// URL) and checking revisions out, each into a folder of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.control.gitsource import GitRef, GitSource, GitSourceError


class Repo:
    """A bare repository and a working clone that commits and pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "origin.git"
        self.work = root / "work"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(self.bare)], check=True)
        subprocess.run(["git", "init", "-q", "-b", "main", str(self.work)], check=True)

    def git(self, *args: str) -> str:
        command = ["git", "-C", str(self.work), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()

    def commit(self, files: dict[str, str], message: str = "change") -> str:
        for name, text in files.items():
            (self.work / name).parent.mkdir(parents=True, exist_ok=True)
            (self.work / name).write_text(text)
        self.git("add", ".")
        self.git("commit", "-q", "-m", message)
        self.git("push", "-q", str(self.bare), "HEAD:main")
        return self.git("rev-parse", "HEAD")

    @property
    def url(self) -> str:
        return f"file://{self.bare}"


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("git+file:///srv/r.git#main:config.yaml", GitRef("file:///srv/r.git", "main", "config.yaml")),
        ("git+https://h/o/r#v1.2:deploy/c.yaml", GitRef("https://h/o/r", "v1.2", "deploy/c.yaml")),
        ("git+ssh://git@h/r.git#release/2", GitRef("ssh://git@h/r.git", "release/2", "config.yaml")),
    ],
)
def test_the_source_form(text: str, ref: GitRef) -> None:
    assert GitRef.parse(text) == ref
    assert GitRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("file:///srv/r.git#main", "is not a git source"),
        ("git+file:///srv/r.git", "names no branch"),
        ("git+file:///r.git#main:/etc/passwd", "must be relative"),
        ("git+file:///r.git#main:../x.yaml", "without '..'"),
        ("git+file:///r.git#--upload-pack=x:c.yaml", "not a branch"),
        ("git+--upload-pack=evil#main", "may not start with '-'"),
        ("git+file:///r.git#a..b", "not a branch"),
    ],
)
def test_bad_sources_are_refused_saying_why(text: str, complaint: str) -> None:
    with pytest.raises(GitSourceError, match=complaint):
        GitRef.parse(text)


def test_fetch_and_check_out_revisions(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    first = repo.commit({"config.yaml": "version: 1\n", "deploy/x.txt": "x"})
    source = GitSource(GitRef.parse(f"git+{repo.url}#main:config.yaml"), tmp_path / "state" / "git")
    assert source.fetch() == first
    one = source.checkout(first)
    assert one.config.read_text() == "version: 1\n" and (one.folder / "deploy" / "x.txt").read_text() == "x"
    second = repo.commit({"config.yaml": "version: 1\n# two\n"})
    assert source.fetch() == second
    two = source.checkout(second)
    assert two.folder != one.folder and one.config.read_text() == "version: 1\n"  # each revision apart
    assert source.checkout(second) == two  # made once
    assert source.fetch() == second  # nothing new


def test_an_unknown_branch_or_repository_is_one_clear_error(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    repo.commit({"config.yaml": "version: 1\n"})
    with pytest.raises(GitSourceError, match=r"cannot fetch .* \(nope\)"):
        GitSource(GitRef.parse(f"git+{repo.url}#nope"), tmp_path / "a").fetch()
    with pytest.raises(GitSourceError, match="cannot fetch"):
        GitSource(GitRef.parse(f"git+file://{tmp_path}/missing.git#main"), tmp_path / "b").fetch()


def test_a_commit_id_as_the_ref(tmp_path: Path) -> None:
    repo = Repo(tmp_path)
    first = repo.commit({"config.yaml": "version: 1\n"})
    repo.commit({"config.yaml": "version: 1\n# later\n"})
    source = GitSource(GitRef.parse(f"git+{repo.url}#{first}:config.yaml"), tmp_path / "state")
    assert source.fetch() == first
    assert source.checkout(first).config.read_text() == "version: 1\n"
