"""The users file (xapid.auth.users) and the role list (xapid.auth.roles)."""

from __future__ import annotations

import os
import re
import stat
import threading
from pathlib import Path

import pytest

from xapid.auth import users as users_module
from xapid.auth.roles import ROLES, role_at_least, validate_role
from xapid.auth.users import User, UsersError, UsersFile

HASH = "$2b$04$" + "a" * 21 + "e" + "a" * 31  # a well-formed bcrypt hash nobody's password matches


def make(path: Path) -> UsersFile:
    users = UsersFile(path, rounds=4)
    users.load()
    return users


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "users"


@pytest.fixture
def users(path: Path) -> UsersFile:
    return make(path)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- roles ---------------------------------------------------------------------------------


def test_roles_are_xapis_least_privileged_first() -> None:
    """ROLES lists xapi's six roles from read-only to pool-admin."""
    assert ROLES == ("read-only", "vm-operator", "vm-admin", "vm-power-admin", "pool-operator", "pool-admin")


def test_role_at_least_follows_the_order() -> None:
    """A role is at least itself and every less privileged role, not a more privileged one."""
    assert role_at_least("vm-admin", "vm-admin")
    assert role_at_least("pool-admin", "read-only")
    assert not role_at_least("vm-operator", "vm-power-admin")


def test_validate_role_names_the_choices() -> None:
    """An unknown role is a ValueError listing the known ones; a known one is returned."""
    assert validate_role("pool-operator") == "pool-operator"
    with pytest.raises(ValueError, match=r"unknown role 'root' \(expected one of: read-only, .*pool-admin\)"):
        validate_role("root")
    with pytest.raises(ValueError):
        role_at_least("root", "read-only")


# -- adding, verifying, deleting -----------------------------------------------------------


def test_add_then_verify(users: UsersFile) -> None:
    """An added user verifies with their password and gets their role."""
    users.add("alice", "vm-admin", "correct horse")
    assert users.verify("alice", "correct horse") == User("alice", "vm-admin")
    assert users.get("alice") == User("alice", "vm-admin")


def test_wrong_password_and_unknown_user_both_give_none(users: UsersFile) -> None:
    """A wrong password, an unknown user and an unstorable password all give None."""
    users.add("alice", "vm-admin", "correct horse")
    assert users.verify("alice", "wrong") is None
    assert users.verify("bob", "correct horse") is None
    assert users.verify("alice", "") is None
    assert users.verify("alice", "x" * 100) is None


