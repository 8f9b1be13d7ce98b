/* `ember exec`: commands the host runs in the machine beside its program.
 *
 * Each exec port (virtio-serial "org.ember.exec.N"; in --test mode a unix socket
 * init connects to) carries at most one session at a time: the host connects, sends
 * an open request, then the command's stdin; init answers with the command's
 * stdout, stderr and its exit code.  A host that hangs up ends its session (the
 * command's process group is killed) unless the session was opened detached.
 * Frames in both directions: a type byte, a 4-byte big-endian length, the payload
 * (docs/guest.md, "Exec").  Everything here runs in init's own poll loop: nothing
 * blocks for long, and a port whose command does not read its stdin stops being
 * read (the host then waits) rather than init holding more than STDIN_MAX for it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "init.h"

#define FRAME_IN_MAX (128 * 1024)  /* a request from the host: keep in step with execproto.py */
#define HDR 5
#define FRAME_OUT_MAX (32 * 1024 - HDR) /* a frame is one virtio-serial write (32 KiB) */
#define OUT_HIGH (64 * 1024)       /* frames queued for the host before the pipes wait */
#define STDIN_MAX (1024 * 1024)    /* stdin held for a command that has not read it yet */

/* S_ATTACHED: the session writes the program's own stdin (attach.c), runs nothing */
enum { S_NONE, S_RUNNING, S_ATTACHED };

struct eport {
	int fd;
	int hup;             /* no host connected: not polled until SIGIO or the retry time */
	int broken;          /* a malformed frame: ignore everything until the host hangs up */
	unsigned char *in;   /* a frame being read (HDR + FRAME_IN_MAX, while a host is there) */
	size_t inlen;
	unsigned char *out;  /* frames for the host, written as the port takes them: */
	size_t ohead, olen, ocap; /* out[ohead .. ohead + olen) */
	int state;
	pid_t pid;
	int sin, sout, serr; /* the command's pipes, -1 once closed */
	unsigned char *pending;
	size_t plen;
	int close_stdin;     /* close sin once pending is written */
	int status, reaped;
	int tty;             /* sout is a terminal's master (serr unused) */
	char nonce[65];      /* the running session's request's */
};

static struct eport P[EXEC_PORTS];
static int nports;
static const char *test_socket;
static long long retry_at = -1;
static struct exec_env base;
/* the nonces of the last detached starts: a client's request sent again is not started again */
#define DETACHED_KEPT 16
static char detached[DETACHED_KEPT][65];
static int detached_next;

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = (unsigned char)(v >> 24);
	p[1] = (unsigned char)(v >> 16);
	p[2] = (unsigned char)(v >> 8);
	p[3] = (unsigned char)v;
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Queue a frame for the host (written by flush_out as the port takes it: init never
 * waits on a host, and never drops what it queued; the command's output waits instead,
 * OUT_HIGH) */
static void send_frame(struct eport *p, char type, const void *data, size_t n)
{
	if (p->fd < 0 || p->hup)
		return; /* nobody to send it to */
	if (p->ohead + p->olen + HDR + n > p->ocap) {
		memmove(p->out, p->out + p->ohead, p->olen);
		p->ohead = 0;
		if (p->olen + HDR + n > p->ocap) {
			p->ocap = p->olen + HDR + n + OUT_HIGH;
			p->out = xrealloc(p->out, p->ocap);
		}
	}
	unsigned char *f = p->out + p->ohead + p->olen;
	f[0] = (unsigned char)type;
	put32(f + 1, (uint32_t)n);
	memcpy(f + HDR, data, n);
	p->olen += HDR + n;
}

static void hung_up(struct eport *p);

