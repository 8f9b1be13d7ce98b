/* Docker's user resolution, from the image's own /etc/passwd and /etc/group
 * (never the host's NSS: CVE-2019-14271).  A numeric user or group is always an
 * ID, even when a name like it exists (CVE-2016-3697); an unknown name is an error.
 * Supplementary groups come from /etc/group only when no group was given. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "init.h"

/* A stretch of an image's passwd or group file: NUL is a byte like any other there (runc
 * reads them as Go byte slices), so nothing in them is a C string. */
struct span {
	const char *p;
	size_t n;
};

static int span_is(struct span s, const char *str)
{
	return s.n == strlen(str) && !memcmp(s.p, str, s.n);
}

static char *span_dup(struct span s)
{
	char *d = xrealloc(NULL, s.n + 1);
	memcpy(d, s.p, s.n);
	d[s.n] = 0;
	return d;
}

static int numeric_n(const char *s, size_t n, unsigned long *out)
{
	if (n == 0 || n > 10)
		return 0;
	unsigned long v = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] < '0' || s[i] > '9')
			return 0;
		v = v * 10 + (unsigned long)(s[i] - '0');
	}
	if (v > 0x7fffffffUL)
		return 0;
	*out = v;
	return 1;
}

static int numeric(const char *s, unsigned long *out)
{
	return numeric_n(s, strlen(s), out);
}

/* Length of the white space (Go's unicode.IsSpace, which runc's bytes.TrimSpace uses) that
 * starts at p (forward) or ends at p + n (backward), 0 when there is none.  ASCII's is
 * \t \n \v \f \r and space; the others are UTF-8 sequences of U+0085, U+00A0, U+1680,
 * U+2000..U+200A, U+2028, U+2029, U+202F, U+205F and U+3000. */
static size_t space_len(const unsigned char *p, size_t n, int backward)
{
	static const char *const wide[] = {
	    "\xc2\x85", "\xc2\xa0", "\xe1\x9a\x80", "\xe2\x80\xa8", "\xe2\x80\xa9",
	    "\xe2\x80\xaf", "\xe2\x81\x9f", "\xe3\x80\x80",
	};
	if (n == 0)
		return 0;
	unsigned char c = backward ? p[n - 1] : p[0];
	if (c == ' ' || (c >= '\t' && c <= '\r'))
		return 1;
	for (size_t i = 0; i < sizeof(wide) / sizeof(wide[0]); i++) {
		size_t k = strlen(wide[i]);
		if (k <= n && !memcmp(backward ? p + n - k : p, wide[i], k))
			return k;
	}
	/* U+2000..U+200A: e2 80 80..8a */
	if (n < 3)
		return 0;
	const unsigned char *q = backward ? p + n - 3 : p;
	if (q[0] == 0xe2 && q[1] == 0x80 && q[2] >= 0x80 && q[2] <= 0x8a)
		return 3;
	return 0;
}

/* The next line of a passwd or group file at *pos (the data is len bytes, NULs and all),
 * trimmed of surrounding white space as runc trims it (a CRLF line's '\r' with it).
 * 0 at the end. */
static int next_line(const char *data, size_t len, size_t *pos, struct span *line)
{
	if (*pos >= len)
		return 0;
	const char *start = data + *pos;
	const char *nl = memchr(start, '\n', len - *pos);
	size_t n = nl ? (size_t)(nl - start) : len - *pos;
	*pos += n + (nl ? 1 : 0);
	size_t k;
	while ((k = space_len((const unsigned char *)start, n, 0)) > 0) {
		start += k;
		n -= k;
	}
	while ((k = space_len((const unsigned char *)start, n, 1)) > 0)
		n -= k;
	*line = (struct span){start, n};
	return 1;
}

/* Split a line on every ':' into at most n fields, as runc does (fields past the n-th are
 * ignored; a group line's extra field is not part of its member list).  Returns the
 * count of fields the line has; the missing ones are empty (runc takes a passwd line
 * without its shell, a group line without its member list). */
static int split(struct span line, struct span *f, int n)
{
	int count = 0;
	const char *p = line.p, *end = line.p + line.n;
	for (;;) {
		const char *colon = memchr(p, ':', (size_t)(end - p));
		const char *stop = colon ? colon : end;
		if (count < n)
			f[count] = (struct span){p, (size_t)(stop - p)};
		count++;
		if (!colon)
			break;
		p = colon + 1;
	}
	for (int i = count; i < n; i++)
		f[i] = (struct span){end, 0};
	return count;
}

/* Largest passwd or group file read: init's memory is locked (main.c, pin_memory), in a
 * guest that may have 128 MiB.  A larger one is refused rather than read in part: an
 * entry past the part read would be missed (a numeric user then gets gid 0). */
#define DB_MAX_SIZE (1 << 20)

/* The image's passwd or group file into *data (NULL when it has none, or one that is not
 * a regular file: a FIFO would hang init, so it counts as absent).  -1 with the message
 * when it is too large to be read. */
static int read_db(const char *path, char **data, size_t *len, char *err, size_t errlen)
{
	*len = 0;
	*data = read_file(path, DB_MAX_SIZE, len);
	if (*data)
		return 0;
	if (errno == EINVAL)
		logmsg("%s is not a regular file: ignored", path);
	if (errno == EFBIG) {
		snprintf(err, errlen, "%s is larger than %d MiB: not reading it", path,
		         DB_MAX_SIZE >> 20);
		return -1;
	}
	return 0;
}

