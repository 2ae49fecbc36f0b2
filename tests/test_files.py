"""fastddpm.files: the one atomic writer, writable check and folder lock."""
import errno
import os
import stat
import subprocess
import sys

import pytest

from fastddpm import files


def test_write_atomic_replaces_whole_and_leaves_the_old_file_on_error(tmp_path):
    path = tmp_path / "sub" / "a.bin"
    files.write_atomic(path, b"old")
    assert path.read_bytes() == b"old"
    files.write_atomic(path, "n\u00e9w")
    assert path.read_text(encoding="utf-8") == "n\u00e9w"

    def half(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match="No space left"):
        files.write_atomic(path, half)
    assert path.read_text(encoding="utf-8") == "n\u00e9w"
    assert sorted(os.listdir(path.parent)) == ["a.bin"]  # the temp file is gone


def test_write_atomic_gives_new_files_the_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        files.write_atomic(tmp_path / "f", b"x")
        assert files.file_mode() == 0o640
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o640


def test_write_all_never_pairs_a_new_first_file_with_an_old_later_one(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.png"
    files.write_all([(a, b"a1"), (b, b"b1")])
    assert (a.read_bytes(), b.read_bytes()) == (b"a1", b"b1")

    def fail(f):
        raise OSError(errno.EIO, "boom")

    with pytest.raises(OSError, match="boom"):  # the second fails: nothing is replaced
        files.write_all([(a, b"a2"), (b, fail)])
    assert (a.read_bytes(), b.read_bytes()) == (b"a1", b"b1")
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.png"]

    real = os.replace
    calls = []

    def replace_then_die(src, dst):  # a kill after the first rename
        if calls:
            raise KeyboardInterrupt
        calls.append(dst)
        real(src, dst)

    os.replace = replace_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            files.write_all([(a, b"a3"), (b, b"b3")])
    finally:
        os.replace = real
    assert a.read_bytes() == b"a3" and not b.exists()  # never new a beside old b
    assert not [n for n in os.listdir(tmp_path) if files.is_temp(n)]


def test_atomic_folder_is_all_or_nothing(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with files.atomic_folder(dst) as tmp:
            (open(os.path.join(tmp, "x"), "w")).close()
            raise RuntimeError("half-way")
    assert os.listdir(tmp_path) == []
    dst.mkdir()  # an empty folder is replaced
    old = os.umask(0o022)
    try:
        with files.atomic_folder(dst) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            fd = os.open(os.path.join(tmp, "sub", "w"), os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"data")
            os.close(fd)
    finally:
        os.umask(old)
    assert (dst / "sub" / "w").read_bytes() == b"data"
    assert stat.S_IMODE(os.stat(dst / "sub" / "w").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(dst).st_mode) == 0o755
    assert os.listdir(tmp_path) == ["out"]


def test_check_writable_names_the_file_in_the_way_and_creates_nothing(tmp_path):
    (tmp_path / "f").write_text("x")
    for folder in (tmp_path / "f", tmp_path / "f" / "a" / "b"):
        with pytest.raises(NotADirectoryError) as e:
            files.check_writable(folder)
        assert e.value.filename == str(tmp_path / "f")
    files.check_writable(tmp_path / "new" / "deeper")
    assert sorted(os.listdir(tmp_path)) == ["f"]
    files.check_writable(tmp_path / "new" / "deeper", create=True)
    assert os.listdir(tmp_path / "new" / "deeper") == []


def test_check_writable_names_the_folder_it_could_not_write(tmp_path, monkeypatch):
    def denied(*a, **k):  # as a read-only folder answers anyone but root
        raise PermissionError(13, "Permission denied", os.path.join(k["dir"], ".write-test-x"))

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", denied)
    with pytest.raises(PermissionError) as e:
        files.check_writable(tmp_path / "run" / "sub")
    assert e.value.filename == str(tmp_path) and e.value.errno == 13


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_writable_refuses_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as e:
            files.check_writable(ro / "run")
        assert e.value.filename == str(ro)
    finally:
        ro.chmod(0o700)


def test_try_lock_is_held_by_one_process_and_released(tmp_path):
    lock = str(tmp_path / ".lock")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fastddpm import files; fd = files.try_lock(sys.argv[1]); "
         "print('held' if fd is not None else 'refused', flush=True); sys.stdin.read()", lock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert files.try_lock(lock) is None
    finally:
        holder.communicate("", timeout=30)
    fd = files.try_lock(lock)
    assert fd is not None
    files.release(fd, lock)  # removing the file: a process that opened it before cannot hold it
    assert not os.path.exists(lock)