static void flush_out(struct eport *p)
{
	while (p->olen > 0) {
		/* a virtio port takes a write of up to 32 KiB whole, or none of it */
		size_t n = p->olen < 32 * 1024 ? p->olen : 32 * 1024;
		ssize_t w = write(p->fd, p->out + p->ohead, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return; /* full: POLLOUT says when to go on */
		if (w <= 0) {
			hung_up(p); /* (a socket the host shut: EPIPE, at once again and again) */
			return;
		}
		p->ohead += (size_t)w;
		p->olen -= (size_t)w;
	}
	p->ohead = 0;
}

static void send_text(struct eport *p, char type, const char *text)
{
	send_frame(p, type, text, strlen(text));
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

/* The session is over for this port (the command's end may still be reaped later). */
static void reset(struct eport *p)
{
	close_fd(&p->sin);
	close_fd(&p->sout);
	close_fd(&p->serr);
	free(p->pending);
	p->pending = NULL;
	p->plen = 0;
	p->close_stdin = 0;
	p->state = S_NONE;
	p->pid = 0;
	p->reaped = 0;
	p->tty = 0;
	p->nonce[0] = 0;
}

/* The session ends before its command: the command goes (its process group). */
static void end_session(struct eport *p)
{
	if (p->state != S_NONE && p->pid > 0) {
		/* its group, also once its leader was reaped (a background child that holds the
		 * output: the group's id is not reused while it has members) */
		kill(-p->pid, SIGKILL);
		if (!p->reaped)
			kill(p->pid, SIGKILL); /* one that has not made its own group (setsid) yet */
	}
	reset(p);
}

/* The host hung up: its command goes too, as a closed terminal ends a shell's; what was
 * queued for it and read from it goes. */
static void host_gone(struct eport *p)
{
	end_session(p);
	p->broken = 0;
	p->inlen = 0;
	free(p->in);
	p->in = NULL;
	free(p->out);
	p->out = NULL;
	p->ohead = p->olen = p->ocap = 0;
}

static int connect_test(void)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	snprintf(a.sun_path, sizeof(a.sun_path), "%s", test_socket);
	if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
		return fd;
	if (fd >= 0)
		close(fd);
	return -1;
}

void exec_setup(const int *fds, int n, const char *test_path,
                const struct exec_env *env)
{
	base = *env;
	test_socket = test_path;
	for (int i = 0; i < EXEC_PORTS; i++) {
		P[i].fd = -1;
		P[i].sin = P[i].sout = P[i].serr = -1;
	}
	if (test_socket) {
		nports = 1;
		P[0].fd = connect_test();
		P[0].hup = P[0].fd < 0;
		if (P[0].fd < 0)
			retry_at = 0;
		return;
	}
	nports = n;
	for (int i = 0; i < n; i++) {
		P[i].fd = fds[i];
		if (P[i].fd >= 0) {
			/* the driver sends SIGIO when the host connects or hangs up */
			fcntl(P[i].fd, F_SETOWN, getpid());
			fcntl(P[i].fd, F_SETFL, fcntl(P[i].fd, F_GETFL) | O_ASYNC | O_NONBLOCK);
		}
		P[i].hup = 1; /* looked at once the loop starts */
	}
	retry_at = 0;
}

/* ---- starting a command -------------------------------------------------------------- */

struct request {
	char **argv, **env;
	int argc, envc;
	const char *user, *workdir;
	int want_stdin, detach;
	int attach;          /* 'm': attach to the program's stdin (no command) */
	const char *nonce;
	int tty, rows, cols; /* a terminal for the command, of this size */
};

/* The payload: NUL-terminated strings, each tagged by its first byte: 'a' an argument,
 * 'e' an environment entry, 'u' the user, 'w' the working directory, 'i' stdin wanted,
 * 'd' detached, 'n' the host's nonce (echoed in the start frame), 't' a terminal of
 * "ROWS COLS".  -1 when malformed. */
static int parse_request(unsigned char *data, size_t n, struct request *r, char *err, size_t errlen)
{
	memset(r, 0, sizeof(*r));
	if (n == 0 || data[n - 1] != 0) {
		snprintf(err, errlen, "malformed exec request");
		return -1;
	}
	if (n && data[0] == 0) { /* an empty string has no tag */
		snprintf(err, errlen, "malformed exec request");
		return -1;
	}
	size_t count = 0;
	for (size_t i = 0; i < n; i++)
		count += data[i] == 0;
	r->argv = xrealloc(NULL, (count + 1) * sizeof(char *));
	r->env = xrealloc(NULL, (count + base.envc + 4) * sizeof(char *));
	for (size_t i = 0; i < n;) {
		char *s = (char *)data + i;
		size_t len = strlen(s);
		switch (s[0]) {
		case 'a': r->argv[r->argc++] = s + 1; break;
		case 'e':
			if (!strchr(s + 1, '=') || s[1] == '=') {
				snprintf(err, errlen, "invalid environment entry");
				return -1;
			}
			r->env[r->envc++] = s + 1;
			break;
		case 'u': r->user = s + 1; break;
		case 'w': r->workdir = s + 1; break;
		case 'i': r->want_stdin = 1; break;
		case 'd': r->detach = 1; break;
		case 'm': r->attach = 1; break;
		case 'n': r->nonce = s + 1; break;
		case 't':
			r->tty = 1;
			if (sscanf(s + 1, "%d %d", &r->rows, &r->cols) != 2 || r->rows < 0 || r->cols < 0 ||
			    r->rows > 65535 || r->cols > 65535) {
				snprintf(err, errlen, "invalid terminal size");
				return -1;
			}
			break;
		default:
			snprintf(err, errlen, "unknown exec request field");
			return -1;
		}
		i += len + 1;
	}
	r->argv[r->argc] = NULL;
	if (r->attach && (r->argc || r->envc || r->user || r->workdir || r->detach)) {
		snprintf(err, errlen, "an attach request names no command");
		return -1;
	}
	if (r->argc == 0 && !r->attach) {
		snprintf(err, errlen, "no command");
		return -1;
	}
	if (r->workdir && r->workdir[0] != '/') {
		snprintf(err, errlen, "the working directory must be an absolute path");
		return -1;
	}
	return 0;
}

static int key_len(const char *entry)
{
	return (int)(strchrnul(entry, '=') - entry);
}

/* The program's environment with the request's entries over it (same keys replaced),
 * and HOME from the request's user when it names one and sets no HOME. */
static char **session_env(struct request *r, const char *home, char **made)
{
	char **env = xrealloc(NULL, (size_t)(base.envc + r->envc + 2) * sizeof(char *));
	int n = 0;
	for (int i = 0; i < base.envc; i++) {
		int k = key_len(base.env[i]), replaced = 0;
		for (int j = 0; j < r->envc && !replaced; j++)
			replaced = key_len(r->env[j]) == k && !strncmp(r->env[j], base.env[i], (size_t)k);
		if (home && k == 4 && !strncmp(base.env[i], "HOME", 4))
			replaced = 1;
		if (!replaced)
			env[n++] = base.env[i];
	}
	int have_home = 0;
	for (int j = 0; j < r->envc; j++) {
		env[n++] = r->env[j];
		have_home |= key_len(r->env[j]) == 4 && !strncmp(r->env[j], "HOME", 4);
	}
	if (home && !have_home) {
		size_t len = strlen(home) + 6;
		char *h = xrealloc(NULL, len);
		snprintf(h, len, "HOME=%s", home);
		env[n++] = *made = h;
	}
	env[n] = NULL;
	return env;
}

static void child_fail(int fd, const char *what, const char *arg, int e, int code)
{
	char buf[600];
	size_t n = append(buf, sizeof(buf), 0, "ember-init: %s %.400s: %s\n", what, arg, strerror(e));
	if (write(fd, buf, n) < 0) {
	}
	_exit(code);
}

/* A pseudo-terminal's master (close-on-exec, non-blocking) and its slave's path; -1 when
 * none can be had.  /dev/ptmx is devtmpfs's; --test's private /dev has none, and the
 * devpts instance's own ptmx serves then. */
int open_pty(int rows, int cols, char *slave, size_t len)
{
	int m = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
	if (m < 0)
		m = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NONBLOCK);
	if (m < 0)
		return -1;
	int unlock = 0;
	if (ioctl(m, TIOCSPTLCK, &unlock) < 0 || ptsname_r(m, slave, len) != 0) {
		close(m);
		return -1;
	}
	struct winsize ws = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
	ioctl(m, TIOCSWINSZ, &ws);
	return m;
}

