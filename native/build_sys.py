"""cffi (API mode) builder for `berth.native._sys`: the few kernel calls the stdlib lacks
(signalfd, tee, mount/umount2, openat2, malloc_trim), and the shim's relay threads (plain C: see
`berth_relay_start`).

API mode is used on purpose: the module is compiled at install time, so importing it costs
no cdef parsing and no pycparser at run time (about 5 MiB and 80 ms less per shim than
ABI mode, measured on this machine class).
"""

from cffi import FFI

ffibuilder = FFI()

ffibuilder.cdef(
    """
    typedef struct { ...; } sigset_t;

    struct signalfd_siginfo {
        uint32_t ssi_signo;
        int32_t  ssi_errno;
        int32_t  ssi_code;
        uint32_t ssi_pid;
        uint32_t ssi_uid;
        int32_t  ssi_fd;
        uint32_t ssi_tid;
        uint32_t ssi_band;
        uint32_t ssi_overrun;
        uint32_t ssi_trapno;
        int32_t  ssi_status;
        int32_t  ssi_int;
        uint64_t ssi_ptr;
        uint64_t ssi_utime;
        uint64_t ssi_stime;
        uint64_t ssi_addr;
        ...;
    };

    #define SFD_CLOEXEC ...
    #define SFD_NONBLOCK ...
    #define SPLICE_F_NONBLOCK ...

    #define MS_RDONLY ...
    #define MS_NOSUID ...
    #define MS_NODEV ...
    #define MS_NOEXEC ...
    #define MS_REMOUNT ...
    #define MS_BIND ...
    #define MS_REC ...
    #define MS_PRIVATE ...
    #define MS_SLAVE ...
    #define MS_NOATIME ...
    #define MS_RELATIME ...
    #define MS_STRICTATIME ...
    #define MNT_DETACH ...
    #define RESOLVE_NO_XDEV ...
    #define RESOLVE_NO_MAGICLINKS ...
    #define RESOLVE_NO_SYMLINKS ...
    #define RESOLVE_BENEATH ...
    #define RESOLVE_IN_ROOT ...

    int mount(const char *source, const char *target, const char *filesystemtype,
              unsigned long mountflags, const void *data);
    int umount2(const char *target, int flags);
    int berth_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                      uint64_t resolve);

    int sigemptyset(sigset_t *set);
    int sigaddset(sigset_t *set, int signum);
    int signalfd(int fd, const sigset_t *mask, int flags);
    ssize_t tee(int fd_in, int fd_out, size_t len, unsigned int flags);

    #define BERTH_RELAY_CHUNK ...
    int berth_relay_start(int source, int target);

    int malloc_trim(size_t pad);
    """
)

ffibuilder.set_source(
    "berth.native._sys",
    """
    #include <signal.h>
    #include <fcntl.h>
    #include <unistd.h>
    #include <malloc.h>
    #include <sys/mount.h>
    #include <sys/signalfd.h>
    #include <sys/syscall.h>
    #include <linux/openat2.h>
    #include <errno.h>
    #include <poll.h>
    #include <pthread.h>
    #include <stdint.h>

    static int berth_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode,
                             uint64_t resolve)
    {
        struct open_how how = { .flags = flags, .mode = mode, .resolve = resolve };
        return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    }

    /* A relay: copies `source` to `target` (blocking fds) until the source ends or
       fails, or the target's reader is gone (POLLERR on a pipe's write end), then
       closes both. Plain C on purpose: it never takes the GIL, so a relay a container
       holds in the kernel (relay.py says how) cannot stall the interpreter, and it
       costs its touched stack pages, not a Python thread state and frame stack. */
    #define BERTH_RELAY_CHUNK 16384
    #define BERTH_RELAY_STACK (64 * 1024)  /* the chunk and a few libc frames */

    struct berth_relay { int source; int target; };

    static int berth_relay_write_all(int fd, const char *data, size_t size)
    {
        while (size > 0) {
            ssize_t written = write(fd, data, size);
            if (written < 0) {
                if (errno == EINTR)
                    continue;
                return -1;  /* EPIPE (SIGPIPE stays blocked here): nobody reads; drop it */
            }
            data += written;
            size -= (size_t)written;
        }
        return 0;
    }

    /* The two fds travel in the thread's argument itself: a relay that called free()
       would make glibc give it a malloc arena of its own (measured: 4 KiB a thread). */
    static void *berth_relay_run(void *arg)
    {
        uint64_t packed = (uint64_t)(uintptr_t)arg;
        struct berth_relay relay = { .source = (int)(packed >> 32),
                                     .target = (int)(uint32_t)packed };
        char chunk[BERTH_RELAY_CHUNK];
        struct pollfd fds[2] = {
            { .fd = relay.source, .events = POLLIN },
            { .fd = relay.target, .events = 0 },  /* POLLERR, always reported */
        };
        for (;;) {
            /* poll takes no pipe mutex: a relay waits here, not inside read, until
               there is something to move. */
            if (poll(fds, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                break;
            }
            if (fds[1].revents)
                break;
            if (!fds[0].revents)
                continue;
            ssize_t got = read(relay.source, chunk, sizeof chunk);
            if (got < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (got <= 0)  /* EOF, or EIO and the like: the stream is over */
                break;
            if (berth_relay_write_all(relay.target, chunk, (size_t)got) < 0)
                break;
        }
        close(relay.source);
        close(relay.target);
        return NULL;
    }

    /* Start a detached relay thread that owns both fds; 0, or an errno (the fds are
       then still the caller's). The thread blocks every signal, so signals keep
       reaching the shim's main thread (its signalfd and Python's handlers). */
    static int berth_relay_start(int source, int target)
    {
        _Static_assert(sizeof(void *) >= sizeof(uint64_t), "two fds fit in a pointer");
        if (source < 0 || target < 0)
            return EBADF;
        void *relay = (void *)(uintptr_t)(((uint64_t)(uint32_t)source << 32)
                                          | (uint32_t)target);
        pthread_attr_t attr;
        int err = pthread_attr_init(&attr);
        if (err != 0)
            return err;
        size_t stack = BERTH_RELAY_STACK;
        long minimum = sysconf(_SC_THREAD_STACK_MIN);
        if (minimum > 0 && (size_t)minimum + BERTH_RELAY_CHUNK > stack)
            stack = (size_t)minimum + BERTH_RELAY_CHUNK;
        pthread_attr_setstacksize(&attr, stack);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        sigset_t every, previous;
        sigfillset(&every);
        pthread_sigmask(SIG_SETMASK, &every, &previous);
        pthread_t thread;
        err = pthread_create(&thread, &attr, berth_relay_run, relay);
        pthread_sigmask(SIG_SETMASK, &previous, NULL);
        pthread_attr_destroy(&attr);
        return err;
    }
    """,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
