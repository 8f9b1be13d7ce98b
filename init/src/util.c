/* Small helpers: logging to the console, allocation, files, time. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "init.h"

int log_fd = 2;

size_t append(char *buf, size_t size, size_t at, const char *fmt, ...)
{
	if (size == 0)
		return 0;
	if (at >= size)
		return size - 1;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(buf + at, size - at, fmt, ap);
	va_end(ap);
	if (n < 0)
		return at;
	/* vsnprintf returns what it would have written: the end is where it stopped */
	return at + (size_t)n < size ? at + (size_t)n : size - 1;
}

void logmsg(const char *fmt, ...)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), "ember-init: ");
	va_list ap;
	va_start(ap, fmt);
	n += vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	/* best effort: the console is the only place this can go */
	ssize_t w = write(log_fd, buf, (size_t)n);
	(void)w;
}

void *xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q) {
		logmsg("out of memory");
		_exit(EXIT_INIT_FAILED);
	}
	return q;
}

char *xstrdup(const char *s)
{
	size_t n = strlen(s) + 1;
	return memcpy(xrealloc(NULL, n), s, n);
}

int mkdir_p(const char *path, mode_t mode)
{
	char buf[4096];
	if (strlen(path) >= sizeof(buf))
		return errno = ENAMETOOLONG, -1;
	strcpy(buf, path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		if (mkdir(buf, mode) < 0 && errno != EEXIST)
			return -1;
		*p = '/';
	}
	if (mkdir(buf, mode) < 0 && errno != EEXIST)
		return -1;
	struct stat st;
	if (stat(buf, &st) < 0)
		return -1;
	if (!S_ISDIR(st.st_mode))
		return errno = ENOTDIR, -1;
	return 0;
}

/* Create the directory PATH (absolute) and what is missing on the way, the way Docker
 * creates a WorkingDir: symlinks are resolved inside the current root (init has
 * chrooted into the image by then), one component at a time, so a link whose target
 * does not exist yet (`/app -> /srv/app`, `/app -> srv/app`) gets its target created
 * instead of failing with EEXIST.  An absolute target starts again from the root, a
 * relative one from the link's directory; ".." never goes above "/".  At most
 * MAX_LINKS links are followed (the kernel's limit): ELOOP beyond.  Anything on the way
 * that is not a directory (a file, a link to one) is ENOTDIR.  Directories are created
 * with MODE (less the umask) and init's owner, as mkdir_p's.  On failure, AT (when
 * given) holds the path inside the root where the walk stopped. */
#define MAX_LINKS 40
int mkdir_in_root(const char *path, mode_t mode, char *at, size_t atlen)
{
	char done[4096] = "";        /* resolved so far, every component a directory; "" is / */
	char todo[4096], next[4096]; /* what is left to walk */
	char target[4096];           /* a link's (a truncated one is ENAMETOOLONG below) */
	size_t dlen = 0;
	int links = 0, e;
	if (strlen(path) >= sizeof(todo)) {
		if (at && atlen)
			snprintf(at, atlen, "%s", path);
		return errno = ENAMETOOLONG, -1;
	}
	strcpy(todo, path);
	const char *p = todo;
	for (;;) {
		while (*p == '/')
			p++;
		if (!*p) {
			if (at && atlen)
				snprintf(at, atlen, "%s", done[0] ? done : "/");
			return 0;
		}
		size_t n = strcspn(p, "/");
		if (n == 1 && p[0] == '.') {
			p += n;
			continue;
		}
		if (n == 2 && p[0] == '.' && p[1] == '.') {
			/* up one, never above the root */
			while (dlen > 0 && done[dlen - 1] != '/')
				dlen--;
			if (dlen > 0)
				dlen--;
			done[dlen] = 0;
			p += n;
			continue;
		}
		if (dlen + 1 + n >= sizeof(done)) {
			e = ENAMETOOLONG;
			goto fail;
		}
		done[dlen] = '/';
		memcpy(done + dlen + 1, p, n);
		done[dlen + 1 + n] = 0;
		p += n;
		struct stat st;
		if (lstat(done, &st) < 0) {
			if (errno != ENOENT || (mkdir(done, mode) < 0 && errno != EEXIST) ||
			    lstat(done, &st) < 0) {
				e = errno;
				goto fail;
			}
		}
		if (S_ISDIR(st.st_mode)) {
			dlen += 1 + n;
			continue;
		}
		if (!S_ISLNK(st.st_mode)) {
			e = ENOTDIR;
			goto fail;
		}
		if (++links > MAX_LINKS) {
			e = ELOOP;
			goto fail;
		}
		ssize_t tl = readlink(done, target, sizeof(target));
		if (tl < 0) {
			e = errno;
			goto fail;
		}
		if (tl == 0) { /* an empty link resolves to nothing, as for the kernel */
			e = ENOENT;
			goto fail;
		}
		/* the link's target, then what was left after the link */
		if ((size_t)tl + 1 + strlen(p) >= sizeof(next)) {
			e = ENAMETOOLONG;
			goto fail;
		}
		memcpy(next, target, (size_t)tl);
		next[tl] = '/';
		strcpy(next + tl + 1, p);
		strcpy(todo, next);
		p = todo;
		/* relative: from the link's directory (done without the link); absolute: the root */
		if (target[0] == '/')
			dlen = 0;
		done[dlen] = 0;
	}
fail:
	if (at && atlen)
		snprintf(at, atlen, "%s", done[0] ? done : "/");
	return errno = e, -1;
}