/* The request's nonce ("" when it has none or is malformed before it) */
static const char *nonce_of(const unsigned char *data, size_t n)
{
	if (n == 0 || data[n - 1] != 0)
		return "";
	for (size_t i = 0; i < n; i += strlen((const char *)data + i) + 1)
		if (data[i] == 'n')
			return (const char *)data + i + 1;
	return "";
}

/* 'R': the request's nonce, a NUL, why (a refusal a later client reads is not its own) */
static void refuse(struct eport *p, const unsigned char *data, size_t n, const char *why)
{
	char buf[512];
	const char *nonce = nonce_of(data, n);
	size_t a = strnlen(nonce, 64), b = strnlen(why, sizeof(buf) - 66);
	memcpy(buf, nonce, a);
	buf[a] = 0;
	memcpy(buf + a + 1, why, b);
	send_frame(p, 'R', buf, a + 1 + b);
}

static int started_already(const struct eport *p, const char *nonce)
{
	if (!nonce[0])
		return 0;
	if (p->state != S_NONE && !strcmp(p->nonce, nonce))
		return 1;
	for (int i = 0; i < DETACHED_KEPT; i++)
		if (!strcmp(detached[i], nonce))
			return 1;
	return 0;
}

/* An attach request: the session writes the program's stdin from now on (its 'I'
 * frames), resizes its terminal ('W'), signals it ('S'); the program's output is not
 * sent here (the host reads it from the log).  Refused when the program's stdin is not
 * held open (not run with -i). */
