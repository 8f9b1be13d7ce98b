/* Kernel modules, the root disk and switch_root, pseudo file systems, volumes. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "init.h"

#define PROC_MAGIC 0x9fa0
#define SYSFS_MAGIC 0x62656572
#define TMPFS_MAGIC 0x01021994
#define DEVPTS_MAGIC 0x1cd1
#define MQUEUE_MAGIC 0x19800202
#define CGROUP2_MAGIC 0x63677270

static int load_one(const char *dir, const char *name)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/%s.ko", dir, name);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		logmsg("module %s: %s", name, strerror(errno));
		return -1;
	}
	long long t0 = now_ms();
	long r = syscall(SYS_finit_module, fd, "", 0);
	int e = errno;
	if (getenv("EMBER_INIT_TIMING"))
		logmsg("module %s: %lld ms", name, now_ms() - t0);
	close(fd);
	/* the initramfs copy is no longer needed: give its memory back */
	unlink(path);
	if (r < 0 && e != EEXIST) {
		logmsg("module %s: %s", name, strerror(e));
		return -1;
	}
	return 0;
}

/* Load the modules listed (in order) in DIR/order, then the run config's extras. */
static int listed(const char *name, char **names, int n)
{
	for (int i = 0; i < n; i++)
		if (!strcmp(name, names[i]))
			return 1;
	return 0;
}

int load_modules(const char *dir, char **extra, int nextra, char **skip, int nskip)
{
	char path[512];
	snprintf(path, sizeof(path), "%s/order", dir);
	char *list = read_file(path, 1 << 16, NULL);
	int failed = 0;
	if (list) {
		for (char *save = NULL, *name = strtok_r(list, "\n", &save); name;
		     name = strtok_r(NULL, "\n", &save))
			if (*name && !listed(name, skip, nskip) && load_one(dir, name) < 0)
				failed++;
		free(list);
	}
	for (int i = 0; i < nextra; i++)
		if (!listed(extra[i], skip, nskip) && load_one(dir, extra[i]) < 0)
			failed++;
	return failed ? -1 : 0;
}

/* Load these modules now, in this order (a template's late ones, after a restore). */
int load_named(const char *dir, char **names, int n)
{
	int failed = 0;
	for (int i = 0; i < n; i++)
		if (load_one(dir, names[i]) < 0)
			failed++;
	return failed ? -1 : 0;
}

int wait_for_path(const char *path, int timeout_ms)
{
	long long deadline = now_ms() + timeout_ms;
	while (access(path, F_OK) < 0) {
		if (now_ms() >= deadline)
			return -1;
		msleep(5);
	}
	return 0;
}

struct flagname {
	const char *name;
	unsigned long set, clear;
};
static const struct flagname FLAGS[] = {
	{"defaults", 0, 0},        {"rw", 0, MS_RDONLY},       {"ro", MS_RDONLY, 0},
	{"nosuid", MS_NOSUID, 0},  {"suid", 0, MS_NOSUID},     {"nodev", MS_NODEV, 0},
	{"dev", 0, MS_NODEV},      {"noexec", MS_NOEXEC, 0},   {"exec", 0, MS_NOEXEC},
	{"sync", MS_SYNCHRONOUS, 0}, {"async", 0, MS_SYNCHRONOUS}, {"noatime", MS_NOATIME, 0},
	{"nodiratime", MS_NODIRATIME, 0}, {"relatime", MS_RELATIME, 0}, {"dirsync", MS_DIRSYNC, 0},
};

/* mount(2) with an fstab-style option string: known flags become MS_*, the rest is data.
 * Options longer than MOUNT_OPTIONS_MAX are E2BIG, never cut (a trailing "ro" would be
 * lost); the config parser refuses them first.  The data is never longer than them. */