def test_unknown_user_costs_one_bcrypt_check(users: UsersFile, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verifying an unknown name still runs one bcrypt check, at the cost of the file's hashes."""
    users.add("alice", "vm-admin", "pw")
    checked: list[str] = []
    real = users_module._bcrypt.verify
    monkeypatch.setattr(users_module._bcrypt, "verify", lambda pw, h: checked.append(h) or real(pw, h))
    assert users.verify("nobody", "pw") is None
    assert users.verify("alice", "pw") is not None
    assert len(checked) == 2 and checked[0].startswith("$2b$04$")


def test_add_existing_user_refused(users: UsersFile) -> None:
    """Adding a name that exists is a UsersError and leaves the first password in place."""
    users.add("alice", "vm-admin", "one")
    with pytest.raises(UsersError, match="already exists"):
        users.add("alice", "read-only", "two")
    assert users.verify("alice", "one") == User("alice", "vm-admin")


def test_add_validates_role_and_name(users: UsersFile, path: Path) -> None:
    """An unknown role or an invalid name is refused before anything is written."""
    with pytest.raises(UsersError, match="unknown role 'root'"):
        users.add("alice", "root", "pw")
    for name in ("", "a:b", "has space", "x" * 65, "ünï"):
        with pytest.raises(UsersError, match="invalid user name"):
            users.add(name, "read-only", "pw")
    assert not path.exists()
    users.add("a.b@c_d-" + "e" * 56, "read-only", "pw")


@pytest.mark.parametrize("password", ["", "two\nlines", "nul\0", "x" * 73, "é" * 37])
def test_unstorable_passwords_refused(users: UsersFile, password: str) -> None:
    """Empty, multi-line, NUL-containing and over-72-byte passwords are refused."""
    with pytest.raises(UsersError):
        users.add("alice", "vm-admin", password)


def test_passwords_may_hold_any_other_text(users: UsersFile) -> None:
    """Spaces, colons, a carriage return and non-ASCII are ordinary password characters."""
    password = " a:b\r c # é "
    users.add("alice", "vm-admin", password)
    assert users.verify("alice", password) is not None
    assert users.verify("alice", password.strip()) is None


def test_delete(users: UsersFile) -> None:
    """A deleted user no longer verifies; deleting an absent user is a UsersError."""
    users.add("alice", "vm-admin", "pw")
    users.add("bob", "read-only", "pw")
    users.delete("alice")
    assert users.verify("alice", "pw") is None
    assert users.names() == ["bob"]
    with pytest.raises(UsersError, match="no user alice"):
        users.delete("alice")


def test_set_password(users: UsersFile) -> None:
    """set_password replaces the password and keeps the role; an absent user is a UsersError."""
    users.add("alice", "vm-admin", "old")
    users.set_password("alice", "new")
    assert users.verify("alice", "old") is None
    assert users.verify("alice", "new") == User("alice", "vm-admin")
    with pytest.raises(UsersError, match="no user bob"):
        users.set_password("bob", "pw")
    with pytest.raises(UsersError, match="empty"):
        users.set_password("alice", "")


def test_list_and_names_sorted(users: UsersFile) -> None:
    """list() and names() are sorted by name."""
    for name, role in (("carol", "pool-admin"), ("alice", "vm-admin"), ("bob", "read-only")):
        users.add(name, role, "pw")
    assert users.names() == ["alice", "bob", "carol"]
    assert users.list() == [User("alice", "vm-admin"), User("bob", "read-only"), User("carol", "pool-admin")]


def test_new_instance_reads_what_was_written(users: UsersFile, path: Path) -> None:
    """Another UsersFile on the same path loads the users and verifies their passwords."""
    users.add("alice", "vm-admin", "pw")
    again = make(path)
    assert again.verify("alice", "pw") == User("alice", "vm-admin")


def test_bad_rounds_refused(path: Path) -> None:
    """A bcrypt cost outside 4-31 is a UsersError."""
    with pytest.raises(UsersError, match="rounds"):
        UsersFile(path, rounds=3)


# -- the file on disk ----------------------------------------------------------------------


def test_created_with_mode_600_in_a_new_0700_directory(tmp_path: Path) -> None:
    """A missing file is created 0600 and its missing parent directory 0700."""
    path = tmp_path / "etc" / "users"
    make(path).add("alice", "vm-admin", "pw")
    assert mode(path) == 0o600
    assert mode(path.parent) == 0o700


def test_rewrite_makes_mode_600(users: UsersFile, path: Path) -> None:
    """A file someone made world-readable is 0600 again after a change."""
    users.add("alice", "vm-admin", "pw")
    path.chmod(0o644)
    users.add("bob", "read-only", "pw")
    assert mode(path) == 0o600


def test_writes_leave_no_tmp_and_replace_a_stale_one(users: UsersFile, path: Path) -> None:
    """Writing goes through path.tmp, removes a stale one first, and leaves none behind."""
    tmp = path.with_name("users.tmp")
    tmp.write_text("left over\n")
    users.add("alice", "vm-admin", "pw")
    users.set_password("alice", "pw2")
    users.delete("alice")
    assert not tmp.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["users"]


def test_write_replaces_the_inode(users: UsersFile, path: Path) -> None:
    """A change replaces the file (a new inode) rather than rewriting it in place."""
    users.add("alice", "vm-admin", "pw")
    before = path.stat().st_ino
    users.add("bob", "vm-admin", "pw")
    assert path.stat().st_ino != before


def test_file_format(users: UsersFile, path: Path) -> None:
    """Each user is one name:role:bcrypt-hash line at the configured cost."""
    users.add("alice", "vm-admin", "pw")
    (line,) = path.read_text().splitlines()
    name, role, hashed = line.split(":")
    assert (name, role) == ("alice", "vm-admin") and hashed.startswith("$2b$04$") and len(hashed) == 60


def test_comments_and_blank_lines_ignored_and_kept(path: Path) -> None:
    """Comments and blank lines are skipped when reading and preserved by changes."""
    path.write_text(f"# admins\n\n  alice:pool-admin:{HASH}  \n# others\nbob:read-only:{HASH}\n")
    users = make(path)
    assert users.names() == ["alice", "bob"]
    users.delete("alice")
    users.add("carol", "vm-admin", "pw")
    lines = path.read_text().splitlines()
    assert lines[:4] == ["# admins", "", "# others", f"bob:read-only:{HASH}"]
    assert lines[4].startswith("carol:vm-admin:$2b$04$")


def test_missing_file_is_empty(path: Path) -> None:
    """Loading a missing file gives no users and verifies nobody."""
    users = make(path)
    assert users.list() == []
    assert users.verify("alice", "pw") is None


@pytest.mark.parametrize("line, message", [
    ("alice:vm-admin", "malformed line"),
    (f"alice:vm-admin:{HASH}:extra", "malformed line"),
    (f"al ice:vm-admin:{HASH}", "invalid user name"),
    (f"alice:root:{HASH}", "unknown role 'root'"),
    ("alice:vm-admin:plaintext", "not a bcrypt hash"),
    (f"bob:vm-admin:{HASH}", "bob is already on line 2"),
])
def test_malformed_line_names_file_and_line(path: Path, line: str, message: str) -> None:
    """A bad line is a UsersError naming the file and its line number."""
    path.write_text(f"# users\nbob:read-only:{HASH}\n\n{line}\n")
    with pytest.raises(UsersError) as info:
        make(path)
    assert str(info.value).startswith(f"{path}:4: ") and message in str(info.value)


def test_non_utf8_names_the_line(path: Path) -> None:
    """Bytes that are not UTF-8 are a UsersError naming their line."""
    path.write_bytes(f"bob:read-only:{HASH}\n#\xff\n".encode("latin-1"))
    with pytest.raises(UsersError, match="^" + re.escape(f"{path}:2: not UTF-8")):
        make(path)


def test_unreadable_file_gives_the_os_reason(tmp_path: Path) -> None:
    """A path that cannot be read is a UsersError with the OS's reason, for reading and writing."""
    with pytest.raises(UsersError, match="cannot read users file .*: Is a directory"):
        make(tmp_path)
    with pytest.raises(UsersError, match="cannot read users file .*: Not a directory"):
        make(Path(__file__) / "users")
    (tmp_path / "users.tmp" / "blocker").mkdir(parents=True)  # a tmp path that cannot be removed
    with pytest.raises(UsersError, match="cannot write users file .*: Is a directory"):
        make(tmp_path / "users").add("alice", "vm-admin", "pw")


def test_failed_change_leaves_memory_and_file_alone(users: UsersFile, path: Path) -> None:
    """A refused change writes nothing and keeps the loaded table."""
    users.add("alice", "vm-admin", "pw")
    before = path.read_bytes(), path.stat().st_ino
    with pytest.raises(UsersError):
        users.delete("bob")
    assert (path.read_bytes(), path.stat().st_ino) == before
    assert users.names() == ["alice"]


# -- another process's changes -------------------------------------------------------------


def test_reload_if_changed_sees_another_instances_write(users: UsersFile, path: Path) -> None:
    """reload_if_changed picks up adds, password changes and deletes made by another instance."""
    assert users.reload_if_changed() is False
    other = make(path)
    other.add("alice", "vm-admin", "one")
    assert users.reload_if_changed() is True
    assert users.verify("alice", "one") is not None
    assert users.reload_if_changed() is False
    other.set_password("alice", "two")  # same size: the new inode tells
    assert users.reload_if_changed() is True
    assert users.verify("alice", "two") is not None
    path.unlink()
    assert users.reload_if_changed() is True
    assert users.list() == []


def test_own_writes_do_not_count_as_changes(users: UsersFile) -> None:
    """After its own write an instance has nothing to reload."""
    users.add("alice", "vm-admin", "pw")
    assert users.reload_if_changed() is False


def test_change_does_not_lose_another_instances_write(users: UsersFile, path: Path) -> None:
    """A change re-reads the file first, so an unseen write by another instance is kept."""
    make(path).add("alice", "vm-admin", "pw")
    users.add("bob", "read-only", "pw")
    assert make(path).names() == ["alice", "bob"]


def test_reload_of_a_broken_file_keeps_the_old_table(users: UsersFile, path: Path) -> None:
    """When the changed file is malformed, reload raises and the previous users stay in use."""
    users.add("alice", "vm-admin", "pw")
    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(UsersError, match=":2: malformed"):
        users.reload_if_changed()
    assert users.verify("alice", "pw") == User("alice", "vm-admin")


def test_verify_from_many_threads_while_the_file_changes(users: UsersFile, path: Path) -> None:
    """Concurrent verify and reload_if_changed calls stay correct while another instance writes."""
    users.add("alice", "vm-admin", "pw")
    other = make(path)
    failures: list[object] = []

    def login() -> None:
        for _ in range(10):
            users.reload_if_changed()
            if users.verify("alice", "pw") != User("alice", "vm-admin"):
                failures.append("alice")

    threads = [threading.Thread(target=login) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(5):
        other.add(f"user{i}", "read-only", "pw")
    for t in threads:
        t.join()
    assert failures == []
    users.reload_if_changed()
    assert len(users.names()) == 6
    assert not os.path.exists(f"{path}.tmp")