static void attach(struct eport *p, const struct request *r, const unsigned char *data, size_t n)
{
	int fd = attach_stdin_fd();
	if (fd < 0) {
		refuse(p, data, n, "the program's stdin is not open (it was not run with -i)");
		return;
	}
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	p->tty = attach_is_tty();
	if (p->tty && r->tty && r->rows > 0 && r->cols > 0) {
		struct winsize ws = {.ws_row = (unsigned short)r->rows, .ws_col = (unsigned short)r->cols};
		ioctl(fd, TIOCSWINSZ, &ws);
	}
	send_text(p, 'N', r->nonce ? r->nonce : "");
	snprintf(p->nonce, sizeof(p->nonce), "%s", r->nonce ? r->nonce : "");
	p->state = S_ATTACHED;
	p->sin = fd;
}

static void start(struct eport *p, unsigned char *data, size_t n)
{
	char err[300];
	struct request r;
	/* a client that had no answer sends its request again, on a new connection: the
	 * command it started (still running here, or detached) is not started twice */
	const char *again = nonce_of(data, n);
	if (started_already(p, again)) {
		send_text(p, 'N', again);
		return;
	}
	/* a new host connection that came before init saw the last one go ends that one's
	 * session (frames for it still queued go to the new one, which ignores them: the
	 * nonce); a session's state never carries over */
	end_session(p);
	if (parse_request(data, n, &r, err, sizeof(err)) < 0) {
		refuse(p, data, n, err);
		free(r.argv);
		free(r.env);
		return;
	}
	if (r.attach) {
		attach(p, &r, data, n);
		free(r.argv);
		free(r.env);
		return;
	}
	struct exec_user own = {0};
	const struct exec_user *u = base.user;
	if (r.user && r.user[0]) {
		if (resolve_user(r.user, "/etc/passwd", "/etc/group", &own, err, sizeof(err)) < 0) {
			free(own.groups); /* (what it found before it failed) */
			free(own.home);
			refuse(p, data, n, err);
			free(r.argv);
			free(r.env);
			return;
		}
		u = &own;
	}
	char *made = NULL;
	char **env = session_env(&r, u == base.user ? NULL : (u->home ? u->home : "/"), &made);
	const char *workdir = r.workdir ? r.workdir : base.workdir;
	int in[2] = {-1, -1}, out[2] = {-1, -1}, errp[2] = {-1, -1};
	int ok = 1, master = -1, slave = -1;
	if (!r.detach && r.tty) {
		/* one stream both ways: the terminal's master is stdin (a dup) and output; the
		 * slave is opened here (a master whose slave was never opened never ends) */
		char name[64];
		master = open_pty(r.rows, r.cols, name, sizeof(name));
		slave = master < 0 ? -1 : open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (slave < 0) {
			close_fd(&master);
			free(r.argv);
			free(r.env);
			refuse(p, data, n, "cannot open a terminal for the command");
			return;
		}
		out[0] = master;
		in[1] = r.want_stdin ? fcntl(master, F_DUPFD_CLOEXEC, 3) : -1;
	} else if (!r.detach) {
		ok = pipe2(out, O_CLOEXEC) == 0 && pipe2(errp, O_CLOEXEC) == 0 &&
		     (!r.want_stdin || pipe2(in, O_CLOEXEC) == 0);
	}
	pid_t pid = ok ? fork() : -1;
	if (pid == 0) {
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		int devnull = open("/dev/null", O_RDWR);
		if (slave >= 0) {
			/* the session's controlling terminal; stdin too, even without -i (as
			 * docker's -t): a shell then sees a terminal, whose input never comes */
			ioctl(slave, TIOCSCTTY, 0);
			for (int fd = 0; fd < 3; fd++)
				dup2(slave, fd);
		} else {
			dup2(in[0] >= 0 ? in[0] : devnull, 0);
			dup2(out[1] >= 0 ? out[1] : devnull, 1);
			dup2(errp[1] >= 0 ? errp[1] : devnull, 2);
		}
		if (devnull > 2)
			close(devnull);
		int cd = chdir(workdir) < 0 ? errno : 0;
		if (cd && cd != EACCES && cd != EPERM)
			child_fail(2, "chdir", workdir, cd, EXIT_CANNOT_EXEC);
		if (setgroups((size_t)u->ngroups, u->groups) < 0)
			child_fail(2, "setgroups", "", errno, EXIT_CANNOT_EXEC);
		if (setgid(u->gid) < 0 || setuid(u->uid) < 0)
			child_fail(2, "setuid/setgid", r.user ? r.user : "", errno, EXIT_CANNOT_EXEC);
		if (cd && chdir(workdir) < 0)
			child_fail(2, "chdir", workdir, errno, EXIT_CANNOT_EXEC);
		exec_command(r.argv, env);
	}
	int fork_errno = errno;
	if (u == &own) {
		free(own.groups);
		free(own.home);
	}
	close_fd(&slave);
	close_fd(&in[0]);
	close_fd(&out[1]);
	close_fd(&errp[1]);
	free(env);
	free(made);
	if (pid < 0) {
		close_fd(&in[1]);
		close_fd(&out[0]);
		close_fd(&errp[0]);
		snprintf(err, sizeof(err), "cannot start the command: %s", strerror(fork_errno));
		refuse(p, data, n, err);
	} else {
		send_text(p, 'N', r.nonce ? r.nonce : "");
		if (r.detach && r.nonce) {
			snprintf(detached[detached_next], sizeof(detached[0]), "%s", r.nonce);
			detached_next = (detached_next + 1) % DETACHED_KEPT;
		}
		if (!r.detach) {
			snprintf(p->nonce, sizeof(p->nonce), "%s", r.nonce ? r.nonce : "");
			p->tty = r.tty;
			p->state = S_RUNNING;
			p->pid = pid;
			p->sin = in[1];
			p->sout = out[0];
			p->serr = errp[0];
			for (int *fd = &p->sin; fd <= &p->serr; fd++)
				if (*fd >= 0)
					fcntl(*fd, F_SETFL, fcntl(*fd, F_GETFL) | O_NONBLOCK);
		}
	}
	free(r.argv);
	free(r.env);
}