int mount_with_options(const char *src, const char *target, const char *fstype, const char *opts)
{
	unsigned long flags = 0;
	char data[MOUNT_OPTIONS_MAX + 1] = "", copy[MOUNT_OPTIONS_MAX + 1];
	if (!opts)
		opts = "";
	if (strlen(opts) > MOUNT_OPTIONS_MAX)
		return errno = E2BIG, -1;
	strcpy(copy, opts);
	for (char *save = NULL, *o = strtok_r(copy, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
		size_t i;
		for (i = 0; i < sizeof(FLAGS) / sizeof(FLAGS[0]); i++)
			if (!strcmp(o, FLAGS[i].name))
				break;
		if (i < sizeof(FLAGS) / sizeof(FLAGS[0])) {
			flags = (flags & ~FLAGS[i].clear) | FLAGS[i].set;
		} else {
			size_t n = strlen(data);
			snprintf(data + n, sizeof(data) - n, "%s%s", n ? "," : "", o);
		}
	}
	return mount(src, target, fstype, flags, data[0] ? data : NULL);
}

/* Init's own mount points in the image must not be symbolic links: mkdir and mount follow
 * them, before switch_root relative to the initramfs's root (an image's `/dev -> /ember`
 * moved /dev there), and runc refuses a symlinked /proc or /sys as well.  -1 with the
 * message when PATH (SHOWN in the message) is one. */
static int refuse_symlink(const char *path, const char *shown, char *err, size_t errlen)
{
	struct stat st;
	if (lstat(path, &st) < 0 || !S_ISLNK(st.st_mode))
		return 0;
	snprintf(err, errlen, "the image's %s is a symbolic link: it must be a directory (%s is "
	         "mounted there)", shown, shown);
	return -1;
}

int mount_root_and_switch(const struct config *c, char *err, size_t errlen)
{
	if (wait_for_path(c->root_dev, 10000) < 0) {
		snprintf(err, errlen, "root device %s did not appear", c->root_dev);
		return -1;
	}
	mkdir("/newroot", 0755);
	if (mount_with_options(c->root_dev, "/newroot", c->root_fstype, c->root_opts) < 0) {
		snprintf(err, errlen, "cannot mount root device %s (%s): %s", c->root_dev,
		         c->root_fstype, strerror(errno));
		return -1;
	}
	/* carry the already-mounted /dev and /sys over; the rest is mounted afresh */
	static const char *moves[] = {"dev", "sys"};
	for (size_t i = 0; i < 2; i++) {
		char src[32], dst[64];
		snprintf(src, sizeof(src), "/%s", moves[i]);
		snprintf(dst, sizeof(dst), "/newroot/%s", moves[i]);
		if (refuse_symlink(dst, src, err, errlen) < 0)
			return -2;
		if (mkdir_p(dst, 0755) < 0 || mount(src, dst, NULL, MS_MOVE, NULL) < 0) {
			snprintf(err, errlen, "cannot move %s into the root disk: %s", src, strerror(errno));
			return -1;
		}
	}
	if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0) {
		snprintf(err, errlen, "switch_root failed: %s", strerror(errno));
		return -1;
	}
	return 0;
}

/* Already mounted: a mount point (its device differs from its parent's) of this type.
 * The magic alone is not enough: devtmpfs reports tmpfs's, so /dev/shm would match. */
static int is_fs(const char *path, long magic)
{
	struct statfs s;
	struct stat here, parent;
	char up[4200];
	snprintf(up, sizeof(up), "%s/..", path);
	return statfs(path, &s) == 0 && (long)s.f_type == magic && stat(path, &here) == 0 &&
	       stat(up, &parent) == 0 && here.st_dev != parent.st_dev;
}

static void mnt(const char *src, const char *target, const char *fstype, unsigned long flags,
                const char *data, long magic)
{
	if (mkdir_p(target, 0755) < 0) {
		logmsg("cannot create %s: %s", target, strerror(errno));
		return;
	}
	if (magic && is_fs(target, magic))
		return;
	if (mount(src, target, fstype, flags, data) < 0 && errno != EBUSY)
		logmsg("mount %s on %s: %s", fstype, target, strerror(errno));
}

static void dev_symlink(const char *target, const char *link)
{
	if (symlink(target, link) < 0 && errno != EEXIST)
		logmsg("symlink %s: %s", link, strerror(errno));
}

/* What Linux programs expect.  Standard pseudo file systems are mounted even over
 * what the image ships there (Docker does too); /run only when the image's is an
 * empty directory, so an image that ships files in /run, or a link there, keeps them
 * (Docker mounts nothing at /run).  -1 with the message when the image has a symbolic
 * link at /dev, /proc or /sys: the start fails, as runc's does for /proc and /sys (the
 * submounts are inside file systems init mounted). */
