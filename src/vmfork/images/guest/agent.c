/*
 * vmfork-agent: the guest side of vmfork's host<->guest protocol.
 *
 * Static C, no dependencies beyond libc (built with musl-gcc -static -Os).
 *
 * Frame: "VFK1" | type u8 | req_id u32 BE | length u32 BE | payload (<= 16 MiB).
 * All integers in payloads are big-endian.
 *
 * Host -> guest:
 *   P ping          payload echoed back in 'p'
 *   E exec          u32 timeout_ms | u32 argc | argc x (u32 len, bytes)
 *                   | u32 envc | envc x (u32 len, "K=V") | u32 cwd_len, cwd
 *                   | u32 stdin_len, stdin
 *                   replies: any number of 'O' (stdout) / 'R' (stderr) chunks,
 *                   then one 'X': i32 exit_code | u8 timed_out | u8 signaled | i32 signal
 *   U exec, interactive   the 'E' payload, then u32 flags (bit 0: tty) | u16 rows | u16 cols.
 *                   The command's stdin stays open: 'I' frames feed it, 'D' ends it.
 *                   With tty the command runs on a new PTY (its session's controlling
 *                   terminal, rows x cols, TERM=xterm unless env says otherwise): its
 *                   stdout and stderr both arrive as 'O', there is no 'R'.
 *                   Every byte of 'I' data written to the command is acknowledged:
 *                   'i' u32 count, with the exec's req_id (the host keeps at most
 *                   STDIN_MAX bytes unacknowledged; more is dropped).
 *   I stdin         u32 target req_id | bytes: more stdin for an interactive exec.
 *   D stdin EOF     u32 target req_id: close its stdin once what is queued is written
 *                   (on a tty: write the VEOF character, ^D, instead).
 *   Y resize        u32 target req_id | u16 rows | u16 cols: TIOCSWINSZ on its PTY
 *                   (the kernel sends SIGWINCH to the foreground process group).
 *   T set clock     i64 seconds | u32 nanoseconds -> 't'
 *   S sync          -> 's'
 *   H set hostname  the name's bytes (1..64, no NUL) -> 'h'  (sethostname(2), no process)
 *   Q power off     sync, reply 'q', then reboot(RB_POWER_OFF)
 *   K kill          u32 target req_id: SIGKILL the process group of the running
 *                   command started by exec 'target' on this connection; its 'X'
 *                   follows as usual (signaled, signal 9). No reply of its own:
 *                   an unknown or finished target is ignored (a normal race).
 *   W hold output   u32 target req_id: stop reading that command's stdout/stderr
 *                   (the host's reader is slow; the command blocks once its
 *                   pipes are full). No reply; unknown target ignored.
 *   G go on         u32 target req_id: read that command's output again (undoes W).
 *   anything else / malformed -> 'Z' with a UTF-8 message; the connection goes on.
 *
 * K, W, G, I, D and Y name their target in the payload, not in the frame's own req_id, so
 * that an older agent's 'Z' ("unknown request type") never reaches the target's
 * requester.
 *
 * Transport: the virtio-serial port named "agent" if the VM has a virtio
 * console device, else AF_VSOCK (port from vmfork.agent_port=N, default 52).
 *
 * One single-threaded poll() loop serves the transport and every running
 * command. The serial port is opened once and never reopened; EOF/POLLHUP on
 * it means "host disconnected": we wait 50 ms and look again. Every disconnect
 * starts a new "generation": output of commands started by an earlier
 * connection is read and dropped, never sent to a later host.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
#define VMADDR_CID_ANY 0xFFFFFFFFu

struct vfk_sockaddr_vm {
    sa_family_t svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) -
                           sizeof(unsigned short) - 2 * sizeof(unsigned int)];
};

extern char **environ;

#define MAGIC "VFK1"
#define HDR_LEN 13
#define MAX_PAYLOAD (16u << 20)
#define CHUNK 65536
#define OUT_HIGH_WATER (1u << 20)
#define MAX_JOBS 32
#define STDIN_MAX (1u << 20) /* queued stdin of an interactive exec (the host sends <= 256 KiB) */
#define TTY_GRACE_MS 200     /* a tty command exited: wait this long for its PTY's last output */
#define MAX_SINKS 128
#define HUP_RETRY_MS 50        /* host gone: look at the port again after this... */
#define HUP_RETRY_ASYNC_MS 250 /* ...or this, when SIGIO tells us about reconnects */
#define DEFAULT_PORT 52

struct buf {
    unsigned char *p;
    size_t len, cap;
};

struct job {
    int used;
    pid_t pid;
    uint32_t req_id;
    unsigned gen;
    int in_fd, out_fd, err_fd; /* tty: out_fd is the PTY master, in_fd a dup of it */
    struct buf inq;            /* stdin not written yet */
    size_t noack;              /* of which this many came with the request (not acknowledged) */
    int interactive;           /* 'U': stdin stays open until 'D' */
    int eof;                   /* no more stdin: close it once inq is written */
    int tty;
    int64_t reaped_at;         /* tty: when the command was reaped (monotonic ms) */
    int64_t deadline; /* monotonic ms, 0 = none */
    int timed_out;
    int reaped;
    int status;
    int held; /* 'W': output not read until 'G' */
};

