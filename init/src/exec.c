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
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "init.h"

#define FRAME_IN_MAX (128 * 1024)  /* a request from the host: keep in step with execproto.py */
#define FRAME_OUT_MAX (32 * 1024)  /* one virtio-serial write is at most 32 KiB, whole */
#define STDIN_MAX (1024 * 1024)    /* stdin held for a command that has not read it yet */
#define HDR 5

enum { S_NONE, S_RUNNING, S_ENDING };

struct eport {
	int fd;
	char dev[64];        /* the port's device (for reopening); "" for the test socket */
	int hup;             /* no host connected: not polled until SIGIO or the retry time */
	int broken;          /* a malformed frame: ignore everything until the host hangs up */
	unsigned char in[HDR + FRAME_IN_MAX];
	size_t inlen;
	int state;
	pid_t pid;
	int sin, sout, serr; /* the command's pipes, -1 once closed */
	unsigned char *pending;
	size_t plen;
	int close_stdin;     /* close sin once pending is written */
	int status, reaped;
};

static struct eport P[EXEC_PORTS];
static int nports;
static const char *test_socket;
static long long retry_at = -1;
static struct exec_env base;

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

/* One frame to the host, in one write when the port takes it (a virtio port takes a
 * write of up to 32 KiB whole or not at all); waits a while when it is full. */
static void send_frame(struct eport *p, char type, const void *data, size_t n)
{
	unsigned char buf[HDR + FRAME_OUT_MAX];
	if (p->fd < 0 || n > FRAME_OUT_MAX)
		return;
	buf[0] = (unsigned char)type;
	put32(buf + 1, (uint32_t)n);
	memcpy(buf + HDR, data, n);
	size_t len = HDR + n, off = 0;
	long long deadline = now_ms() + 10000;
	while (off < len) {
		ssize_t w = write(p->fd, buf + off, len - off);
		if (w > 0) {
			off += (size_t)w;
			continue;
		}
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN && now_ms() < deadline) {
			struct pollfd q = {.fd = p->fd, .events = POLLOUT};
			poll(&q, 1, 50);
			continue;
		}
		return; /* the host went away (or stopped reading for 10 s) */
	}
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
}