void walk_error(char *err, size_t errlen, const char *what, const char *path, const char *at,
                int e)
{
	size_t n = append(err, errlen, 0, "%s %s: ", what, path);
	/* where the walk stopped, when that is not the path itself: a link's target */
	if (strcmp(at, path))
		n = append(err, errlen, n, "%s: ", at);
	if (e == ELOOP)
		append(err, errlen, n, "too many levels of symbolic links (more than %d followed)",
		       MAX_LINKS);
	else
		append(err, errlen, n, "%s", strerror(e));
}

int write_file(const char *path, const char *data, size_t len, int flags, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | flags, mode);
	if (fd < 0)
		return -1;
	while (len > 0) {
		ssize_t w = write(fd, data, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			int e = errno;
			close(fd);
			return errno = e, -1;
		}
		data += w;
		len -= (size_t)w;
	}
	return close(fd);
}

int open_regular(const char *path, int flags, mode_t mode)
{
	/* look before opening: opening a device can do things of its own (a watchdog arms) */
	struct stat st;
	if (flags & O_NOFOLLOW) {
		if (lstat(path, &st) == 0 && !S_ISREG(st.st_mode))
			return errno = S_ISLNK(st.st_mode) ? ELOOP : EINVAL, -1;
	} else if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
		return errno = EINVAL, -1;
	}
	/* O_NONBLOCK: should it have become a FIFO meanwhile, the open must not wait for a
	 * writer (or reader); on a regular file the flag changes nothing */
	int fd = open(path, flags | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, mode);
	if (fd < 0)
		return -1;
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		return errno = EINVAL, -1;
	}
	return fd;
}

/* Read a whole (small) regular file; NUL-terminated.  NULL with errno set on failure or
 * if > max: EINVAL when it is not a regular file (a FIFO would block init). */
char *read_file(const char *path, size_t max, size_t *len)
{
	return read_file_flags(path, max, len, 0);
}

char *read_file_flags(const char *path, size_t max, size_t *len, int flags)
{
	int fd = open_regular(path, O_RDONLY | flags, 0);
	if (fd < 0)
		return NULL;
	size_t cap = 4096, n = 0;
	char *buf = xrealloc(NULL, cap + 1);
	for (;;) {
		if (n == cap) {
			if (cap >= max + 1) {
				free(buf);
				close(fd);
				return errno = EFBIG, NULL;
			}
			/* never more than max + 1 (what tells a file too large): init's memory
			 * is locked, and a 1 MiB limit must not cost 2 MiB */
			cap = cap * 2 > max + 1 ? max + 1 : cap * 2;
			buf = xrealloc(buf, cap + 1);
		}
		ssize_t r = read(fd, buf + n, cap - n);
		if (r < 0) {
			if (errno == EINTR)
				continue;
			int e = errno;
			free(buf);
			close(fd);
			return errno = e, NULL;
		}
		if (r == 0)
			break;
		n += (size_t)r;
	}
	close(fd);
	if (n > max) {
		free(buf);
		return errno = EFBIG, NULL;
	}
	buf[n] = 0;
	if (len)
		*len = n;
	return buf;
}

/* 1 if the directory is missing or empty, 0 if it has entries. */
int dir_is_empty(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		return 1;
	struct dirent *e;
	int empty = 1;
	while ((e = readdir(d))) {
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
			empty = 0;
			break;
		}
	}
	closedir(d);
	return empty;
}

void msleep(int ms)
{
	struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}