static struct job jobs[MAX_JOBS];
static int sinks[MAX_SINKS]; /* pipes of finished commands whose background children still hold them */
static int nsinks;

static struct buf inbuf, outbuf;
static unsigned gen = 1;  /* connection generation */
static int serial_fd = -1; /* virtio-serial port (serial mode) */
static int listen_fd = -1; /* vsock listener (vsock mode) */
static int conn_fd = -1;   /* current vsock connection */
static int in_hup;         /* serial: host currently disconnected */
static int64_t port_resume; /* serial: do not poll the port before this time */
static int sig_pipe[2] = {-1, -1};
static int port_async;     /* serial: SIGIO is delivered on host (dis)connects */
static unsigned vsock_port = DEFAULT_PORT;
static int test_mode; /* --listen-unix: never touch the clock or power off the (host) machine */

/* ------------------------------------------------------------------ utils */

static void logmsg(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof line - 2)
        n = sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(2, "vmfork-agent: ", 14);
    w = write(2, line, (size_t)n);
    (void)w;
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
    }
}

static void put_u32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

static uint32_t get_u32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int buf_reserve(struct buf *b, size_t extra) {
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 65536;
    while (cap < b->len + extra)
        cap *= 2;
    unsigned char *p = realloc(b->p, cap);
    if (!p)
        return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static void buf_consume(struct buf *b, size_t n) {
    if (n >= b->len) {
        b->len = 0;
    } else {
        memmove(b->p, b->p + n, b->len - n);
        b->len -= n;
    }
    /* give back memory after a huge frame */
    if (b->len == 0 && b->cap > (4u << 20)) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static int hup_retry_ms(void) { return port_async ? HUP_RETRY_ASYNC_MS : HUP_RETRY_MS; }

static int connected(void) {
    if (serial_fd >= 0)
        return !in_hup;
    return conn_fd >= 0;
}

/* Start a new generation: drop everything belonging to the old connection. */
static void disconnect(const char *why) {
    (void)why;
    gen++;
    inbuf.len = 0;
    outbuf.len = 0;
    if (conn_fd >= 0) {
        close(conn_fd);
        conn_fd = -1;
    }
}

/* ---------------------------------------------------------------- output */

static void send_frame(char type, uint32_t req_id, const void *payload, size_t len) {
    if (!connected())
        return;
    if (buf_reserve(&outbuf, HDR_LEN + len) < 0) {
        logmsg("out of memory for a %zu byte reply; dropped", len);
        return;
    }
    unsigned char *h = outbuf.p + outbuf.len;
    memcpy(h, MAGIC, 4);
    h[4] = (unsigned char)type;
    put_u32(h + 5, req_id);
    put_u32(h + 9, (uint32_t)len);
    if (len)
        memcpy(h + HDR_LEN, payload, len);
    outbuf.len += HDR_LEN + len;
}

static void send_error(uint32_t req_id, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    send_frame('Z', req_id, msg, (size_t)n);
}

static int transport_fd(void) { return serial_fd >= 0 ? serial_fd : conn_fd; }

/* Write as much of outbuf as the transport takes now. */
static void flush_out(void) {
    int fd = transport_fd();
    if (fd < 0 || !connected()) {
        outbuf.len = 0;
        return;
    }
    size_t off = 0;
    while (off < outbuf.len) {
        ssize_t n;
        if (fd == conn_fd)
            n = send(fd, outbuf.p + off, outbuf.len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        else
            n = write(fd, outbuf.p + off, outbuf.len - off);
        if (n > 0) {
            off += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        /* EPIPE, ENODEV, ECONNRESET...: abort this reply, the host is gone */
        if (serial_fd >= 0) {
            in_hup = 1;
            port_resume = now_ms() + hup_retry_ms();
        }
        disconnect("write error");
        return;
    }
    buf_consume(&outbuf, off);
}

/* Block (bounded) until outbuf is written; used before power-off. */
static void flush_out_blocking(int timeout_ms) {
    int64_t end = now_ms() + timeout_ms;
    while (outbuf.len && connected()) {
        int left = (int)(end - now_ms());
        if (left <= 0)
            break;
        struct pollfd p = {transport_fd(), POLLOUT, 0};
        if (poll(&p, 1, left) > 0) {
            if (p.revents & (POLLHUP | POLLERR))
                break;
            flush_out();
        }
    }
}

/* ------------------------------------------------------------------ jobs */

static void close_fd(int *fd) {
    if (*fd >= 0) {
        close(*fd);
        *fd = -1;
    }
}

static void add_sink(int fd) {
    if (fd < 0)
        return;
    if (nsinks == MAX_SINKS) {
        close(sinks[0]);
        memmove(sinks, sinks + 1, sizeof(int) * (MAX_SINKS - 1));
        nsinks--;
    }
    sinks[nsinks++] = fd;
}

/* Read one chunk from a command's stdout/stderr. Returns 0 on EOF/error (fd closed). */
static int relay_chunk(struct job *j, int *fd, char type) {
    static unsigned char chunk[CHUNK];
    ssize_t n = read(*fd, chunk, sizeof chunk);
    if (n > 0) {
        if (j->gen == gen)
            send_frame(type, j->req_id, chunk, (size_t)n);
        return 1;
    }
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 1;
    close_fd(fd);
    return 0;
}

/* Read what is buffered in a pipe right now (bounded). */
static void drain_now(struct job *j, int *fd, char type) {
    static unsigned char chunk[CHUNK];
    for (int round = 0; round < 64 && *fd >= 0; round++) {
        ssize_t n = read(*fd, chunk, sizeof chunk);
        if (n > 0) {
            if (j->gen == gen)
                send_frame(type, j->req_id, chunk, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n == 0 || errno != EAGAIN)
            close_fd(fd);
        return;
    }
}

static void finish_job(struct job *j) {
    /* The command has exited: all it wrote is in the pipes now. */
    drain_now(j, &j->out_fd, 'O');
    drain_now(j, &j->err_fd, 'R');
    int code, signaled = 0, sig = 0;
    if (WIFEXITED(j->status)) {
        code = WEXITSTATUS(j->status);
    } else if (WIFSIGNALED(j->status)) {
        sig = WTERMSIG(j->status);
        signaled = 1;
        code = 128 + sig;
    } else {
        code = 255;
    }
    if (j->timed_out)
        code = 124;
    unsigned char x[10];
    put_u32(x, (uint32_t)code);
    x[4] = (unsigned char)(j->timed_out != 0);
    x[5] = (unsigned char)signaled;
    put_u32(x + 6, (uint32_t)sig);
    if (j->gen == gen)
        send_frame('X', j->req_id, x, sizeof x);
    /* Background children may still hold the pipes: keep draining them so
     * they do not die of SIGPIPE, but drop what they write. */
    add_sink(j->out_fd);
    add_sink(j->err_fd);
    close_fd(&j->in_fd);
    free(j->inq.p);
    memset(j, 0, sizeof *j);
    j->in_fd = j->out_fd = j->err_fd = -1;
}

static void reap_children(void) {
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, WNOHANG);
        if (pid <= 0)
            return;
        for (int i = 0; i < MAX_JOBS; i++) {
            if (jobs[i].used && jobs[i].pid == pid) {
                jobs[i].reaped = 1;
                jobs[i].reaped_at = now_ms();
                jobs[i].status = status;
            }
        }
    }
}

static void on_signal(int sig) {
    int saved = errno;
    ssize_t w = write(sig_pipe[1], sig == SIGIO ? "i" : "c", 1);
    (void)w;
    errno = saved;
}

struct reader {
    const unsigned char *p;
    size_t len, off;
    int bad;
};

static uint32_t rd_u32(struct reader *r) {
    if (r->bad || r->len - r->off < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = get_u32(r->p + r->off);
    r->off += 4;
    return v;
}

/* Returns a malloc'd NUL-terminated copy, or NULL (r->bad set) on error. */
static char *rd_str(struct reader *r, const char *what, uint32_t req_id) {
    uint32_t n = rd_u32(r);
    if (r->bad || r->len - r->off < n) {
        r->bad = 1;
        return NULL;
    }
    if (memchr(r->p + r->off, 0, n)) {
        send_error(req_id, "exec: %s contains a NUL byte", what);
        r->bad = 2;
        return NULL;
    }
    char *s = malloc((size_t)n + 1);
    if (!s) {
        r->bad = 1;
        return NULL;
    }
    memcpy(s, r->p + r->off, n);
    s[n] = 0;
    r->off += n;
    return s;
}

static void free_strv(char **v, size_t n) {
    if (!v)
        return;
    for (size_t i = 0; i < n; i++)
        free(v[i]);
    free(v);
}

static const char *default_env[] = {
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "USER=root",
    "LOGNAME=root",
    "SHELL=/bin/sh",
};
#define N_DEFAULT_ENV (sizeof default_env / sizeof default_env[0])

static void child_exec(char **argv, char **envp, const char *cwd, int in_r, int out_w, int err_w,
                       const char *pts) {
    setsid();
    if (pts) {
        /* a session leader without a terminal: opening the PTY makes it the controlling one */
        int t = open(pts, O_RDWR);
        if (t < 0)
            _exit(127);
        ioctl(t, TIOCSCTTY, 0);
        in_r = out_w = err_w = t;
    }
    if (dup2(in_r, 0) < 0 || dup2(out_w, 1) < 0 || dup2(err_w, 2) < 0)
        _exit(127);
    if (pts && in_r > 2)
        close(in_r);
    /* every other descriptor of the agent is O_CLOEXEC */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; s++)
        sigaction(s, &sa, NULL);
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t w = write(fd, "0", 1);
        (void)w;
        close(fd);
    }
    umask(022);
    if (chdir(cwd) < 0) {
        dprintf(2, "vmfork-agent: cannot change directory to %s: %s\n", cwd, strerror(errno));
        _exit(127);
    }
    environ = envp;
    execvp(argv[0], argv);
    dprintf(2, "vmfork-agent: cannot execute %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

static void start_exec(uint32_t req_id, const unsigned char *p, size_t len, int interactive) {
    uint32_t flags = 0;
    unsigned rows = 0, cols = 0;
    if (interactive) {
        if (len < 8) {
            send_error(req_id, "exec: malformed payload (interactive options)");
            return;
        }
        len -= 8;
        flags = get_u32(p + len);
        rows = ((unsigned)p[len + 4] << 8) | p[len + 5];
        cols = ((unsigned)p[len + 6] << 8) | p[len + 7];
    }
    int tty = (flags & 1) != 0;
    struct reader r = {p, len, 0, 0};
    int master = -1;
    char **argv = NULL, **envp = NULL, *cwd = NULL;
    size_t argc = 0, nenv = 0;
    struct job *j = NULL;
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};

    uint32_t timeout_ms = rd_u32(&r);
    uint32_t n_arg = rd_u32(&r);
    if (r.bad || n_arg == 0 || n_arg > (len - r.off) / 4) {
        send_error(req_id, n_arg == 0 && !r.bad ? "exec: empty argv" : "exec: malformed payload (argv)");
        return;
    }
    argv = calloc((size_t)n_arg + 1, sizeof(char *));
    if (!argv)
        goto nomem;
    for (; argc < n_arg; argc++) {
        argv[argc] = rd_str(&r, "an argument", req_id);
        if (!argv[argc])
            goto bad;
    }
    uint32_t n_env = rd_u32(&r);
    if (r.bad || n_env > (len - r.off) / 4)
        goto bad;
    envp = calloc(N_DEFAULT_ENV + 1 + n_env + 1, sizeof(char *));
    if (!envp)
        goto nomem;
    for (; nenv < N_DEFAULT_ENV; nenv++) {
        envp[nenv] = strdup(default_env[nenv]);
        if (!envp[nenv])
            goto nomem;
    }
    if (tty) {
        envp[nenv] = strdup("TERM=xterm");
        if (!envp[nenv])
            goto nomem;
        nenv++;
    }
    for (uint32_t i = 0; i < n_env; i++) {
        char *kv = rd_str(&r, "an environment entry", req_id);
        if (!kv)
            goto bad;
        char *eq = strchr(kv, '=');
        if (!eq || eq == kv) {
            send_error(req_id, "exec: environment entry without NAME=: '%.100s'", kv);
            free(kv);
            r.bad = 2;
            goto bad;
        }
        size_t klen = (size_t)(eq - kv) + 1;
        size_t k;
        for (k = 0; k < nenv; k++)
            if (strncmp(envp[k], kv, klen) == 0)
                break;
        if (k < nenv) {
            free(envp[k]);
            envp[k] = kv;
        } else {
            envp[nenv++] = kv;
        }
    }
    cwd = rd_str(&r, "the working directory", req_id);
    if (!cwd)
        goto bad;
    uint32_t in_len = rd_u32(&r);
    if (r.bad || len - r.off != in_len)
        goto bad;

    for (int i = 0; i < MAX_JOBS; i++) {
        if (!jobs[i].used) {
            j = &jobs[i];
            break;
        }
    }
    if (!j) {
        send_error(req_id, "exec: too many commands running (%d)", MAX_JOBS);
        goto out;
    }
    const char *pts = NULL;
    if (tty) {
        struct winsize wsz = {(unsigned short)(rows ? rows : 24), (unsigned short)(cols ? cols : 80), 0, 0};
        master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0 || !(pts = ptsname(master)) ||
            ioctl(master, TIOCSWINSZ, &wsz) < 0) {
            send_error(req_id, "exec: cannot open a pseudo-terminal: %s", strerror(errno));
            goto out;
        }
        pin[1] = fcntl(master, F_DUPFD_CLOEXEC, 3);
        if (pin[1] < 0) {
            send_error(req_id, "exec: dup: %s", strerror(errno));
            goto out;
        }
        pout[0] = master;
        master = -1;
    } else if (pipe2(pin, O_CLOEXEC) < 0 || pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0) {
        send_error(req_id, "exec: pipe: %s", strerror(errno));
        goto out;
    }
    struct buf q = {NULL, 0, 0};
    if (in_len) {
        if (buf_reserve(&q, in_len) < 0)
            goto nomem;
        memcpy(q.p, r.p + r.off, in_len);
        q.len = in_len;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_error(req_id, "exec: fork: %s", strerror(errno));
        free(q.p);
        goto out;
    }
    if (pid == 0)
        child_exec(argv, envp, cwd[0] ? cwd : "/root", pin[0], pout[1], perr[1], pts);
    close_fd(&pin[0]);
    close_fd(&pout[1]);
    close_fd(&perr[1]);
    memset(j, 0, sizeof *j);
    j->used = 1;
    j->pid = pid;
    j->req_id = req_id;
    j->gen = gen;
    j->in_fd = pin[1];
    j->out_fd = pout[0];
    j->err_fd = perr[0];
    set_nonblock(j->in_fd);
    set_nonblock(j->out_fd);
    if (j->err_fd >= 0)
        set_nonblock(j->err_fd);
    j->inq = q;
    j->noack = in_len;
    j->interactive = interactive;
    j->tty = tty;
    j->eof = !interactive;
    if (!in_len && j->eof)
        close_fd(&j->in_fd);
    j->deadline = timeout_ms ? now_ms() + timeout_ms : 0;
    pin[0] = pin[1] = pout[0] = pout[1] = perr[0] = perr[1] = -1;
    goto out;

nomem:
    send_error(req_id, "exec: out of memory");
    goto out;
bad:
    if (r.bad != 2)
        send_error(req_id, "exec: malformed payload");
out:
    close_fd(&master);
    for (int i = 0; i < 2; i++) {
        close_fd(&pin[i]);
        close_fd(&pout[i]);
        close_fd(&perr[i]);
    }
    free_strv(argv, argc);
    free_strv(envp, nenv);
    free(cwd);
}

/* Tell the host that n more bytes of its 'I' data are done with (written or dropped). */
static void ack_stdin(struct job *j, size_t n) {
    size_t skip = n < j->noack ? n : j->noack;
    j->noack -= skip;
    n -= skip;
    if (n && j->interactive && j->gen == gen) {
        unsigned char a[4];
        put_u32(a, (uint32_t)n);
        send_frame('i', j->req_id, a, sizeof a);
    }
}

/* Does the job's stdin want POLLOUT now? */
static int stdin_pending(const struct job *j) { return j->in_fd >= 0 && (j->inq.len || j->eof); }

static void feed_stdin(struct job *j) {
    size_t done = 0;
    while (done < j->inq.len) {
        ssize_t n = write(j->in_fd, j->inq.p + done, j->inq.len - done);
        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        /* EPIPE: the command does not read its stdin; what it would have got is dropped */
        done = j->inq.len;
        close_fd(&j->in_fd);
        break;
    }
    if (done) {
        buf_consume(&j->inq, done);
        ack_stdin(j, done);
    }
    if (j->in_fd >= 0 && !j->inq.len && j->eof) {
        if (j->tty) {
            /* a PTY has no end of file: the line discipline's VEOF (^D) is one */
            struct termios t;
            unsigned char c = 4;
            if (tcgetattr(j->in_fd, &t) == 0 && t.c_cc[VEOF])
                c = t.c_cc[VEOF];
            ssize_t n = write(j->in_fd, &c, 1);
            if (n < 0 && (errno == EAGAIN || errno == EINTR))
                return;
            j->eof = 0; /* sent: the descriptor stays (it is the PTY's, for resizes) */
        } else {
            close_fd(&j->in_fd);
        }
    }
}

/* 'I' data for job j (or its EOF with data NULL). */
static void queue_stdin(struct job *j, const unsigned char *data, size_t len) {
    if (!data) {
        if (j->interactive)
            j->eof = 1;
        return;
    }
    if (j->in_fd < 0 || j->eof || j->inq.len + len > STDIN_MAX) {
        if (j->in_fd >= 0 && !j->eof)
            logmsg("stdin of a command over %u bytes queued: %zu bytes dropped", STDIN_MAX, len);
        ack_stdin(j, len); /* dropped: the host must not wait for room */
        return;
    }
    if (buf_reserve(&j->inq, len) < 0) {
        logmsg("out of memory for %zu bytes of stdin; dropped", len);
        ack_stdin(j, len);
        return;
    }
    memcpy(j->inq.p + j->inq.len, data, len);
    j->inq.len += len;
}

/* -------------------------------------------------------------- requests */

/* The running command that exec 'req_id' of the current connection started. */
static struct job *find_job(uint32_t req_id) {
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && !jobs[i].reaped && jobs[i].gen == gen && jobs[i].req_id == req_id)
            return &jobs[i];
    return NULL;
}

static void do_poweroff(uint32_t req_id) {
    sync();
    send_frame('q', req_id, NULL, 0);
    flush_out_blocking(1000);
    if (test_mode) {
        logmsg("test mode: exiting instead of powering off");
        exit(0);
    }
    logmsg("powering off");
    sync();
    reboot(RB_POWER_OFF);
    logmsg("reboot(RB_POWER_OFF): %s", strerror(errno));
}

static void dispatch(unsigned char type, uint32_t req_id, const unsigned char *p, size_t len) {
    switch (type) {
    case 'P':
        send_frame('p', req_id, p, len);
        break;
    case 'E':
    case 'U':
        start_exec(req_id, p, len, type == 'U');
        break;
    case 'I':
    case 'D':
    case 'Y': {
        size_t want = type == 'I' ? 4 : type == 'D' ? 4 : 8;
        if (type == 'I' ? len < want : len != want) {
            send_error(req_id, "'%c': malformed payload (%zu bytes)", type, len);
            break;
        }
        struct job *j = find_job(get_u32(p));
        if (!j)
            break; /* finished already: a normal race */
        if (type == 'I') {
            queue_stdin(j, p + 4, len - 4);
        } else if (type == 'D') {
            queue_stdin(j, NULL, 0);
        } else if (j->tty) {
            struct winsize wsz = {(unsigned short)(((unsigned)p[4] << 8) | p[5]),
                                  (unsigned short)(((unsigned)p[6] << 8) | p[7]), 0, 0};
            int fd = j->in_fd >= 0 ? j->in_fd : j->out_fd;
            if (fd >= 0)
                ioctl(fd, TIOCSWINSZ, &wsz);
        }
        break;
    }
    case 'T': {
        if (len != 12) {
            send_error(req_id, "set-time: payload must be 12 bytes, got %zu", len);
            break;
        }
        int64_t sec = (int64_t)(((uint64_t)get_u32(p) << 32) | get_u32(p + 4));
        uint32_t nsec = get_u32(p + 8);
        if (nsec >= 1000000000u) {
            send_error(req_id, "set-time: nanoseconds out of range");
            break;
        }
        struct timespec ts = {(time_t)sec, (long)nsec};
        if (test_mode)
            send_frame('t', req_id, NULL, 0);
        else if (clock_settime(CLOCK_REALTIME, &ts) < 0)
            send_error(req_id, "set-time: %s", strerror(errno));
        else
            send_frame('t', req_id, NULL, 0);
        break;
    }
    case 'S':
        sync();
        send_frame('s', req_id, NULL, 0);
        break;
    case 'H':
        if (len == 0 || len > 64 || memchr(p, 0, len) != NULL)
            send_error(req_id, "set-hostname: the name must be 1 to 64 bytes without NUL, got %zu", len);
        else if (test_mode)
            send_frame('h', req_id, NULL, 0);
        else if (sethostname((const char *)p, len) < 0)
            send_error(req_id, "set-hostname: %s", strerror(errno));
        else
            send_frame('h', req_id, NULL, 0);
        break;
    case 'Q':
        do_poweroff(req_id);
        break;
    case 'K':
    case 'W':
    case 'G': {
        if (len != 4) {
            send_error(req_id, "'%c': payload must be a 4-byte request id, got %zu bytes", type, len);
            break;
        }
        struct job *j = find_job(get_u32(p));
        if (!j)
            break;
        if (type == 'K') {
            kill(-j->pid, SIGKILL);
            kill(j->pid, SIGKILL);
            j->held = 0; /* drain what it wrote, so it is not stuck on a full pipe */
        } else {
            j->held = type == 'W';
        }
        break;
    }
    default:
        if (type >= 0x20 && type < 0x7f)
            send_error(req_id, "unknown request type '%c'", type);
        else
            send_error(req_id, "unknown request type 0x%02x", type);
    }
}

static void parse_input(void) {
    while (inbuf.len >= 4) {
        if (memcmp(inbuf.p, MAGIC, 4) != 0) {
            /* resynchronise: skip to the next magic (keep a possible partial one) */
            size_t i;
            for (i = 1; i + 4 <= inbuf.len; i++)
                if (memcmp(inbuf.p + i, MAGIC, 4) == 0)
                    break;
            if (i + 4 > inbuf.len)
                i = inbuf.len > 3 ? inbuf.len - 3 : 0;
            buf_consume(&inbuf, i);
            continue;
        }
        if (inbuf.len < HDR_LEN)
            return;
        unsigned char type = inbuf.p[4];
        uint32_t req_id = get_u32(inbuf.p + 5);
        uint32_t len = get_u32(inbuf.p + 9);
        if (len > MAX_PAYLOAD) {
            send_error(req_id, "frame too large (%u bytes, max %u)", len, MAX_PAYLOAD);
            buf_consume(&inbuf, 4);
            continue;
        }
        if (inbuf.len < HDR_LEN + (size_t)len) {
            if (buf_reserve(&inbuf, HDR_LEN + (size_t)len - inbuf.len) < 0) {
                send_error(req_id, "out of memory for a %u byte frame", len);
                buf_consume(&inbuf, 4);
                continue;
            }
            return;
        }
        dispatch(type, req_id, inbuf.p + HDR_LEN, len);
        if (inbuf.len >= HDR_LEN + (size_t)len) /* a disconnect in dispatch empties inbuf */
            buf_consume(&inbuf, HDR_LEN + (size_t)len);
    }
}

/* Read from the transport. Returns 0 when the host is gone (EOF/error). */
static int read_transport(int fd) {
    for (int rounds = 0; rounds < 16; rounds++) {
        if (buf_reserve(&inbuf, CHUNK) < 0)
            return 1;
        ssize_t n = read(fd, inbuf.p + inbuf.len, inbuf.cap - inbuf.len);
        if (n > 0) {
            inbuf.len += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EINTR))
            return 1;
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------- transport */

static int read_file(const char *path, char *out, size_t cap) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, out, cap - 1);
    close(fd);
    if (n < 0)
        return -1;
    out[n] = 0;
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == ' '))
        out[--n] = 0;
    return (int)n;
}