/* ---- frames from the host ------------------------------------------------------------ */

/* A frame that cannot be one of ours: the session ends, and the rest of what this host
 * sends is ignored until it hangs up (there is no telling where a next frame starts). */
static void protocol_error(struct eport *p, const char *what)
{
	refuse(p, (const unsigned char *)"", 0, what);
	end_session(p);
	p->broken = 1;
}

static void pump_stdin(struct eport *p);

static void stdin_data(struct eport *p, const unsigned char *data, size_t n)
{
	if (p->state == S_NONE || p->sin < 0 || p->close_stdin)
		return; /* no stdin asked for, or it was closed: dropped */
	p->pending = xrealloc(p->pending, p->plen + n);
	memcpy(p->pending + p->plen, data, n);
	p->plen += n;
	/* written now as far as it goes: an attached host that hangs up right after it
	 * sent something must not take it back (the rest waits for POLLOUT) */
	pump_stdin(p);
}

static void frame(struct eport *p, unsigned char type, unsigned char *data, size_t n)
{
	switch (type) {
	case 'O':
		start(p, data, n);
		break;
	case 'I':
		stdin_data(p, data, n);
		break;
	case 'C':
		if (p->state != S_NONE)
			p->close_stdin = 1;
		if (p->state == S_ATTACHED)
			attach_close_stdin(); /* this host's stdin ended: the program's does */
		break;
	case 'W': {
		/* the terminal's master: the command's output, or an attached one's stdin */
		int term = p->state == S_ATTACHED ? p->sin : p->state == S_RUNNING ? p->sout : -1;
		if (n == 4 && p->tty && term >= 0) {
			struct winsize ws = {.ws_row = (unsigned short)(data[0] << 8 | data[1]),
			                     .ws_col = (unsigned short)(data[2] << 8 | data[3])};
			ioctl(term, TIOCSWINSZ, &ws);
		}
		break;
	}
	case 'S':
		if (n == 4) {
			uint32_t sig = get32(data);
			pid_t to = p->state == S_RUNNING && !p->reaped ? p->pid
			           : p->state == S_ATTACHED ? attach_pid() : 0;
			if (sig >= 1 && sig <= 64 && to > 0)
				kill(to, (int)sig);
		}
		break;
	default:
		protocol_error(p, "unknown exec frame");
	}
}

