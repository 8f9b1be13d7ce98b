/* `ember-init --ps`: the guest's processes for `ember top`, one line each.
 *
 * Run by `ember top` as an exec session (`/proc/1/exe --ps`, as root): it reads the
 * guest's /proc, where the host cannot look.  Fields, tab-separated, as docker top's
 * default (`ps -ef`) columns: UID PID PPID C STIME TTY TIME CMD; the host lays them out.
 * Kernel threads (no command line), ember-init (PID 1) and this process are left out:
 * what is listed is the program and whatever runs beside it. */
#include "init.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* /proc/PID/stat's fields after the command name: state is field 3, so FIELD(n) is
 * n - 3 into what follows ") " */
#define FIELD(n) ((n) - 3)
/* more than this much command line is shown as the process's name */
#define CMDLINE_MAX (256 << 10)
/* a command line is shown up to this many bytes (then "...") */
#define CMD_SHOWN 4096

static long long boot_time(void)
{
	size_t len = 0;
	char *data = read_file("/proc/stat", 1 << 20, &len);
	long long t = 0;
	if (!data)
		return 0;
	for (char *line = data; line && line < data + len; line = strchr(line, '\n')) {
		if (*line == '\n')
			line++;
		if (!strncmp(line, "btime ", 6)) {
			t = atoll(line + 6);
			break;
		}
	}
	free(data);
	return t;
}

/* the terminal of a tty_nr (stat field 7): pts/N, ttyN, ttySN or "?" */
static void tty_name(unsigned long nr, char *out, size_t outlen)
{
	unsigned major = (unsigned)((nr >> 8) & 0xfff), minor = (unsigned)((nr & 0xff) | ((nr >> 12) & 0xfff00));
	if (nr == 0)
		snprintf(out, outlen, "?");
	else if (major >= 136 && major <= 143)
		snprintf(out, outlen, "pts/%u", (major - 136) * 256 + minor);
	else if (major == 4 && minor < 64)
		snprintf(out, outlen, "tty%u", minor);
	else if (major == 4)
		snprintf(out, outlen, "ttyS%u", minor - 64);
	else
		snprintf(out, outlen, "?");
}

/* a name with nothing a reader could take for a field or line break */
static int plain(const char *s)
{
	for (; *s; s++)
		if ((unsigned char)*s < 0x20 || *s == 0x7f)
			return 0;
	return 1;
}

/* UTF-8 NEL (C2 85), LINE and PARAGRAPH SEPARATOR (E2 80 A8/A9): line breaks to some
 * readers; shown as "?" like the control characters */
static void unicode_breaks(char *s)
{
	for (unsigned char *p = (unsigned char *)s; *p; p++) {
		if (p[0] == 0xc2 && p[1] == 0x85) {
			p[0] = '?';
			p[1] = '?';
		} else if (p[0] == 0xe2 && p[1] == 0x80 && (p[2] == 0xa8 || p[2] == 0xa9)) {
			p[0] = p[1] = p[2] = '?';
		}
	}
}

static void print_process(pid_t pid, long long btime, long hz, long long now)
{
	char path[64], *stat = NULL, *status = NULL, *cmdline = NULL;
	size_t slen = 0, stlen = 0, clen = 0;
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	stat = read_file(path, 4096, &slen);
	snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
	status = read_file(path, 64 << 10, &stlen);
	if (!stat || !status)
		goto out; /* gone */
	char *lparen = strchr(stat, '('), *rparen = strrchr(stat, ')');
	if (!lparen || !rparen || rparen < lparen || rparen[1] != ' ')
		goto out;
	snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)pid);
	cmdline = read_file(path, CMDLINE_MAX, &clen);
	if (!cmdline && errno == EFBIG) { /* a huge command line: its name, as ps shows one */
		clen = (size_t)(rparen - lparen) + 2;
		cmdline = xrealloc(NULL, clen);
		snprintf(cmdline, clen, "[%.*s]", (int)(rparen - lparen - 1), lparen + 1);
		clen = strlen(cmdline) + 1;
	}
	if (!cmdline || clen == 0)
		goto out; /* a kernel thread (or a zombie), or gone */
	char *fields[64];
	int nf = 0;
	for (char *p = strtok(rparen + 2, " \n"); p && nf < 64; p = strtok(NULL, " \n"))
		fields[nf++] = p;
	if (nf <= FIELD(22))
		goto out;
	unsigned long uid = 0;
	char *u = strstr(status, "\nUid:");
	if (u)
		uid = strtoul(u + 5, NULL, 10);
	char user[64], tty[32], stime[32];
	/* the image's name for it, unless that name could pass for more than one field */
	if (uid_name("/etc/passwd", uid, user, sizeof(user)) == 0 && !plain(user))
		snprintf(user, sizeof(user), "%lu", uid);
	tty_name(strtoul(fields[FIELD(7)], NULL, 10), tty, sizeof(tty));
	unsigned long long ticks = strtoull(fields[FIELD(14)], NULL, 10) + strtoull(fields[FIELD(15)], NULL, 10);
	long long started = btime + (long long)(strtoull(fields[FIELD(22)], NULL, 10) / (unsigned long long)hz);
	long long cpu = (long long)(ticks / (unsigned long long)hz);
	long long elapsed = now - started;
	int c = elapsed > 0 ? (int)(cpu * 100 / elapsed) : 0;
	time_t st = (time_t)started;
	struct tm tm;
	gmtime_r(&st, &tm);
	/* ps -ef: the time of day when started today, else the date */
	if (now - started < 86400)
		strftime(stime, sizeof(stime), "%H:%M", &tm);
	else
		strftime(stime, sizeof(stime), "%b%d", &tm);
	for (size_t i = 0; i + 1 < clen; i++) /* arguments with spaces between, as ps shows them */
		cmdline[i] = cmdline[i] == 0 ? ' ' : cmdline[i];
	if (clen > CMD_SHOWN) { /* (the host keeps a top's output bounded) */
		memcpy(cmdline + CMD_SHOWN - 4, "...", 4);
		clen = CMD_SHOWN;
	}
	for (size_t i = 0; i < clen; i++)
		if (cmdline[i] && (iscntrl((unsigned char)cmdline[i])))
			cmdline[i] = '?';
	unicode_breaks(cmdline);
	printf("%s\t%d\t%s\t%d\t%s\t%s\t%02lld:%02lld:%02lld\t%s\n", user, (int)pid, fields[FIELD(4)], c,
	       stime, tty, cpu / 3600, cpu / 60 % 60, cpu % 60, cmdline);
out:
	free(stat);
	free(status);
	free(cmdline);
}

int ps_main(void)
{
	long hz = sysconf(_SC_CLK_TCK);
	if (hz <= 0)
		hz = 100;
	long long btime = boot_time(), now = (long long)time(NULL);
	DIR *d = opendir("/proc");
	if (!d) {
		fprintf(stderr, "ember-init --ps: cannot read /proc: %s\n", strerror(errno));
		return 1;
	}
	pid_t self = getpid();
	for (struct dirent *e; (e = readdir(d));) {
		char *end;
		long pid = strtol(e->d_name, &end, 10);
		if (*end || pid <= 1 || pid == self)
			continue;
		print_process((pid_t)pid, btime, hz, now);
	}
	closedir(d);
	return fflush(stdout) == 0 ? 0 : 1;
}
