"""``xapid user …`` run as a real command line in a subprocess (and in-process for the TTY prompt)."""

from __future__ import annotations

import argparse
import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from xapid.cli import user as usercli
from xapid.auth.users import User, UsersFile

ROOT = Path(__file__).resolve().parent.parent
ENTRY = "import sys; from xapid.cli.user import main_for_tests; sys.exit(main_for_tests(sys.argv[1:]))"


def xapid(*args: str, stdin: bytes = b"", rounds: str | None = "4") -> subprocess.CompletedProcess[str]:
    """Run ``xapid ARGS`` with *stdin* piped in; text stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != usercli.ROUNDS_ENV}
    if rounds is not None:
        env[usercli.ROUNDS_ENV] = rounds
    proc = subprocess.run([sys.executable, "-c", ENTRY, *args], input=stdin, capture_output=True,
                          cwd=ROOT, env=env, timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def users_of(path: Path) -> UsersFile:
    users = UsersFile(path, rounds=4)
    users.load()
    return users


def assert_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    """Exit 2, nothing on stdout, and exactly one ``xapid: …`` line on stderr, no traceback."""
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("xapid: ") and message in lines[0], lines[0]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "users"


def add(path: Path, name: str = "alice", role: str = "vm-admin",
        password: bytes = b"pw\n") -> subprocess.CompletedProcess[str]:
    return xapid("user", "add", name, "--role", role, "--users", str(path), stdin=password)


def test_add_reads_one_line_without_its_ending(path: Path) -> None:
    """`user add` takes the password from a piped stdin, without the newline, and says what it did."""
    result = add(path, password=b"s3cret pass\n")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"added user alice (vm-admin) to {path}\n"
    users = users_of(path)
    assert users.verify("alice", "s3cret pass") == User("alice", "vm-admin")
    assert users.verify("alice", "s3cret pass\n") is None


def test_crlf_is_stripped(path: Path) -> None:
    """A CRLF line ending is not part of the password."""
    assert add(path, password=b"pw\r\n").returncode == 0
    users = users_of(path)
    assert users.verify("alice", "pw") is not None
    assert users.verify("alice", "pw\r") is None


def test_only_the_first_line_is_read(path: Path) -> None:
    """Only the first stdin line is the password; a last line without a newline works too."""
    assert add(path, password=b"first\nsecond\n").returncode == 0
    assert add(path, name="bob", password="unterminated é".encode()).returncode == 0
    users = users_of(path)
    assert users.verify("alice", "first") is not None
    assert users.verify("bob", "unterminated é") is not None


def test_created_with_mode_600_at_the_test_cost(tmp_path: Path) -> None:
    """A new users file (and its directory) is created 0600 (0700), hashed at XAPID_BCRYPT_ROUNDS."""
    path = tmp_path / "etc" / "users"
    assert add(path).returncode == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text().startswith("alice:vm-admin:$2b$04$")


def test_list_prints_name_and_role_sorted(path: Path) -> None:
    """`user list` prints NAME ROLE per user sorted by name; an absent file lists nobody."""
    assert xapid("user", "list", "--users", str(path)).stdout == ""
    for name, role in (("carol", "pool-admin"), ("alice", "vm-admin"), ("bob", "read-only")):
        assert add(path, name, role).returncode == 0
    result = xapid("user", "list", "--users", str(path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "alice vm-admin\nbob read-only\ncarol pool-admin\n"


def test_del(path: Path) -> None:
    """`user del` removes the user and confirms on stdout."""
    add(path)
    add(path, "bob")
    result = xapid("user", "del", "alice", "--users", str(path))
    assert (result.returncode, result.stdout) == (0, f"deleted user alice from {path}\n")
    assert users_of(path).names() == ["bob"]


def test_passwd(path: Path) -> None:
    """`user passwd` replaces the password from stdin and keeps the role."""
    add(path, password=b"old\n")
    result = xapid("user", "passwd", "alice", "--users", str(path), stdin=b"new\r\n")
    assert (result.returncode, result.stdout) == (0, f"changed the password of alice in {path}\n")
    users = users_of(path)
    assert users.verify("alice", "old") is None
    assert users.verify("alice", "new") == User("alice", "vm-admin")


def test_errors_are_one_line_and_exit_2(path: Path) -> None:
    """Every refused command exits 2 with one `xapid: …` line and leaves the file unchanged."""
    add(path)
    before = path.read_bytes()
    users = str(path)
    assert_error(add(path, "bob", "root"), "unknown role 'root' (expected one of: read-only,")
    assert_error(add(path, "bad name"), "invalid user name 'bad name'")
    assert_error(add(path), "user alice already exists")
    assert_error(add(path, "bob", password=b"\n"), "empty passwords are not allowed")
    assert_error(add(path, "bob", password=b""), "no password on standard input")
    assert_error(add(path, "bob", password=b"x" * 73 + b"\n"), "longer than 72 bytes")
    not_text = add(path, "bob", password=b"\xff\n")  # how it fails depends on stdin's error handler
    assert_error(not_text, "")
    assert "cannot read the password" in not_text.stderr or "valid Unicode text" in not_text.stderr
    assert_error(xapid("user", "del", "bob", "--users", users), f"no user bob in {path}")
    assert_error(xapid("user", "passwd", "bob", "--users", users, stdin=b"pw\n"), f"no user bob in {path}")
    assert path.read_bytes() == before


def test_bad_users_file_and_os_errors(tmp_path: Path) -> None:
    """A malformed users file names its line; an unreadable one gives the OS reason."""
    bad = tmp_path / "bad"
    bad.write_text("# users\nalice:vm-admin\n")
    for command in (["list"], ["del", "alice"], ["add", "bob", "--role", "read-only"]):
        assert_error(xapid("user", *command, "--users", str(bad), stdin=b"pw\n"), f"{bad}:2: malformed line")
    assert_error(xapid("user", "list", "--users", str(tmp_path)), f"cannot read users file {tmp_path}: Is a directory")


def test_bad_rounds_variable(path: Path) -> None:
    """A non-numeric or out-of-range XAPID_BCRYPT_ROUNDS is a one-line error."""
    assert_error(xapid("user", "list", "--users", str(path), rounds="fast"), "XAPID_BCRYPT_ROUNDS must be an integer")
    assert_error(xapid("user", "list", "--users", str(path), rounds="2"), "rounds must be 4-31")


def test_default_rounds_without_the_variable(path: Path) -> None:
    """Without XAPID_BCRYPT_ROUNDS new hashes use bcrypt cost 10."""
    assert xapid("user", "add", "alice", "--role", "read-only", "--users", str(path), stdin=b"pw\n",
                 rounds=None).returncode == 0
    assert ":$2b$10$" in path.read_text()


def test_default_users_file() -> None:
    """Without --users the command works on /etc/xapid/users."""
    parser = argparse.ArgumentParser()
    usercli.add_user_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["user", "list"])
    assert args.users is None and str(usercli.DEFAULT_USERS_FILE) == "/etc/xapid/users"


# -- a terminal: prompted twice -----------------------------------------------------------


def run_on_tty(path: Path, argv: list[str], typed: list[str],
               monkeypatch: pytest.MonkeyPatch) -> tuple[int, str, str, list[str]]:
    """Run in-process as if stdin were a terminal where the user types *typed* at the prompts."""
    prompts: list[str] = []

    def fake_getpass(prompt: str = "Password: ") -> str:
        prompts.append(prompt)
        return typed[len(prompts) - 1]

    monkeypatch.setattr(usercli.getpass, "getpass", fake_getpass)
    monkeypatch.setenv(usercli.ROUNDS_ENV, "4")
    parser = argparse.ArgumentParser()
    usercli.add_user_subparsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args([*argv, "--users", str(path)])
    stdout, stderr = io.StringIO(), io.StringIO()
    code = usercli.run_user_command(args, io.StringIO("not read\n"), stdout, stderr, isatty=True)
    return code, stdout.getvalue(), stderr.getvalue(), prompts


def test_tty_prompts_twice(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a terminal the password is asked for twice and stdin is not read as a line."""
    code, out, err, prompts = run_on_tty(path, ["user", "add", "alice", "--role", "vm-admin"],
                                         ["typed pw", "typed pw"], monkeypatch)
    assert (code, err, prompts) == (0, "", ["Password: ", "Retype password: "])
    assert users_of(path).verify("alice", "typed pw") is not None


def test_tty_mismatch_refused(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different passwords at the prompts are refused with exit 2 and nothing written."""
    code, out, err, _ = run_on_tty(path, ["user", "add", "alice", "--role", "vm-admin"], ["one", "two"], monkeypatch)
    assert (code, out, err) == (2, "", "xapid: the passwords do not match\n")
    assert not path.exists()


def test_tty_not_prompted_when_refused_anyway(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown role or user is reported before any password prompt."""
    code, _, err, prompts = run_on_tty(path, ["user", "add", "alice", "--role", "root"], [], monkeypatch)
    assert (code, prompts) == (2, []) and "unknown role" in err
    code, _, err, prompts = run_on_tty(path, ["user", "passwd", "alice"], [], monkeypatch)
    assert (code, prompts) == (2, []) and "no user alice" in err
