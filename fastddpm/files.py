"""Files written so that no reader sees half of one, and folders claimed by one process.

The one atomic writer (write_atomic, write_all: a temp file in the same folder,
flushed and fsync'd, renamed over the old file, the folder fsync'd; atomic_folder
for a whole folder), the permissions a new file gets (file_mode), the one "can I
write here" check (check_writable), the one folder lock (try_lock) and a stdout
that a closed reader cannot make fail (tolerate_closed_stdout). Callers
turn the OSErrors raised here into their own one-line messages. Imports nothing
of fastddpm, so any module may import it."""
import contextlib
import errno
import fcntl
import os
import secrets
import shutil
import sys
import tempfile

TMP = ".tmp-"  # every temp name starts so and ends with its final file's name


def file_mode(base=0o666):
    """The permissions open() gives a new file (base 0o666; 0o777 for a folder) less the umask."""
    umask = os.umask(0)  # read it: umask() only sets, returning the old value
    os.umask(umask)
    return base & ~umask


def is_temp(name, ends=("",)):
    """Whether file name `name` is a temp file of a write (killed half-way when found
    later) of a file whose name ends with one of `ends`."""
    return name.startswith(TMP) and name.endswith(tuple(ends))


def fsync_path(path):
    """fsync a file by name, or a folder (so that the renames in it survive a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _ClosedReaderTolerant:
    """sys.stdout whose reader may go away (`... | head`): the first EPIPE points the
    file descriptor at /dev/null, and that write and every later one are dropped."""

    def __init__(self, stream):
        self._stream = stream

    def _guard(self, op, *args):
        try:
            return op(*args)
        except BrokenPipeError:
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, self._stream.fileno())  # the interpreter's last flush goes there too
                os.close(null)
            except (OSError, ValueError):
                pass
            return None

    def write(self, text):
        self._guard(self._stream.write, text)
        return len(text)

    def flush(self):
        self._guard(self._stream.flush)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tolerate_closed_stdout():
    """Make sys.stdout drop what it cannot write once its reader is gone, instead of
    raising BrokenPipeError: a command's progress lines are information, and a
    closed pipe must not cost the samples or checkpoint it is writing. For
    `python -m` entry points (installs once)."""
    if not isinstance(sys.stdout, _ClosedReaderTolerant) and sys.stdout is not None:
        sys.stdout = _ClosedReaderTolerant(sys.stdout)


def write_atomic(path, content):
    """Write `path` so that it is always either its old file or the whole new one.
    content: bytes, a str (UTF-8), or write(f), a function writing to a binary file
    (whose name ends as path's does: PIL reads the format from it). On any error the
    temp file is removed, the old file left as it was, and the error raised."""
    write_all([(path, content)])


def write_all(items):
    """write_atomic for several files [(path, content)] as one: all are written to
    temp files first; only when all are complete are the later paths' old files
    removed and each temp renamed over its path in order, so a kill part-way never
    leaves a new first file beside an old later one (nor any half-written file)."""
    tmps = []
    try:
        for path, content in items:
            folder, name = os.path.split(os.path.abspath(os.fspath(path)))
            os.makedirs(folder, exist_ok=True)
            tmps.append(os.path.join(folder, f"{TMP}{os.getpid()}-{secrets.token_hex(4)}-{name}"))
            with open(tmps[-1], "xb") as f:  # "x": never another writer's temp; open() gives file_mode()
                if callable(content):
                    content(f)
                else:
                    f.write(content.encode() if isinstance(content, str) else content)
                f.flush()
                os.fsync(f.fileno())
        paths = [os.path.abspath(os.fspath(p)) for p, _ in items]
        for path in paths[1:]:
            if os.path.exists(path):
                os.unlink(path)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        for folder in dict.fromkeys(os.path.dirname(p) for p in paths):
            fsync_path(folder)
    except BaseException:  # a write error, or a signal
        for tmp in tmps:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(dst):
    """Yield a temp folder beside `dst` (absent, or an empty folder) to fill; when the
    block ends without error every file in it is fsync'd and given the permissions
    open() gives (folders file_mode(0o777)), and it is renamed to dst; on any error
    it is removed and the error raised."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=TMP + "export-", dir=parent)
    try:
        yield tmp
        for top, _, names in os.walk(tmp, topdown=False):
            for name in names:
                p = os.path.join(top, name)
                os.chmod(p, file_mode())  # mkstemp-style writers (safetensors) make files 0600
                fsync_path(p)
            os.chmod(top, file_mode(0o777))  # mkdtemp made it private; the folder is meant to be shared
            fsync_path(top)
        if os.path.isdir(dst):
            os.rmdir(dst)
        os.replace(tmp, dst)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_in_the_way(path):
    """The nearest existing path above `path` when it is a file rather than a folder
    (makedirs would only say "File exists"), else None."""
    parent = os.path.dirname(os.path.abspath(os.fspath(path)))
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    return None if os.path.isdir(parent) else parent


def check_writable(folder, create=False):
    """Raise an OSError unless files can be created in `folder`: NotADirectoryError
    (filename: the file) when it or a folder above it is a file, else the error of
    creating a file there, tried for real (permissions, a read-only mount, a full
    inode table): in `folder` itself, made first when `create`, or, when not (nothing
    is left behind), in the nearest folder above it that exists."""
    folder = os.path.abspath(os.fspath(folder))
    blocking = folder if os.path.exists(folder) and not os.path.isdir(folder) else file_in_the_way(folder)
    if blocking is not None:
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), blocking)
    if create:
        os.makedirs(folder, exist_ok=True)
    where = folder
    while not os.path.exists(where):
        where = os.path.dirname(where)
    try:
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as e:  # named by the folder, not the probe's temp name
        raise OSError(e.errno, e.strerror, where) from None


class LockError(OSError):
    """A lock file that opened but could not be locked for a reason other than another holder."""


def try_lock(path):
    """Open (creating) the lock file `path` and lock it, without waiting: its descriptor
    (the lock is held until os.close), or None when another process holds it.
    A POSIX lock (lockf, not flock): it dies with the process and is not inherited
    by forked children (data-loader workers), so a killed holder never keeps it.
    OSError when the file cannot be opened; LockError when it cannot be locked."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # a lock on a file its finishing holder just unlinked (release) guards nothing
        held = os.fstat(fd).st_ino == os.stat(path).st_ino
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.ENOENT):
            raise LockError(e.errno, e.strerror, path) from None
        return None
    if not held:
        os.close(fd)
        return None
    return fd


def release(fd, path=None):
    """Unlock lock descriptor `fd`; with `path`, remove the lock file first (still
    held, so no other process is using it)."""
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
    os.close(fd)