int mount_pseudo(char *err, size_t errlen)
{
	const unsigned long std = MS_NOSUID | MS_NODEV | MS_NOEXEC;
	static const char *own[] = {"/dev", "/proc", "/sys"};
	for (size_t i = 0; i < sizeof(own) / sizeof(own[0]); i++)
		if (refuse_symlink(own[i], own[i], err, errlen) < 0)
			return -1;
	mnt("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755", TMPFS_MAGIC);
	mnt("proc", "/proc", "proc", std, NULL, PROC_MAGIC);
	mnt("sysfs", "/sys", "sysfs", std, NULL, SYSFS_MAGIC);
	mnt("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
	    "newinstance,ptmxmode=0666,mode=0620,gid=5", DEVPTS_MAGIC);
	mnt("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777", TMPFS_MAGIC);
	mnt("mqueue", "/dev/mqueue", "mqueue", std, NULL, MQUEUE_MAGIC);
	struct stat run;
	int found = lstat("/run", &run) == 0;
	int missing = !found && errno == ENOENT;
	if (missing || (found && S_ISDIR(run.st_mode) && dir_is_empty("/run")))
		mnt("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755", TMPFS_MAGIC);
	if (access("/sys/fs/cgroup", F_OK) == 0)
		mnt("cgroup2", "/sys/fs/cgroup", "cgroup2", std, "nsdelegate", CGROUP2_MAGIC);
	dev_symlink("/proc/self/fd", "/dev/fd");
	dev_symlink("/proc/self/fd/0", "/dev/stdin");
	dev_symlink("/proc/self/fd/1", "/dev/stdout");
	dev_symlink("/proc/self/fd/2", "/dev/stderr");
	dev_symlink("/proc/kcore", "/dev/core");
	return 0;
}

/* Volumes, after switch_root (init is chrooted into the image).  A target is resolved
 * inside the image's root as Docker resolves it: its links, dangling ones too, are
 * followed there and what is missing is created (mkdir_in_root, as for the WorkingDir);
 * one that resolves to "/" is refused.  The mount goes through an O_PATH descriptor of
 * the directory resolved, so no path is looked up (and no link followed) again.
 * -2 (with the message) when the image is why a target cannot be made (it resolves to
 * "/", goes through a file, loops): the same start fails again; -1 otherwise. */
int mount_volumes(struct config *c, char *err, size_t errlen)
{
	for (int i = 0; i < c->nmounts; i++) {
		struct vmount *m = &c->mounts[i];
		if (!strncmp(m->source, "/dev/", 5) && wait_for_path(m->source, 5000) < 0) {
			snprintf(err, errlen, "volume device %s did not appear", m->source);
			return -1;
		}
		char at[4096], via[64];
		if (mkdir_in_root(m->target, 0755, at, sizeof(at)) < 0) {
			int e = errno;
			walk_error(err, errlen, "cannot create volume target", m->target, at, e);
			return e == ENOTDIR || e == ELOOP || e == ENAMETOOLONG || e == EEXIST ? -2 : -1;
		}
		if (!strcmp(at, "/")) {
			snprintf(err, errlen, "volume target %s resolves to /: not mounting over the root",
			         m->target);
			return -2;
		}
		int fd = open(at, O_PATH | O_NOFOLLOW | O_DIRECTORY | O_CLOEXEC);
		if (fd >= 0)
			snprintf(via, sizeof(via), "/proc/self/fd/%d", fd);
		if (fd < 0 || mount_with_options(m->source, via, m->fstype, m->options) < 0) {
			int e = errno;
			snprintf(err, errlen, "cannot mount %s on %s: %s", m->source, at,
			         e == E2BIG ? "mount options too long" : strerror(e));
			if (fd >= 0)
				close(fd);
			return -1;
		}
		close(fd);
		m->resolved = xstrdup(at);
	}
	return 0;
}

/* Reverse order; a busy volume gets retries before it is detached. */
void unmount_volumes(const struct config *c)
{
	for (int i = c->nmounts - 1; i >= 0; i--) {
		/* where it was mounted, not its target: the program may have changed the links */
		const char *t = c->mounts[i].resolved;
		int tries;
		if (!t)
			continue;
		for (tries = 0; tries < 20; tries++) {
			if (umount2(t, UMOUNT_NOFOLLOW) == 0 || errno == EINVAL || errno == ENOENT)
				break;
			msleep(50);
		}
		if (tries == 20) {
			logmsg("volume %s still busy: detaching it", t);
			umount2(t, MNT_DETACH | UMOUNT_NOFOLLOW);
		}
	}
}