/* The host hung up: its command goes too, as a closed terminal ends a shell's. */
static void host_gone(struct eport *p)
{
	if (p->state != S_NONE && p->pid > 0 && !p->reaped)
		kill(-p->pid, SIGKILL);
	reset(p);
	p->broken = 0;
	p->inlen = 0;
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

void exec_setup(const int *fds, const char (*devs)[64], int n, const char *test_path,
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
		return;
	}
	nports = n;
	for (int i = 0; i < n; i++) {
		P[i].fd = fds[i];
		snprintf(P[i].dev, sizeof(P[i].dev), "%s", devs[i]);
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
	const char *nonce;
};

/* The payload: NUL-terminated strings, each tagged by its first byte: 'a' an argument,
 * 'e' an environment entry, 'u' the user, 'w' the working directory, 'i' stdin wanted,
 * 'd' detached, 'n' the host's nonce (echoed in the start frame).  NULL when malformed. */
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
		case 'n': r->nonce = s + 1; break;
		default:
			snprintf(err, errlen, "unknown exec request field");
			return -1;
		}
		i += len + 1;
	}
	r->argv[r->argc] = NULL;
	if (r->argc == 0) {
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

static void start(struct eport *p, unsigned char *data, size_t n)
{
	char err[300];
	struct request r;
	if (p->state != S_NONE) {
		/* a new host connection that came before init saw the last one go */
		host_gone(p);
	}
	if (parse_request(data, n, &r, err, sizeof(err)) < 0) {
		send_text(p, 'R', err);
		free(r.argv);
		free(r.env);
		return;
	}
	struct exec_user own;
	const struct exec_user *u = base.user;
	if (r.user && r.user[0]) {
		if (resolve_user(r.user, "/etc/passwd", "/etc/group", &own, err, sizeof(err)) < 0) {
			send_text(p, 'R', err);
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
	int ok = 1;
	if (!r.detach) {
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
		dup2(in[0] >= 0 ? in[0] : devnull, 0);
		dup2(out[1] >= 0 ? out[1] : devnull, 1);
		dup2(errp[1] >= 0 ? errp[1] : devnull, 2);
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
		send_text(p, 'R', err);
	} else {
		send_text(p, 'N', r.nonce ? r.nonce : "");
		if (!r.detach) {
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
	send_text(p, 'R', what);
	host_gone(p);
	p->broken = 1;
}

static void stdin_data(struct eport *p, const unsigned char *data, size_t n)
{
	if (p->state != S_RUNNING || p->sin < 0 || p->close_stdin)
		return; /* no stdin asked for, or it was closed: dropped */
	p->pending = xrealloc(p->pending, p->plen + n);
	memcpy(p->pending + p->plen, data, n);
	p->plen += n;
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
		p->close_stdin = 1;
		break;
	case 'S':
		if (n == 4 && p->state == S_RUNNING && !p->reaped) {
			uint32_t sig = get32(data);
			if (sig >= 1 && sig <= 64)
				kill(p->pid, (int)sig);
		}
		break;
	default:
		protocol_error(p, "unknown exec frame");
	}
}

static void read_port(struct eport *p)
{
	for (;;) {
		if (p->plen > STDIN_MAX)
			return; /* the command reads its stdin first */
		ssize_t n = read(p->fd, p->in + p->inlen, sizeof(p->in) - p->inlen);
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0) { /* the host hung up (or never came) */
			host_gone(p);
			p->hup = 1;
			if (test_socket)
				close_fd(&p->fd);
			/* SIGIO says when a host connects; in case it never comes, look anyway */
			long long again = now_ms() + (test_socket ? 100 : 1000);
			if (retry_at < 0 || again < retry_at)
				retry_at = again;
			return;
		}
		if (n < 0)
			return; /* EAGAIN: all read */
		if (p->broken)
			continue;
		p->inlen += (size_t)n;
		size_t off = 0;
		while (p->inlen - off >= HDR) {
			uint32_t len = get32(p->in + off + 1);
			if (len > FRAME_IN_MAX) {
				protocol_error(p, "exec frame too long");
				break;
			}
			if (p->inlen - off < HDR + len)
				break;
			frame(p, p->in[off], p->in + off + HDR, len);
			off += HDR + len;
			if (p->broken)
				break;
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
	if (n <= 0) {
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
		short ev = p->plen > STDIN_MAX ? 0 : POLLIN;
		fds[n++] = (struct pollfd){p->fd >= 0 && !p->hup ? p->fd : -1, ev, 0};
		fds[n++] = (struct pollfd){p->plen ? p->sin : -1, POLLOUT, 0};
		fds[n++] = (struct pollfd){p->sout, POLLIN, 0};
		fds[n++] = (struct pollfd){p->serr, POLLIN, 0};
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
		if (f[0].fd >= 0 && f[0].revents & (POLLIN | POLLHUP | POLLERR))
			read_port(p);
		if (f[1].fd >= 0 && f[1].revents && p->sin >= 0)
			pump_stdin(p);
		if (p->close_stdin && p->plen == 0)
			close_fd(&p->sin);
		if (f[2].fd >= 0 && f[2].revents && p->sout >= 0)
			pump_output(p, &p->sout, 'o');
		if (f[3].fd >= 0 && f[3].revents && p->serr >= 0)
			pump_output(p, &p->serr, 'e');
		maybe_end(p);
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
		if (P[i].state == S_RUNNING && P[i].pid == pid) {
			P[i].status = status;
			P[i].reaped = 1;
			maybe_end(&P[i]);
			return 1;
		}
	}
	return 0;
}