/* Is there a virtio console (virtio-serial) device at all? */
static int have_virtio_console(void) {
    DIR *d = opendir("/sys/bus/virtio/devices");
    if (!d)
        return 0;
    struct dirent *e;
    int found = 0;
    char path[512], val[64];
    while ((e = readdir(d)) && !found) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/bus/virtio/devices/%s/device", e->d_name);
        if (read_file(path, val, sizeof val) > 0 && strtoul(val, NULL, 0) == 3)
            found = 1;
    }
    closedir(d);
    return found;
}

/* Find /dev/vportNpM whose name is "agent". */
static int find_agent_port(char *dev, size_t cap) {
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d)
        return 0;
    struct dirent *e;
    int found = 0;
    char path[512], name[128];
    while ((e = readdir(d)) && !found) {
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        if (read_file(path, name, sizeof name) > 0 && strcmp(name, "agent") == 0) {
            snprintf(dev, cap, "/dev/%s", e->d_name);
            found = 1;
        }
    }
    closedir(d);
    return found;
}

static unsigned cmdline_port(void) {
    char cmd[4096];
    if (read_file("/proc/cmdline", cmd, sizeof cmd) < 0)
        return DEFAULT_PORT;
    for (char *tok = strtok(cmd, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
        if (strncmp(tok, "vmfork.agent_port=", 18) == 0) {
            unsigned long v = strtoul(tok + 18, NULL, 10);
            if (v > 0 && v < 0xFFFFFFFFul)
                return (unsigned)v;
        }
    }
    return DEFAULT_PORT;
}

static int open_vsock_listener(unsigned port) {
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct vfk_sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_port = port;
    a.svm_cid = VMADDR_CID_ANY;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 8) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* Test mode: serve on a unix socket instead (exercises everything but the VM). */
static int open_unix_listener(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_un a;
    memset(&a, 0, sizeof a);
    a.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof a.sun_path) {
        close(fd);
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(a.sun_path, path);
    unlink(path);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 8) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static void setup_transport(void) {
    char dev[300];
    if (have_virtio_console()) {
        /* the port's name arrives asynchronously after the device: wait for it */
        int64_t end = now_ms() + 10000;
        while (now_ms() < end) {
            if (find_agent_port(dev, sizeof dev)) {
                for (;;) {
                    serial_fd = open(dev, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
                    if (serial_fd >= 0)
                        break;
                    logmsg("open %s: %s (retrying)", dev, strerror(errno));
                    sleep_ms(1000);
                }
                /* virtio_console signals host connect/disconnect with SIGIO */
                int fl = fcntl(serial_fd, F_GETFL);
                port_async = fcntl(serial_fd, F_SETOWN, getpid()) == 0 && fl >= 0 &&
                             fcntl(serial_fd, F_SETFL, fl | O_ASYNC) == 0;
                logmsg("serving on virtio-serial port %s", dev);
                return;
            }
            sleep_ms(10);
        }
        logmsg("virtio console present but no port named 'agent'; trying vsock");
    }
    vsock_port = cmdline_port();
    for (int attempt = 0;; attempt++) {
        listen_fd = open_vsock_listener(vsock_port);
        if (listen_fd >= 0)
            break;
        if (attempt == 0)
            logmsg("vsock listen on port %u: %s (retrying)", vsock_port, strerror(errno));
        sleep_ms(attempt < 50 ? 20 : 1000);
    }
    logmsg("serving on vsock port %u", vsock_port);
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    /* make sure 0, 1, 2 are open so that no pipe ends up there */
    int fd;
    while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2) {
    }
    if (fd > 2)
        close(fd);
    fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t w = write(fd, "-1000", 5);
        (void)w;
        close(fd);
    }
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe: %s", strerror(errno));
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);
    sigaction(SIGIO, &sa, NULL);
    for (int i = 0; i < MAX_JOBS; i++)
        jobs[i].in_fd = jobs[i].out_fd = jobs[i].err_fd = -1;

    if (argc == 3 && strcmp(argv[1], "--listen-unix") == 0) {
        test_mode = 1;
        listen_fd = open_unix_listener(argv[2]);
        if (listen_fd < 0) {
            logmsg("listen on %s: %s", argv[2], strerror(errno));
            return 1;
        }
    } else if (argc != 1) {
        logmsg("usage: vmfork-agent [--listen-unix PATH]");
        return 2;
    } else {
        setup_transport();
    }

    enum { K_SIG, K_PORT, K_LISTEN, K_CONN, K_IN, K_OUT, K_ERR, K_SINK };
    struct pollfd pfd[4 + 3 * MAX_JOBS + MAX_SINKS];
    int kind[4 + 3 * MAX_JOBS + MAX_SINKS];
    int owner[4 + 3 * MAX_JOBS + MAX_SINKS];

    for (;;) {
        int64_t now = now_ms();
        int np = 0, timeout = -1;

        /* finished commands and expired timeouts */
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            if (j->reaped) {
                /* a PTY's last output may reach the master a moment after the exit */
                int64_t grace = j->reaped_at + TTY_GRACE_MS - now;
                if (!j->tty || j->out_fd < 0 || grace <= 0) {
                    finish_job(j);
                    continue;
                }
                if (timeout < 0 || grace < timeout)
                    timeout = (int)grace;
            }
            if (!j->reaped && j->deadline && now >= j->deadline) {
                kill(-j->pid, SIGKILL);
                kill(j->pid, SIGKILL);
                j->timed_out = 1;
                j->deadline = 0;
            }
            if (j->deadline) {
                int64_t left = j->deadline - now;
                if (left > 60000)
                    left = 60000;
                if (timeout < 0 || left < timeout)
                    timeout = (int)left;
            }
        }
        if (outbuf.len)
            flush_out();

        pfd[np] = (struct pollfd){sig_pipe[0], POLLIN, 0};
        kind[np++] = K_SIG;
        if (serial_fd >= 0) {
            if (now >= port_resume) {
                pfd[np] = (struct pollfd){serial_fd, POLLIN | (outbuf.len ? POLLOUT : 0), 0};
                kind[np++] = K_PORT;
            } else {
                int left = (int)(port_resume - now);
                if (timeout < 0 || left < timeout)
                    timeout = left;
            }
        }
        if (listen_fd >= 0) {
            pfd[np] = (struct pollfd){listen_fd, POLLIN, 0};
            kind[np++] = K_LISTEN;
        }
        if (conn_fd >= 0) {
            pfd[np] = (struct pollfd){conn_fd, POLLIN | (outbuf.len ? POLLOUT : 0), 0};
            kind[np++] = K_CONN;
        }
        int room = outbuf.len < OUT_HIGH_WATER;
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            int dropping = j->gen != gen;
            int readable = dropping || (room && !j->held);
            if (stdin_pending(j) && !j->reaped) {
                pfd[np] = (struct pollfd){j->in_fd, POLLOUT, 0};
                owner[np] = i;
                kind[np++] = K_IN;
            }
            if (j->out_fd >= 0 && readable) {
                pfd[np] = (struct pollfd){j->out_fd, POLLIN, 0};
                owner[np] = i;
                kind[np++] = K_OUT;
            }
            if (j->err_fd >= 0 && readable) {
                pfd[np] = (struct pollfd){j->err_fd, POLLIN, 0};
                owner[np] = i;
                kind[np++] = K_ERR;
            }
        }
        for (int i = 0; i < nsinks; i++) {
            pfd[np] = (struct pollfd){sinks[i], POLLIN, 0};
            owner[np] = i;
            kind[np++] = K_SINK;
        }

        int r = poll(pfd, (nfds_t)np, timeout);
        if (r < 0) {
            if (errno != EINTR) {
                logmsg("poll: %s", strerror(errno));
                sleep_ms(100);
            }
            continue;
        }
        int sinks_dirty = 0;
        for (int k = 0; k < np; k++) {
            short ev = pfd[k].revents;
            if (!ev)
                continue;
            switch (kind[k]) {
            case K_SIG: {
                char tmp[64];
                ssize_t n;
                while ((n = read(sig_pipe[0], tmp, sizeof tmp)) > 0) {
                    if (memchr(tmp, 'i', (size_t)n))
                        port_resume = 0; /* the host (dis)connected: look now */
                }
                reap_children();
                break;
            }
            case K_PORT:
                if (ev & POLLHUP) {
                    if (!in_hup) {
                        in_hup = 1;
                        disconnect("hangup");
                    }
                    port_resume = now_ms() + hup_retry_ms();
                    break;
                }
                if (in_hup) {
                    /* the host is back: a fresh connection */
                    in_hup = 0;
                    inbuf.len = 0;
                    outbuf.len = 0;
                }
                if (ev & POLLIN) {
                    if (!read_transport(serial_fd)) {
                        in_hup = 1;
                        disconnect("eof");
                        port_resume = now_ms() + hup_retry_ms();
                        break;
                    }
                    parse_input();
                }
                if (ev & POLLOUT)
                    flush_out();
                break;
            case K_LISTEN: {
                int c = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
                if (c >= 0) {
                    /* one connection at a time: the newest one wins */
                    disconnect("new connection");
                    conn_fd = c;
                }
                break;
            }
            case K_CONN:
                if (conn_fd < 0)
                    break;
                if (ev & POLLIN) {
                    if (!read_transport(conn_fd)) {
                        disconnect("eof");
                        break;
                    }
                    parse_input();
                } else if (ev & (POLLHUP | POLLERR)) {
                    disconnect("hangup");
                    break;
                }
                if (conn_fd >= 0 && (ev & POLLOUT))
                    flush_out();
                break;
            case K_IN:
                if (jobs[owner[k]].used && jobs[owner[k]].in_fd >= 0)
                    feed_stdin(&jobs[owner[k]]);
                break;
            case K_OUT:
                if (jobs[owner[k]].used && jobs[owner[k]].out_fd >= 0)
                    relay_chunk(&jobs[owner[k]], &jobs[owner[k]].out_fd, 'O');
                break;
            case K_ERR:
                if (jobs[owner[k]].used && jobs[owner[k]].err_fd >= 0)
                    relay_chunk(&jobs[owner[k]], &jobs[owner[k]].err_fd, 'R');
                break;
            case K_SINK: {
                static unsigned char junk[CHUNK];
                ssize_t n = read(sinks[owner[k]], junk, sizeof junk);
                if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(sinks[owner[k]]);
                    sinks[owner[k]] = -1;
                    sinks_dirty = 1;
                }
                break;
            }
            }
        }
        if (sinks_dirty) {
            int w = 0;
            for (int i = 0; i < nsinks; i++)
                if (sinks[i] >= 0)
                    sinks[w++] = sinks[i];
            nsinks = w;
        }
    }
}
