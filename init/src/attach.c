/* The program's own stdin and terminal: `ember run -i` / `-t`, and `ember attach`.
 *
 * Without them the program's stdin is /dev/null and its stdout and stderr are the
 * ports themselves (main.c's spawn).  With -i its stdin is a pipe whose write end init
 * holds; with -t its stdio is the slave of a pseudo-terminal whose master init holds,
 * and what the terminal shows goes from the master to the stdout port (so to the
 * machine's log, where the host reads it as it reads any output) through init, a
 * bounded buffer at a time: init never waits on the host.  The host writes the
 * program's stdin through an exec port: a session opened with the 'm' field attaches
 * to it (exec.c), writing to a duplicate of the descriptor held here.  Several hosts
 * may be attached at once, as several `docker attach` may.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "init.h"

#define OUT_BUF (64 * 1024)

static struct {
	int tty;
	int master, slave; /* -t: the terminal (the slave until the program has it) */
	int in_r, in_w;    /* -i without -t: the stdin pipe */
	int out;           /* where the terminal's output goes */
	int master_done;   /* the master read EIO: no slave open any more */
	pid_t pid;
	unsigned char buf[OUT_BUF];
	size_t head, len;
} A = {.master = -1, .slave = -1, .in_r = -1, .in_w = -1, .out = -1};

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

int attach_prepare(const struct config *c, int out, char *err, size_t errlen)
{
	if (c->tty) {
		char name[64];
		A.master = open_pty(c->tty_rows, c->tty_cols, name, sizeof(name));
		/* opened here, not in the child: a master whose slave was never opened reads
		 * neither data nor EIO */
		A.slave = A.master < 0 ? -1 : open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
		if (A.slave < 0) {
			snprintf(err, errlen, "cannot open a terminal for the program: %s", strerror(errno));
			return -1;
		}
		A.tty = 1;
		A.out = out;
		set_nonblock(A.out);
		/* -t without -i: a terminal whose input never comes, as docker's */
		A.in_w = c->open_stdin ? fcntl(A.master, F_DUPFD_CLOEXEC, 3) : -1;
	} else if (c->open_stdin) {
		int p[2];
		if (pipe2(p, O_CLOEXEC) < 0) {
			snprintf(err, errlen, "cannot make the program's stdin: %s", strerror(errno));
			return -1;
		}
		A.in_r = p[0];
		A.in_w = p[1];
		set_nonblock(A.in_w);
	}
	return 0;
}

int attach_child_stdio(void)
{
	if (A.slave >= 0) {
		/* its controlling terminal (the child made its own session first) */
		ioctl(A.slave, TIOCSCTTY, 0);
		for (int fd = 0; fd < 3; fd++)
			dup2(A.slave, fd);
		return 3;
	}
	if (A.in_r >= 0) {
		dup2(A.in_r, 0);
		return 1;
	}
	return 0;
}

void attach_started(pid_t pid)
{
	A.pid = pid;
	if (A.slave >= 0)
		close(A.slave);
	if (A.in_r >= 0)
		close(A.in_r);
	A.slave = A.in_r = -1;
}

int attach_stdin_fd(void)
{
	return A.in_w < 0 ? -1 : fcntl(A.in_w, F_DUPFD_CLOEXEC, 3);
}

int attach_is_tty(void)
{
	return A.tty;
}

pid_t attach_pid(void)
{
	return A.pid;
}

void attach_close_stdin(void)
{
	/* a terminal's input has no end to pass on (the master stays for the output) */
	if (A.tty)
		return;
	if (A.in_w >= 0)
		close(A.in_w);
	A.in_w = -1;
}

/* Write what the buffer holds as the port takes it; a port gone drops the rest. */
static void flush(void)
{
	while (A.len > 0) {
		ssize_t w = write(A.out, A.buf + A.head, A.len);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN)
			return;
		if (w <= 0) {
			logmsg("the program's terminal output: %s: dropped", strerror(errno));
			A.len = 0;
			break;
		}
		A.head += (size_t)w;
		A.len -= (size_t)w;
	}
	A.head = 0;
}

/* Read the terminal once into the buffer's free room; 0 when nothing more will come. */
static int read_master(void)
{
	if (A.head + A.len == OUT_BUF) {
		memmove(A.buf, A.buf + A.head, A.len);
		A.head = 0;
	}
	if (A.len == OUT_BUF)
		return 1;
	ssize_t n = read(A.master, A.buf + A.head + A.len, OUT_BUF - A.head - A.len);
	if (n > 0) {
		A.len += (size_t)n;
		return 1;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return 1;
	A.master_done = 1; /* EIO: its last slave was closed */
	return 0;
}

int attach_pollfds(struct pollfd *fds, int max)
{
	if (max < 2)
		return 0;
	int reading = A.tty && !A.master_done && A.len < OUT_BUF;
	fds[0] = (struct pollfd){reading ? A.master : -1, POLLIN, 0};
	fds[1] = (struct pollfd){A.len ? A.out : -1, POLLOUT, 0};
	return 2;
}

void attach_handle(struct pollfd *fds, int n)
{
	if (n < 2)
		return;
	if (fds[0].fd >= 0 && fds[0].revents)
		read_master();
	if (A.len && (fds[1].revents || fds[0].revents))
		flush();
}

void attach_drain(int ms)
{
	if (!A.tty || A.master < 0)
		return;
	long long deadline = now_ms() + ms;
	while (now_ms() < deadline) {
		int more = !A.master_done && read_master();
		if (A.len) {
			flush();
			if (A.len) {
				struct pollfd p = {A.out, POLLOUT, 0};
				long long left = deadline - now_ms();
				poll(&p, 1, left > 0 ? (int)left : 0);
				continue;
			}
		}
		/* nothing buffered: done once the terminal has nothing more (every process is
		 * gone by now, so an empty master stays empty) */
		if (!more || A.master_done)
			break;
		struct pollfd p = {A.master, POLLIN, 0};
		if (poll(&p, 1, 0) <= 0)
			break;
	}
	if (A.len)
		logmsg("the program's terminal output: %zu bytes not taken by the host", A.len);
}
