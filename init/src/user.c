/* Docker's user resolution, from the image's own /etc/passwd and /etc/group
 * (never the host's NSS: CVE-2019-14271).  A numeric user or group is always an
 * ID, even when a name like it exists (CVE-2016-3697); an unknown name is an error.
 * Supplementary groups come from /etc/group only when no group was given. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "init.h"

static int numeric(const char *s, unsigned long *out)
{
	if (!*s || strlen(s) > 10)
		return 0;
	for (const char *p = s; *p; p++)
		if (*p < '0' || *p > '9')
			return 0;
	unsigned long v = strtoul(s, NULL, 10);
	if (v > 0x7fffffffUL)
		return 0;
	*out = v;
	return 1;
}

/* Split a colon-separated line into at most n fields (in place). Returns the count of
 * fields the line has; the missing ones are set to "" (runc takes a passwd line without
 * its shell, a group line without its member list). */
static int split(char *line, char **f, int n)
{
	int i = 0;
	f[i++] = line;
	char *p = line;
	for (; *p && i < n; p++)
		if (*p == ':') {
			*p = 0;
			f[i++] = p + 1;
		}
	int count = i;
	p += strlen(p); /* the line's final NUL: an empty string */
	while (i < n)
		f[i++] = p;
	return count;
}

/* The next line of a passwd or group file, without the '\r' of a file with CRLF line
 * endings (else the last field keeps it, and a member "app\r" is never "app"). */
static char *next_line(char *data, char **save)
{
	char *line = strtok_r(data, "\n", save);
	size_t len = line ? strlen(line) : 0;
	if (len > 0 && line[len - 1] == '\r')
		line[len - 1] = 0;
	return line;
}

/* The image's passwd or group file, NULL when it has none (or one that is not a
 * regular file: a FIFO would hang init, so it counts as absent). */
static char *read_db(const char *path)
{
	char *data = read_file(path, 16 << 20, NULL);
	if (!data && errno == EINVAL)
		logmsg("%s is not a regular file: ignored", path);
	return data;
}

struct pwent {
	char *name, *home;
	unsigned long uid, gid;
};

/* Find a passwd entry by name (when name != NULL) or by uid. */
static int find_passwd(char *data, const char *name, unsigned long uid, struct pwent *out)
{
	for (char *save = NULL, *line = next_line(data, &save); line; line = next_line(NULL, &save)) {
		char *f[7];
		if (line[0] == '#' || split(line, f, 7) < 6)
			continue;
		unsigned long u, g;
		if (!numeric(f[2], &u) || !numeric(f[3], &g))
			continue;
		if (name ? strcmp(f[0], name) == 0 : u == uid) {
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
	char *passwd = read_db(passwd_path);
	struct pwent pw;
	int matched = 0;
	unsigned long id;
	if (userpart[0] == 0) {
		/* no user: root, with its passwd entry if the image has one */
		matched = passwd && find_passwd(passwd, NULL, 0, &pw);
		out->uid = 0;
	} else if (numeric(userpart, &id)) {
		matched = passwd && find_passwd(passwd, NULL, id, &pw);
		out->uid = (uid_t)id;
	} else {
		matched = passwd && find_passwd(passwd, userpart, 0, &pw);
		if (!matched) {
			snprintf(err, errlen, "unable to find user %s: no matching entries in passwd file",
			         userpart);
			free(passwd);
			return -1;
		}
		out->uid = (uid_t)pw.uid;
	}
	out->gid = matched ? (gid_t)pw.gid : 0;
	out->home = matched && pw.home[0] ? xstrdup(pw.home) : NULL;
	char *pwname = matched ? xstrdup(pw.name) : NULL;
	free(passwd);

	if (grouppart && numeric(grouppart, &id)) {
		out->gid = (gid_t)id;
		free(pwname);
		return 0;
	}
	if (!grouppart && !pwname)
		return 0;
	char *group = read_db(group_path);
	int found = 0;
	for (char *save = NULL, *line = group ? next_line(group, &save) : NULL; line;
	     line = next_line(NULL, &save)) {
		char *f[4];
		unsigned long g;
		if (line[0] == '#' || split(line, f, 4) < 3 || !numeric(f[2], &g))
			continue;
		if (grouppart) {
			if (!strcmp(f[0], grouppart)) {
				out->gid = (gid_t)g;
				found = 1;
				break;
			}
			continue;
		}
		/* implicit form: every group listing the user is a supplementary group */
		for (char *s2 = NULL, *m = strtok_r(f[3], ",", &s2); m; m = strtok_r(NULL, ",", &s2)) {
			if (!strcmp(m, pwname)) {
				out->groups = xrealloc(out->groups, sizeof(gid_t) * (size_t)(out->ngroups + 1));
				out->groups[out->ngroups++] = (gid_t)g;
				break;
			}
		}
	}
	free(group);
	free(pwname);
	if (grouppart && !found) {
		snprintf(err, errlen, "unable to find group %s: no matching entries in group file",
		         grouppart);
		return -1;
	}
	return 0;
}
