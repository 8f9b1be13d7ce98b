/* The run config parser: the C side of src/ember/vm/runconfig.py (docs/run-config.md).
 *
 * Strict on purpose: the config comes from the host, but a truncated or corrupted
 * one must stop the boot with a message rather than run something half-configured.
 * Parsing is in place: fields are unescaped inside the buffer, so every string in
 * struct config points into it.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "init.h"

#define MAX_FIELDS 66

static void seterr(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Unescape one field in place.  Returns 0, or -1 on a bad escape / raw control byte. */
static int unescape(char *s)
{
	char *w = s;
	for (char *r = s; *r; r++) {
		if (*r == '\\') {
			switch (r[1]) {
			case '\\': *w++ = '\\'; break;
			case 's': *w++ = ' '; break;
			case 'n': *w++ = '\n'; break;
			case 't': *w++ = '\t'; break;
			default: return -1;
			}
			r++;
		} else if (*r == '\t') {
			return -1;
		} else {
			*w++ = *r;
		}
	}
	*w = 0;
	return 0;
}

static int parse_int(const char *s, long min, long max, long *out)
{
	if (!*s || strlen(s) > 10)
		return -1;
	for (const char *p = s; *p; p++)
		if (*p < '0' || *p > '9')
			return -1;
	long v = strtol(s, NULL, 10);
	if (v < min || v > max)
		return -1;
	*out = v;
	return 0;
}

/* Append to a NULL-terminated string array, leaving `spare` free slots for later additions. */
static char **push(char **arr, int *n, char *s, int spare)
{
	arr = xrealloc(arr, sizeof(char *) * (size_t)(*n + 2 + spare));
	arr[(*n)++] = s;
	arr[*n] = NULL;
	return arr;
}

/* A volume target must name a directory below "/": absolute, no ".." component (as the
 * host checks), and something besides "/" and "." components ("//", "/.", "/./" are the
 * root itself, and a volume mounted there would hide the image). */
static int good_mount_target(const char *t)
{
	int named = 0;
	if (t[0] != '/')
		return 0;
	for (const char *p = t; *p;) {
		size_t n = strcspn(p, "/");
		if (n == 2 && p[0] == '.' && p[1] == '.')
			return 0;
		if (n > 0 && !(n == 1 && p[0] == '.'))
			named = 1;
		p += n;
		while (*p == '/')
			p++;
	}
	return named;
}

struct rec {
	const char *key;
	int min, max, single;
};
static const struct rec RECORDS[] = {
	{"arg", 1, 1, 0},         {"env", 1, 1, 0},         {"user", 1, 1, 1},
	{"workdir", 1, 1, 1},     {"hostname", 1, 1, 1},    {"host", 2, 64, 0},
	{"nameserver", 1, 1, 0},  {"search", 1, 1, 0},      {"net", 4, 4, 0},
	{"mount", 4, 4, 0},       {"stop_signal", 1, 1, 1}, {"stop_timeout", 1, 1, 1},
	{"root", 3, 3, 1},        {"module", 1, 1, 0},      {"nofile", 1, 1, 1},
	/* template boots and restores from a template (docs/run-config.md, "Templates") */
	{"template", 0, 0, 1},    {"late", 1, 1, 0},        {"clock", 2, 2, 1},
	{"seed", 1, 1, 1},        {"mac", 2, 2, 0},         {"exit_ack", 1, 1, 1},
	/* the program's stdin held open, its terminal (run -i, -t: attach.c) */
	{"stdin", 0, 0, 1},       {"tty", 2, 2, 1},
};
#define NRECORDS (int)(sizeof(RECORDS) / sizeof(RECORDS[0]))