struct pwent {
	struct span name, home;
	unsigned long uid, gid;
};

/* Find a passwd entry by name (when name != NULL) or by uid. */
static int find_passwd(const char *data, size_t len, const char *name, unsigned long uid,
                       struct pwent *out)
{
	size_t pos = 0;
	struct span line;
	while (next_line(data, len, &pos, &line)) {
		struct span f[7];
		if (line.n == 0 || line.p[0] == '#' || split(line, f, 7) < 6)
			continue;
		unsigned long u, g;
		if (!numeric_n(f[2].p, f[2].n, &u) || !numeric_n(f[3].p, f[3].n, &g))
			continue;
		if (name ? span_is(f[0], name) : u == uid) {
			*out = (struct pwent){f[0], f[5], u, g};
			return 1;
		}
	}
	return 0;
}

int resolve_user(const char *spec, const char *passwd_path, const char *group_path,
                 struct exec_user *out, char *err, size_t errlen)
{
	memset(out, 0, sizeof(*out));
	char userpart[256], *grouppart = NULL;
	if (strlen(spec) >= sizeof(userpart)) {
		snprintf(err, errlen, "user '%.40s...' is too long", spec);
		return -1;
	}
	strcpy(userpart, spec);
	char *colon = strchr(userpart, ':');
	if (colon) {
		*colon = 0;
		grouppart = colon + 1;
	}
	char *passwd;
	size_t plen;
	if (read_db(passwd_path, &passwd, &plen, err, errlen) < 0)
		return -1;
	struct pwent pw;
	int matched = 0;
	unsigned long id;
	if (userpart[0] == 0) {
		/* no user: root, with its passwd entry if the image has one */
		matched = passwd && find_passwd(passwd, plen, NULL, 0, &pw);
		out->uid = 0;
	} else if (numeric(userpart, &id)) {
		matched = passwd && find_passwd(passwd, plen, NULL, id, &pw);
		out->uid = (uid_t)id;
	} else {
		matched = passwd && find_passwd(passwd, plen, userpart, 0, &pw);
		if (!matched) {
			snprintf(err, errlen, "unable to find user %s: no matching entries in passwd file",
			         userpart);
			free(passwd);
			return -1;
		}
		out->uid = (uid_t)pw.uid;
	}
	out->gid = matched ? (gid_t)pw.gid : 0;
	/* (a home with a NUL byte, which no environment can hold, ends there) */
	out->home = matched && pw.home.n && pw.home.p[0] ? span_dup(pw.home) : NULL;
	/* the name as it is in passwd (NULs and all), kept past the free */
	struct span pwname = {matched ? span_dup(pw.name) : NULL, matched ? pw.name.n : 0};
	free(passwd);

	if (grouppart && numeric(grouppart, &id)) {
		out->gid = (gid_t)id;
		free((char *)pwname.p);
		return 0;
	}
	if (!grouppart && !matched)
		return 0;
	char *group;
	size_t glen;
	if (read_db(group_path, &group, &glen, err, errlen) < 0) {
		free((char *)pwname.p);
		return -1;
	}
	int found = 0;
	size_t pos = 0;
	struct span line;
	while (group && next_line(group, glen, &pos, &line)) {
		struct span f[4];
		unsigned long g;
		if (line.n == 0 || line.p[0] == '#' || split(line, f, 4) < 3 ||
		    !numeric_n(f[2].p, f[2].n, &g))
			continue;
		if (grouppart) {
			if (span_is(f[0], grouppart)) {
				out->gid = (gid_t)g;
				found = 1;
				break;
			}
			continue;
		}
		/* implicit form: every group listing the user is a supplementary group (an empty
		 * member, "a,,b", is nobody) */
		const char *m = f[3].p, *end = f[3].p + f[3].n;
		while (pwname.n && m < end) {
			const char *comma = memchr(m, ',', (size_t)(end - m));
			const char *stop = comma ? comma : end;
			if ((size_t)(stop - m) == pwname.n && !memcmp(m, pwname.p, pwname.n)) {
				out->groups = xrealloc(out->groups, sizeof(gid_t) * (size_t)(out->ngroups + 1));
				out->groups[out->ngroups++] = (gid_t)g;
				break;
			}
			if (!comma)
				break;
			m = comma + 1;
		}
	}
	free(group);
	free((char *)pwname.p);
	if (grouppart && !found) {
		snprintf(err, errlen, "unable to find group %s: no matching entries in group file",
		         grouppart);
		return -1;
	}
	return 0;
}

/* The name of UID in the passwd database at PATH (0), or -1 (then OUT is the number). */
int uid_name(const char *path, unsigned long uid, char *out, size_t outlen)
{
	char *data, err[128];
	size_t len;
	struct pwent pw;
	int found = read_db(path, &data, &len, err, sizeof(err)) == 0 &&
	            find_passwd(data, len, NULL, uid, &pw) && pw.name.n > 0 && pw.name.n < outlen;
	if (found)
		snprintf(out, outlen, "%.*s", (int)pw.name.n, pw.name.p);
	else
		snprintf(out, outlen, "%lu", uid);
	if (data)
		free(data);
	return found ? 0 : -1;
}