/* The host hung up (or never came): look again on SIGIO, or a while later */
static void hung_up(struct eport *p)
{
	host_gone(p);
	p->hup = 1;
	if (test_socket)
		close_fd(&p->fd);
	long long again = now_ms() + (test_socket ? 100 : 1000);
	if (retry_at < 0 || again < retry_at)
		retry_at = again;
}

static void read_port(struct eport *p, short revents)
{
	/* a few reads a turn: the rest of the loop (the program's supervision) goes on */
	for (int reads = 0; reads < 8; reads++) {
		if (p->plen > STDIN_MAX || p->olen >= OUT_HIGH) {
			/* the command reads its stdin first, the host its frames (each request
			 * queues an answer); a host that left meanwhile ends the session */
			if (revents & (POLLHUP | POLLERR))
				hung_up(p);
			return;
		}
		if (!p->in)
			p->in = xrealloc(NULL, HDR + FRAME_IN_MAX);
		ssize_t n = read(p->fd, p->in + p->inlen, HDR + FRAME_IN_MAX - p->inlen);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0) {
			hung_up(p);
			return;
		}
		if (n < 0) {
			if (errno != EAGAIN)
				hung_up(p); /* (a connection reset) */
			return;
		}
		if (p->broken)
			continue;
		p->inlen += (size_t)n;
		size_t off = 0;
		while (!p->broken && p->inlen - off >= HDR) {
			uint32_t len = get32(p->in + off + 1);
			if (len > FRAME_IN_MAX) {
				protocol_error(p, "exec frame too long");
				break;
			}
			if (p->inlen - off < HDR + len)
				break;
			frame(p, p->in[off], p->in + off + HDR, len);
			off += HDR + len;
		}
		if (p->broken) {
			p->inlen = 0;
			continue;
		}
		memmove(p->in, p->in + off, p->inlen - off);
		p->inlen -= off;
	}
}

/* ---- the command's side ------------------------------------------------------------- */

static void pump_stdin(struct eport *p)
{
	while (p->plen > 0) {
		ssize_t w = write(p->sin, p->pending, p->plen);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			if (errno != EAGAIN) { /* the command closed its stdin: drop the rest */
				p->plen = 0;
				close_fd(&p->sin);
			}
			return;
		}
		memmove(p->pending, p->pending + w, p->plen - (size_t)w);
		p->plen -= (size_t)w;
	}
	if (p->close_stdin)
		close_fd(&p->sin);
}