int config_parse(char *buf, size_t len, struct config *c, char *err, size_t errlen)
{
	memset(c, 0, sizeof(*c));
	c->stop_signal = 15;
	c->stop_timeout = 10;
	c->root_dev = "/dev/vda";
	c->root_fstype = "ext4";
	c->root_opts = "defaults";
	c->nofile = 1048576;
	int seen[NRECORDS] = {0};

	if (len == 0 || len > CONFIG_MAX_SIZE)
		return seterr(err, errlen, "run config is empty or too large (%zu bytes)", len), -1;
	if (memchr(buf, 0, len))
		return seterr(err, errlen, "run config contains a NUL byte"), -1;
	if (buf[len - 1] != '\n')
		return seterr(err, errlen, "run config is truncated (no final newline)"), -1;
	buf[len - 1] = 0;

	int lineno = 0, ended = 0;
	char *next = buf;
	while (next) {
		char *line = next;
		char *nl = strchr(line, '\n');
		next = nl ? nl + 1 : NULL;
		if (nl)
			*nl = 0;
		lineno++;
		if (ended)
			return seterr(err, errlen, "run config: data after the end record (line %d)", lineno), -1;
		if (lineno == 1) {
			if (strcmp(line, "ember-run-config 1") != 0)
				return seterr(err, errlen, "not an ember run config of a known version"), -1;
			continue;
		}
		if (strcmp(line, "end") == 0) {
			ended = 1;
			continue;
		}
		/* split on single spaces: "key f1 f2 ..." (empty fields are legal) */
		char *fields[MAX_FIELDS + 1];
		int nf = 0;
		char *key = line, *p = strchr(line, ' ');
		if (p)
			*p = 0;
		while (p) {
			if (nf == MAX_FIELDS)
				return seterr(err, errlen, "run config line %d: too many fields", lineno), -1;
			fields[nf++] = p + 1;
			p = strchr(p + 1, ' ');
			if (p)
				*p = 0;
		}
		int r;
		for (r = 0; r < NRECORDS; r++)
			if (strcmp(key, RECORDS[r].key) == 0)
				break;
		if (r == NRECORDS)
			return seterr(err, errlen, "run config line %d: unknown record '%.40s'", lineno, key), -1;
		if (nf < RECORDS[r].min || nf > RECORDS[r].max)
			return seterr(err, errlen, "run config line %d: '%s' has %d fields", lineno, key, nf), -1;
		if (RECORDS[r].single && seen[r])
			return seterr(err, errlen, "run config line %d: '%s' appears twice", lineno, key), -1;
		seen[r]++;
		for (int i = 0; i < nf; i++)
			if (unescape(fields[i]) < 0)
				return seterr(err, errlen, "run config line %d: bad escape in '%s'", lineno, key), -1;

		long v;
		const char *f0 = nf ? fields[0] : "";
		if (!strcmp(key, "arg")) {
			c->argv = push(c->argv, &c->argc, fields[0], 0);
		} else if (!strcmp(key, "env")) {
			if (f0[0] == '=' || !strchr(f0, '='))
				return seterr(err, errlen, "run config line %d: env entry is not KEY=VALUE", lineno), -1;
			/* spare slots: HOME, PATH, HOSTNAME may be added later */
			c->env = push(c->env, &c->envc, fields[0], 3);
		} else if (!strcmp(key, "user")) {
			c->user = fields[0];
		} else if (!strcmp(key, "workdir")) {
			if (f0[0] != '/')
				return seterr(err, errlen, "run config: workdir must be absolute"), -1;
			c->workdir = fields[0];
		} else if (!strcmp(key, "hostname")) {
			if (!*f0 || strlen(f0) > 64)
				return seterr(err, errlen, "run config: invalid hostname"), -1;
			c->hostname = fields[0];
		} else if (!strcmp(key, "host")) {
			c->hosts = xrealloc(c->hosts, sizeof(*c->hosts) * (size_t)(c->nhosts + 1));
			struct hostent_rec *h = &c->hosts[c->nhosts++];
			h->addr = fields[0];
			h->nnames = nf - 1;
			h->names = xrealloc(NULL, sizeof(char *) * (size_t)nf);
			for (int i = 1; i < nf; i++)
				h->names[i - 1] = fields[i];
		} else if (!strcmp(key, "nameserver")) {
			c->nameservers = push(c->nameservers, &c->nnameservers, fields[0], 0);
		} else if (!strcmp(key, "search")) {
			c->search = push(c->search, &c->nsearch, fields[0], 0);
		} else if (!strcmp(key, "net")) {
			struct iface ifc = {.name = fields[0], .gateway = fields[2]};
			char *slash = strchr(fields[1], '/');
			if (!slash || parse_int(slash + 1, 0, 32, &v) < 0)
				return seterr(err, errlen, "run config line %d: bad address/prefix", lineno), -1;
			*slash = 0;
			ifc.addr = fields[1];
			ifc.prefix = (int)v;
			if (!strcmp(ifc.gateway, "-"))
				ifc.gateway = NULL;
			if (parse_int(fields[3], 68, 65535, &v) < 0)
				return seterr(err, errlen, "run config line %d: bad MTU", lineno), -1;
			ifc.mtu = (int)v;
			if (!*ifc.name || strlen(ifc.name) > 15)
				return seterr(err, errlen, "run config line %d: bad interface name", lineno), -1;
			c->ifaces = xrealloc(c->ifaces, sizeof(*c->ifaces) * (size_t)(c->nifaces + 1));
			c->ifaces[c->nifaces++] = ifc;
		} else if (!strcmp(key, "mount")) {
			struct vmount m = {fields[0], fields[1], fields[2], fields[3], NULL};
			if (m.source[0] != '/' || !good_mount_target(m.target))
				return seterr(err, errlen, "run config line %d: bad mount paths", lineno), -1;
			if (strlen(m.options) > MOUNT_OPTIONS_MAX)
				return seterr(err, errlen, "run config line %d: mount options longer than %d bytes",
				              lineno, MOUNT_OPTIONS_MAX), -1;
			c->mounts = xrealloc(c->mounts, sizeof(*c->mounts) * (size_t)(c->nmounts + 1));
			c->mounts[c->nmounts++] = m;
		} else if (!strcmp(key, "stop_signal")) {
			if (parse_int(f0, 1, 64, &v) < 0)
				return seterr(err, errlen, "run config: bad stop_signal"), -1;
			c->stop_signal = (int)v;
		} else if (!strcmp(key, "stop_timeout")) {
			if (parse_int(f0, 0, 86400, &v) < 0)
				return seterr(err, errlen, "run config: bad stop_timeout"), -1;
			c->stop_timeout = (int)v;
		} else if (!strcmp(key, "root")) {
			if (strncmp(fields[0], "/dev/", 5) != 0 || !*fields[1])
				return seterr(err, errlen, "run config: bad root device"), -1;
			if (strlen(fields[2]) > MOUNT_OPTIONS_MAX)
				return seterr(err, errlen, "run config: root mount options longer than %d bytes",
				              MOUNT_OPTIONS_MAX), -1;
			c->root_dev = fields[0];
			c->root_fstype = fields[1];
			c->root_opts = fields[2];
		} else if (!strcmp(key, "module")) {
			if (!*f0 || strchr(f0, '/') || f0[0] == '.')
				return seterr(err, errlen, "run config: bad module name"), -1;
			c->modules = push(c->modules, &c->nmodules, fields[0], 0);
		} else if (!strcmp(key, "nofile")) {
			if (parse_int(f0, 64, 1L << 30, &v) < 0)
				return seterr(err, errlen, "run config: bad nofile"), -1;
			c->nofile = v;
		} else if (!strcmp(key, "exit_ack")) {
			if (parse_int(f0, 0, 60000, &v) < 0)
				return seterr(err, errlen, "run config: bad exit_ack"), -1;
			c->exit_ack_ms = (int)v;
		} else if (!strcmp(key, "template")) {
			c->template = 1;
		} else if (!strcmp(key, "stdin")) {
			c->open_stdin = 1;
		} else if (!strcmp(key, "tty")) {
			long cols;
			if (parse_int(f0, 0, 65535, &v) < 0 || parse_int(fields[1], 0, 65535, &cols) < 0)
				return seterr(err, errlen, "run config: bad tty size"), -1;
			c->tty = 1;
			c->tty_rows = (int)v;
			c->tty_cols = (int)cols;
		} else if (!strcmp(key, "late")) {
			if (!*f0 || strchr(f0, '/') || f0[0] == '.')
				return seterr(err, errlen, "run config: bad module name"), -1;
			c->late = push(c->late, &c->nlate, fields[0], 0);
		} else if (!strcmp(key, "clock")) {
			long ns;
			/* seconds since the epoch (10 digits covers until 2286), then nanoseconds */
			if (parse_int(f0, 0, 9999999999L, &v) < 0 || parse_int(fields[1], 0, 999999999, &ns) < 0)
				return seterr(err, errlen, "run config: bad clock"), -1;
			c->clock_sec = v;
			c->clock_nsec = ns;
			c->have_clock = 1;
		} else if (!strcmp(key, "seed")) {
			size_t n = strlen(f0);
			if (n < 32 || n > SEED_MAX_HEX || n % 2 || strspn(f0, "0123456789abcdef") != n)
				return seterr(err, errlen, "run config: bad seed"), -1;
			c->seed = fields[0];
		} else if (!strcmp(key, "mac")) {
			unsigned b[6];
			char tail;
			if (sscanf(fields[1], "%2x:%2x:%2x:%2x:%2x:%2x%c", &b[0], &b[1], &b[2], &b[3],
			           &b[4], &b[5], &tail) != 6 || strlen(fields[1]) != 17)
				return seterr(err, errlen, "run config line %d: bad MAC address", lineno), -1;
			c->macs = xrealloc(c->macs, sizeof(*c->macs) * (size_t)(c->nmacs + 1));
			struct macaddr *m = &c->macs[c->nmacs++];
			m->iface = fields[0];
			for (int i = 0; i < 6; i++)
				m->addr[i] = (unsigned char)b[i];
		}
	}
	if (!ended)
		return seterr(err, errlen, "run config is truncated (no end record)"), -1;
	/* a template's config is only what the boot before the restore needs */
	if (c->argc == 0 && !c->template)
		return seterr(err, errlen, "run config has no command (no arg records)"), -1;
	if (!c->env) {
		c->env = xrealloc(NULL, sizeof(char *) * 4);
		c->env[0] = NULL;
	}
	return 0;
}