static void pump_output(struct eport *p, int *fd, char type)
{
	unsigned char buf[FRAME_OUT_MAX];
	ssize_t n = read(*fd, buf, sizeof(buf));
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (n <= 0) { /* (a terminal's master reads EIO once its last slave is closed) */
		close_fd(fd);
		return;
	}
	send_frame(p, type, buf, (size_t)n);
}

/* Its output all sent and its process reaped: the exit code goes to the host. */
static void maybe_end(struct eport *p)
{
	if (p->state != S_RUNNING || !p->reaped || p->sout >= 0 || p->serr >= 0)
		return;
	int st = p->status;
	uint32_t code = WIFEXITED(st) ? (uint32_t)WEXITSTATUS(st) : 128u + (uint32_t)WTERMSIG(st);
	unsigned char b[4];
	put32(b, code);
	send_frame(p, 'X', b, 4);
	reset(p);
}

/* ---- the loop's side ---------------------------------------------------------------- */

int exec_pollfds(struct pollfd *fds, int max, long long *wake)
{
	int n = 0;
	long long now = now_ms();
	if (retry_at >= 0 && now >= retry_at) {
		retry_at = -1;
		for (int i = 0; i < nports; i++)
			P[i].hup = 0;
		if (test_socket && P[0].fd < 0) {
			P[0].fd = connect_test();
			if (P[0].fd < 0)
				retry_at = now + 100;
		}
	}
	for (int i = 0; i < nports && n + 4 <= max; i++) {
		struct eport *p = &P[i];
		int held = p->plen > STDIN_MAX || p->olen >= OUT_HIGH; /* (read_port) */
		short ev = (short)((held ? 0 : POLLIN) | (p->olen ? POLLOUT : 0));
		/* the command's output waits while the host is behind (never dropped) */
		int out_ok = p->olen < OUT_HIGH;
		fds[n++] = (struct pollfd){p->fd >= 0 && !p->hup ? p->fd : -1, ev, 0};
		fds[n++] = (struct pollfd){p->plen ? p->sin : -1, POLLOUT, 0};
		fds[n++] = (struct pollfd){out_ok ? p->sout : -1, POLLIN, 0};
		fds[n++] = (struct pollfd){out_ok ? p->serr : -1, POLLIN, 0};
	}
	if (retry_at >= 0 && (*wake < 0 || retry_at < *wake))
		*wake = retry_at;
	return n;
}

void exec_handle(struct pollfd *fds, int n)
{
	for (int i = 0; i < nports && 4 * i + 3 < n; i++) {
		struct eport *p = &P[i];
		struct pollfd *f = fds + 4 * i;
		if (f[0].fd >= 0 && f[0].revents & POLLOUT)
			flush_out(p);
		if (f[0].fd >= 0 && !p->hup && f[0].revents & (POLLIN | POLLHUP | POLLERR))
			read_port(p, f[0].revents);
		if (f[1].fd >= 0 && f[1].revents && p->sin >= 0)
			pump_stdin(p);
		if (p->close_stdin && p->plen == 0)
			close_fd(&p->sin);
		if (f[2].fd >= 0 && f[2].revents && p->sout >= 0)
			pump_output(p, &p->sout, 'o');
		if (f[3].fd >= 0 && f[3].revents && p->serr >= 0)
			pump_output(p, &p->serr, 'e');
		maybe_end(p);
		if (p->olen && p->fd >= 0 && !p->hup)
			flush_out(p); /* at once, not only on the next POLLOUT */
	}
}

void exec_host_changed(void)
{
	/* SIGIO: a host connected to or left some port: look at every one again */
	for (int i = 0; i < nports; i++)
		P[i].hup = 0;
}

int exec_reaped(pid_t pid, int status)
{
	for (int i = 0; i < nports; i++) {
		if (P[i].state == S_RUNNING && P[i].pid == pid && !P[i].reaped) {
			P[i].status = status;
			P[i].reaped = 1;
			maybe_end(&P[i]);
			return 1;
		}
	}
	return 0;
}
