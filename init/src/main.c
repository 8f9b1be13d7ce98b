/* ember-init: PID 1 of an ember micro-VM.  See init.h for the flow and
 * docs/guest.md for the channels.  `ember-init --test --config PATH` runs the
 * same config logic as PID 1 of a PID+mount namespace inside a chroot (no
 * modules, no root disk, exits instead of powering off): tests/vm/test_init_ns.py. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/random.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "init.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

enum { PORT_STDOUT, PORT_STDERR, PORT_STATUS, PORT_CONTROL, PORT_EXEC, NPORTS = PORT_EXEC + EXEC_PORTS };
static const char *PORT_NAMES[NPORTS] = {"org.ember.stdout", "org.ember.stderr",
                                         "org.ember.status", "org.ember.control",
                                         "org.ember.exec.0", "org.ember.exec.1",
                                         "org.ember.exec.2", "org.ember.exec.3"};

static struct {
	int test;
	const char *config_path, *control_path, *status_path, *exec_path;
	int ports[NPORTS];
	char port_dev[NPORTS][64]; /* the ports' device names (vportNpM): their debugfs files */
	long long sent_base[2];    /* stdout's and stderr's bytes_sent when the program started */
	int console_fd;
	struct config cfg;
	int have_cfg;
	/* in the program's child until its exec: the write end of a close-on-exec pipe
	 * that says why the program could not be started (an exec closes it unwritten):
	 * the errno (an int), then the message */
	int start_err_fd;
	char start_error[512];
	int start_errno;
	/* the program cannot be started with this image and config (a user, a workdir,
	 * an exec that fails): the report says so, and the host does not try again */
	int not_started;
} G = {.config_path = "/ember/config",
       .ports = {-1, -1, -1, -1, -1, -1, -1, -1},
       .sent_base = {-1, -1},
       .console_fd = 2,
       .start_err_fd = -1};

/* Best effort: a dead host side must not hang init.  On the non-blocking control port a
 * write fails with EAGAIN while this guest has not yet learnt that the host connected
 * (the port-open event can come after the host's first bytes): wait for it, a while. */
static void write_all(int fd, const char *s, size_t n)
{
	long long deadline = -1;
	while (n > 0) {
		ssize_t w = write(fd, s, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0 && errno == EAGAIN) {
			long long now = now_ms();
			if (deadline < 0)
				deadline = now + 10000;
			if (now >= deadline)
				return;
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			poll(&p, 1, 50);
			continue;
		}
		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

/* Boot-time marks on the console when the kernel command line has EMBER_INIT_TIMING=1
 * (the kernel hands such words to init as environment): where the guest's time goes. */
static int timing;
static void mark(const char *what)
{
	if (!timing)
		return;
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	logmsg("%ld.%03ld %s", (long)ts.tv_sec, ts.tv_nsec / 1000000, what);
}

/* ---- the end: report and power off -------------------------------------------------- */

static void kill_everything(void)
{
	/* kill(-1) from PID 1 reaches every other process of this VM (or namespace);
	 * from anything else it would reach the whole host, so never do that. */
	if (getpid() != 1)
		return;
	kill(-1, SIGKILL);
	long long deadline = now_ms() + 3000;
	while (now_ms() < deadline) {
		pid_t p = waitpid(-1, NULL, WNOHANG);
		if (p < 0 && errno == ECHILD)
			break;
		if (p <= 0)
			msleep(5);
	}
}

/* How many bytes the guest queued on a port for the host so far (virtio_console's
 * debugfs counter), -1 when it cannot tell.  The exit report carries what the program's
 * stdout and stderr ports queued, so that the host waits for exactly that much before
 * it lets the guest power off (a "quiet for a while" guess loses output under load). */
static long long port_sent(int i)
{
	static int debugfs;
	if (G.test || !G.port_dev[i][0])
		return -1;
	if (!debugfs && mkdir_p("/sys/kernel/debug", 0755) == 0)  /* once: mounts stack */
		debugfs = mount("debugfs", "/sys/kernel/debug", "debugfs",
		                MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) == 0;
	char path[128];
	snprintf(path, sizeof(path), "/sys/kernel/debug/virtio-ports/%s", G.port_dev[i]);
	char *text = read_file(path, 4096, NULL);
	long long n = -1;
	const char *at = text ? strstr(text, "bytes_sent: ") : NULL;
	if (at)
		n = strtoll(at + 12, NULL, 10);
	free(text);
	return n;
}

/* Length of the UTF-8 character at s (1-4 bytes), 0 when the bytes there are not one
 * (RFC 3629: no overlong forms, surrogates or code points past U+10FFFF), -1 when the
 * string ends inside one that was valid so far. */
static int utf8_len(const unsigned char *s)
{
	int n;
	unsigned char lo = 0x80, hi = 0xbf; /* the range of the second byte */
	if (s[0] < 0x80) {
		return 1;
	} else if (s[0] >= 0xc2 && s[0] <= 0xdf) {
		n = 2;
	} else if (s[0] >= 0xe0 && s[0] <= 0xef) {
		n = 3;
		if (s[0] == 0xe0)
			lo = 0xa0; /* overlong */
		if (s[0] == 0xed)
			hi = 0x9f; /* surrogates */
	} else if (s[0] >= 0xf0 && s[0] <= 0xf4) {
		n = 4;
		if (s[0] == 0xf0)
			lo = 0x90; /* overlong */
		if (s[0] == 0xf4)
			hi = 0x8f; /* past U+10FFFF */
	} else {
		return 0; /* a continuation byte, overlong 0xc0 0xc1, or past U+10FFFF */
	}
	for (int i = 1; i < n; i++) {
		if (!s[i])
			return -1;
		if (s[i] < (i == 1 ? lo : 0x80) || s[i] > (i == 1 ? hi : 0xbf))
			return 0;
	}
	return n;
}

/* Append the message as the body of a JSON string, stopping while the longest escape
 * (6 bytes) and the closing "}\n still fit.  The host refuses a report that is not
 * UTF-8, and the message may quote the image's bytes (a user name, a WORKDIR) or have
 * been cut at its buffer's end: a byte that is no UTF-8 becomes \u00XX (its Latin-1
 * reading), a character cut at the end is left out, and a whole one is never split. */
static size_t append_json_string(char *json, size_t size, size_t n, const char *msg)
{
	const unsigned char *p = (const unsigned char *)msg;
	while (*p && n < size - 16) {
		int len = utf8_len(p);
		if (len < 0)
			break;
		if (*p == '"' || *p == '\\')
			n = append(json, size, n, "\\%c", *p);
		else if (*p < 0x20 || len == 0)
			n = append(json, size, n, "\\u%04x", *p);
		else {
			memcpy(json + n, p, (size_t)len);
			n += (size_t)len;
		}
		p += len ? len : 1;
	}
	return n;
}

static void report(int exit_code, int sig, int oom, const char *error)
{
	char json[1024];
	size_t n = append(json, sizeof(json), 0, "{\"exit_code\": %d, \"signal\": ", exit_code);
	n = sig ? append(json, sizeof(json), n, "%d", sig) : append(json, sizeof(json), n, "null");
	n = append(json, sizeof(json), n, ", \"oom_killed\": %s", oom ? "true" : "false");
	if (G.not_started)
		n = append(json, sizeof(json), n, ", \"not_started\": true");
	long long out = port_sent(PORT_STDOUT), errs = port_sent(PORT_STDERR);
	if (G.sent_base[0] >= 0 && G.sent_base[1] >= 0 && out >= G.sent_base[0] &&
	    errs >= G.sent_base[1])
		n = append(json, sizeof(json), n, ", \"sent\": [%lld, %lld]",
		           out - G.sent_base[0], errs - G.sent_base[1]);
	if (error) {
		/* the message is ours, but may quote config values and the image's bytes */
		n = append(json, sizeof(json), n, ", \"error\": \"");
		n = append_json_string(json, sizeof(json), n, error);
		n = append(json, sizeof(json), n, "\"");
	}
	n = append(json, sizeof(json), n, "}\n");
	if (G.ports[PORT_STATUS] >= 0)
		write_all(G.ports[PORT_STATUS], json, (size_t)n);
	if (G.status_path)
		write_file(G.status_path, json, (size_t)n, O_TRUNC, 0644);
	if (sig)
		logmsg("killed by signal %d%s", sig, oom ? " (oom killed)" : "");
	else
		logmsg("exit code %d%s", exit_code, oom ? " (oom killed)" : "");
}

/* Read what the host sent on a control port, waiting for it: a port reads as EOF while no
 * host is connected, and as EAGAIN while one is but has sent nothing.  Returns the bytes
 * read, 0 when ``deadline`` (now_ms() time, < 0: none) passed first, -1 on an error. */
static ssize_t read_control(int fd, char *buf, size_t cap, long long deadline)
{
	while (deadline < 0 || now_ms() < deadline) {
		ssize_t n = read(fd, buf, cap);
		if (n > 0)
			return n;
		if (n < 0 && errno == EINTR)
			continue;
		if (n == 0) { /* nobody connected on the host side yet */
			msleep(2);
			continue;
		}
		if (errno != EAGAIN)
			return -1;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		poll(&p, 1, 10);
	}
	return 0;
}

/* The host answers the exit report with "bye" once it has taken everything the ports
 * still held (a host holding output back would otherwise lose it at power-off). */
static void await_bye(int ms)
{
	int fd = G.ports[PORT_CONTROL];
	if (fd < 0)
		return;
	char buf[64];
	size_t have = 0;
	long long deadline = now_ms() + ms;
	ssize_t n;
	while ((n = read_control(fd, buf + have, sizeof(buf) - 1 - have, deadline)) > 0) {
		have += (size_t)n;
		buf[have] = 0;
		if (strstr(buf, "bye\n"))
			return;
		if (have > 32) { /* keep a tail long enough to hold a split "bye\n" */
			memmove(buf, buf + have - 4, 4);
			have = 4;
		}
	}
	logmsg("no bye from the host after the exit report: powering off anyway");
}

/* Clean up, then report, then power off: the report comes last so that a host which
 * ends the VM as soon as it sees it finds the disks already clean. */
static __attribute__((noreturn)) void finish(int code, int sig, int oom, const char *error)
{
	kill_everything();
	attach_drain(5000); /* -t: what the terminal still holds, before the report counts it */
	if (G.have_cfg)
		unmount_volumes(&G.cfg);
	sync();
	/* leave the root disk clean for the next boot of a clone */
	if (!G.test && mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) == 0)
		sync();
	report(code, sig, oom, error);
	if (G.test)
		exit(code);
	if (G.have_cfg && G.cfg.exit_ack_ms > 0)
		await_bye(G.cfg.exit_ack_ms);
	reboot(RB_POWER_OFF);
	/* no ACPI power-off: a reset ends the VM too (QEMU -no-reboot, kernel reboot=t) */
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

static __attribute__((noreturn)) void fail(const char *msg)
{
	logmsg("error: %s", msg);
	finish(EXIT_INIT_FAILED, 0, 0, msg);
}

/* A failure of the image and config themselves (an unknown user, a working directory
 * that cannot be made): the same run would fail the same way again. */
static __attribute__((noreturn)) void fail_not_started(const char *msg)
{
	G.not_started = 1;
	fail(msg);
}

/* ---- host channels ---------------------------------------------------------------- */

static int has_virtio_console_device(void)
{
	DIR *d = opendir("/sys/bus/virtio/devices");
	if (!d)
		return 0;
	struct dirent *e;
	int found = 0;
	while (!found && (e = readdir(d))) {
		char path[300];
		snprintf(path, sizeof(path), "/sys/bus/virtio/devices/%s/device", e->d_name);
		char *id = read_file(path, 64, NULL);
		if (id && !strncmp(id, "0x0003", 6))
			found = 1;
		free(id);
	}
	closedir(d);
	return found;
}

/* Find the named virtio-serial ports and open them.  Returns how many were found. */
static int scan_ports(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return 0;
	struct dirent *e;
	int found = 0;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		char path[300];
		snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
		char *name = read_file(path, 256, NULL);
		if (!name)
			continue;
		name[strcspn(name, "\n")] = 0;
		for (int i = 0; i < NPORTS; i++) {
			if (strcmp(name, PORT_NAMES[i]) || G.ports[i] >= 0)
				continue;
			char dev[300];
			snprintf(dev, sizeof(dev), "/dev/%s", e->d_name);
			if (access(dev, F_OK) < 0) {
				/* no devtmpfs node (yet): make one from sysfs's MAJ:MIN */
				snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/dev", e->d_name);
				char *mm = read_file(path, 64, NULL);
				unsigned ma, mi;
				if (mm && sscanf(mm, "%u:%u", &ma, &mi) == 2)
					mknod(dev, S_IFCHR | 0600, makedev(ma, mi));
				free(mm);
			}
			int flags = i >= PORT_CONTROL ? O_RDWR | O_NONBLOCK : O_WRONLY;
			G.ports[i] = open(dev, flags | O_CLOEXEC | O_NOCTTY);
			if (strlen(e->d_name) < sizeof(G.port_dev[i]))
				memcpy(G.port_dev[i], e->d_name, strlen(e->d_name) + 1);
			if (G.ports[i] < 0)
				logmsg("open %s (%s): %s", dev, PORT_NAMES[i], strerror(errno));
		}
		free(name);
	}
	closedir(d);
	for (int i = 0; i < NPORTS; i++)
		found += G.ports[i] >= 0;
	return found;
}

static void open_ports(void)
{
	if (!has_virtio_console_device())
		return;
	/* port names arrive from the host asynchronously after the driver probes */
	long long deadline = now_ms() + 3000;
	while (scan_ports() < NPORTS && now_ms() < deadline)
		msleep(10);
	for (int i = 0; i < NPORTS; i++)
		if (G.ports[i] < 0)
			logmsg("port %s not found: using the console", PORT_NAMES[i]);
}

/* ---- applying the config ------------------------------------------------------------ */

/* Whether some non-comment line of a hosts file lists the name "localhost". */
static int names_localhost(const char *hosts)
{
	for (const char *line = hosts; line && *line;) {
		const char *end = strchrnul(line, '\n');
		const char *hash = memchr(line, '#', (size_t)(end - line));
		const char *stop = hash ? hash : end;
		for (const char *p = line; p + 9 <= stop; p++) {
			int start_ok = p == line || p[-1] == ' ' || p[-1] == '\t';
			int end_ok = p + 9 == stop || p[9] == ' ' || p[9] == '\t' || p[9] == '\r';
			if (start_ok && end_ok && !memcmp(p, "localhost", 9))
				return 1;
		}
		line = *end ? end + 1 : NULL;
	}
	return 0;
}

/* The comment that ends every line init adds to /etc/hosts (set_hostname_and_files). */
#define HOSTS_TAG "\t# ember"

/* Drop, in place, the lines of buf[0..len) that end with HOSTS_TAG (a line may end with
 * "\r\n" too); the length left, NUL-terminated. */
static size_t drop_tagged_lines(char *buf, size_t len)
{
	const size_t tag = sizeof(HOSTS_TAG) - 1;
	size_t out = 0;
	for (size_t at = 0; at < len;) {
		char *nl = memchr(buf + at, '\n', len - at);
		size_t next = nl ? (size_t)(nl - buf) + 1 : len;
		size_t end = nl ? next - 1 : len;
		if (end > at && buf[end - 1] == '\r')
			end--;
		if (!(end - at >= tag && !memcmp(buf + end - tag, HOSTS_TAG, tag))) {
			memmove(buf + out, buf + at, next - at);
			out += next - at;
		}
		at = next;
	}
	buf[out] = 0;
	return out;
}

/* Replace the file at path with data: a new file beside it (the old one's mode and owner
 * when it is a regular file, never a link's target's; else mode), renamed over it (over
 * a link, the link itself).  -1 with errno on failure. */
static int replace_file(const char *path, const char *data, size_t len, mode_t mode)
{
	char tmp[256];
	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.ember-new", path) >= sizeof(tmp))
		return errno = ENAMETOOLONG, -1;
	struct stat st;
	int had = lstat(path, &st) == 0 && S_ISREG(st.st_mode);
	unlink(tmp);
	if (write_file(tmp, data, len, O_TRUNC | O_EXCL | O_NOFOLLOW, had ? st.st_mode & 07777 : mode) < 0)
		return -1;
	/* (write_file's mode went through the umask) */
	if (chmod(tmp, had ? st.st_mode & 07777 : mode) < 0 ||
	    (had && chown(tmp, st.st_uid, st.st_gid) < 0) || rename(tmp, path) < 0) {
		int e = errno;
		unlink(tmp);
		return errno = e, -1;
	}
	return 0;
}

static void set_hostname_and_files(const struct config *c)
{
	mkdir_p("/etc", 0755);
	if (c->hostname) {
		if (sethostname(c->hostname, strlen(c->hostname)) < 0)
			logmsg("sethostname: %s", strerror(errno));
		char line[80];
		int n = snprintf(line, sizeof(line), "%s\n", c->hostname);
		unlink("/etc/hostname");
		if (write_file("/etc/hostname", line, (size_t)n, O_TRUNC, 0644) < 0)
			logmsg("/etc/hostname: %s", strerror(errno));
	}
	/* Add the host records, starting on a fresh line if the image's file lacks a final
	 * newline.  Programs expect localhost to resolve, and scratch images often ship no
	 * /etc/hosts: add Docker's localhost lines when no line names it.  The lines added
	 * are tagged (HOSTS_TAG) and the last boot's are taken out first: the root disk
	 * outlives a run, and a restarted machine's address may differ (the old line, found
	 * first, named an address it no longer has).  Written to a new file renamed over
	 * the old one.  A hosts that is a symlink (it may lead anywhere: init reads as root,
	 * and /proc/modules would have been copied in) or anything else but a regular file
	 * (a FIFO would hang init) counts as absent: replaced, never read. */
	size_t len = 0;
	char *old = read_file_flags("/etc/hosts", 1 << 20, &len, O_NOFOLLOW);
	int e = old ? 0 : errno;
	int not_regular = e == ELOOP || e == EINVAL;
	int unreadable = e && e != ENOENT && !not_regular; /* (rewritten, it would lose lines) */
	size_t kept = old ? drop_tagged_lines(old, len) : 0;
	int need_localhost = !old || !names_localhost(old);
	if (unreadable) {
		logmsg("/etc/hosts: %s: no records added", strerror(e));
	} else if (not_regular || c->nhosts > 0 || need_localhost || kept != len) {
		if (not_regular)
			logmsg("/etc/hosts is not a regular file: replaced without reading it");
		size_t cap = kept + 256;
		for (int i = 0; i < c->nhosts; i++) {
			cap += strlen(c->hosts[i].addr) + sizeof(HOSTS_TAG) + 1;
			for (int j = 0; j < c->hosts[i].nnames; j++)
				cap += strlen(c->hosts[i].names[j]) + 1;
		}
		char *buf = xrealloc(NULL, cap);
		size_t n = 0;
		if (kept) {
			memcpy(buf, old, kept);
			n = kept;
			if (buf[n - 1] != '\n')
				buf[n++] = '\n';
		}
		if (need_localhost)
			n = append(buf, cap, n, "127.0.0.1\tlocalhost" HOSTS_TAG "\n"
			                        "::1\tlocalhost ip6-localhost ip6-loopback" HOSTS_TAG "\n");
		for (int i = 0; i < c->nhosts; i++) {
			n = append(buf, cap, n, "%s", c->hosts[i].addr);
			for (int j = 0; j < c->hosts[i].nnames; j++)
				n = append(buf, cap, n, "%c%s", j ? ' ' : '\t', c->hosts[i].names[j]);
			n = append(buf, cap, n, HOSTS_TAG "\n");
		}
		if (replace_file("/etc/hosts", buf, n, 0644) < 0)
			logmsg("/etc/hosts: %s", strerror(errno));
		free(buf);
	}
	free(old);
	if (c->nnameservers > 0 || c->nsearch > 0) {
		char buf[8192];
		size_t n = 0;
		if (c->nsearch > 0) {
			n = append(buf, sizeof(buf), n, "search");
			for (int i = 0; i < c->nsearch && n < sizeof(buf) - 300; i++)
				n = append(buf, sizeof(buf), n, " %.253s", c->search[i]);
			n = append(buf, sizeof(buf), n, "\n");
		}
		for (int i = 0; i < c->nnameservers && n < sizeof(buf) - 100; i++)
			n = append(buf, sizeof(buf), n, "nameserver %.60s\n", c->nameservers[i]);
		/* overwrite, never through a symlink the image points somewhere else */
		unlink("/etc/resolv.conf");
		if (write_file("/etc/resolv.conf", buf, n, O_TRUNC, 0644) < 0)
			logmsg("/etc/resolv.conf: %s", strerror(errno));
	}
}

static int env_has(char **env, const char *key)
{
	size_t k = strlen(key);
	for (char **e = env; *e; e++)
		if (!strncmp(*e, key, k) && (*e)[k] == '=')
			return 1;
	return 0;
}

static const char *env_get(char **env, const char *key)
{
	size_t k = strlen(key);
	for (char **e = env; *e; e++)
		if (!strncmp(*e, key, k) && (*e)[k] == '=')
			return *e + k + 1;
	return NULL;
}

static char *env_entry(const char *key, const char *value)
{
	size_t n = strlen(key) + strlen(value) + 2;
	char *s = xrealloc(NULL, n);
	snprintf(s, n, "%s=%s", key, value);
	return s;
}

static void env_add(struct config *c, const char *key, const char *value)
{
	if (env_has(c->env, key))
		return;
	/* config_parse left three spare slots for exactly these additions */
	c->env[c->envc++] = env_entry(key, value);
	c->env[c->envc] = NULL;
}

/* HOME as runc sets it: the user's home from passwd (else "/") when the environment has
 * none, or an empty one (`ENV HOME=`), which no program could use. */
static void env_set_home(struct config *c, const char *home)
{
	for (char **e = c->env; *e; e++) {
		if (!strncmp(*e, "HOME=", 5)) {
			if (!(*e)[5])
				*e = env_entry("HOME", home);
			return;
		}
	}
	env_add(c, "HOME", home);
}

static void raise_nofile(long want)
{
	char *s = read_file("/proc/sys/fs/nr_open", 64, NULL);
	long max = s ? strtol(s, NULL, 10) : 1048576;
	free(s);
	if (want > max)
		want = max;
	struct rlimit rl = {(rlim_t)want, (rlim_t)want};
	if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
		return;
	/* without CAP_SYS_RESOURCE (a test's namespace) at least lift the soft limit */
	logmsg("RLIMIT_NOFILE %ld: %s", want, strerror(errno));
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

/* ---- the program ------------------------------------------------------------------- */

/* The child's "ember-init: ...\n" line about a start that failed with ERR: on the
 * program's stderr, the console, and (the errno, then the line without prefix and
 * newline) into the pipe for init's report. */
static void child_say(const char *buf, size_t n, int err)
{
	write_all(2, buf, n);
	if (G.console_fd != 2)
		write_all(G.console_fd, buf, n);
	if (G.start_err_fd >= 0) {
		write_all(G.start_err_fd, (const char *)&err, sizeof(err));
		write_all(G.start_err_fd, buf + 12, n - 13);
	}
}

static void child_error(const char *what, const char *arg, int err)
{
	/* arg may be the image's command, of any length: cut it, keep the line whole */
	char buf[600];
	size_t n = append(buf, sizeof(buf), 0, "ember-init: %s %.400s: %s\n", what, arg, strerror(err));
	child_say(buf, n, err);
}

/* An exec of one PATH entry that failed with this errno: look at the next entry (the
 * file is not there, or cannot be reached through this entry), as Go's LookPath, which
 * runc uses, goes on past any entry that does not give an executable. */
static int search_on(int e)
{
	return e == ENOENT || e == ENOTDIR || e == EACCES || e == ELOOP || e == ENAMETOOLONG ||
	       e == ESTALE || e == ENODEV;
}

__attribute__((noreturn)) void exec_command(char **argv, char **envp)
{
	const char *file = argv[0];
	if (!*file) {
		child_error("exec", "\"\"", ENOENT);
		_exit(EXIT_NOT_FOUND);
	}
	if (strchr(file, '/')) {
		execve(file, argv, envp);
		int e = errno;
		child_error("exec", file, e);
		_exit(e == ENOENT || e == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC);
	}
	const char *path = env_get(envp, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	int eacces = 0;
	/* An empty PATH searches nowhere, as Go's LookPath in runc does (an empty
	 * entry inside a longer PATH still means the working directory). */
	for (const char *p = path; *path;) {
		const char *colon = strchrnul(p, ':');
		char full[4096];
		int dl = (int)(colon - p);
		if ((size_t)dl + strlen(file) + 2 > sizeof(full)) {
			/* never exec a truncated path: that would be another program */
			if (!*colon)
				break;
			p = colon + 1;
			continue;
		}
		if (dl == 0)
			snprintf(full, sizeof(full), "%s", file); /* empty entry: current directory */
		else
			snprintf(full, sizeof(full), "%.*s/%s", dl, p, file);
		execve(full, argv, envp);
		if (errno == EACCES)
			eacces = 1; /* the final word when nothing later is found */
		else if (!search_on(errno)) {
			child_error("exec", full, errno);
			_exit(EXIT_CANNOT_EXEC);
		}
		if (!*colon)
			break;
		p = colon + 1;
	}
	if (eacces) {
		child_error("exec", file, EACCES);
		_exit(EXIT_CANNOT_EXEC);
	}
	char buf[600];
	size_t n = append(buf, sizeof(buf), 0,
	                  "ember-init: exec %.400s: executable file not found in $PATH\n", file);
	child_say(buf, n, ENOENT);
	_exit(EXIT_NOT_FOUND);
}

/* Why the child could not start the program, into G.start_error ("" when it did) and
 * G.start_errno: what it wrote before its exit, or nothing when its exec closed the pipe. */
static void read_start_error(int fd)
{
	char buf[sizeof(int) + sizeof(G.start_error)];
	size_t have = 0;
	for (;;) {
		ssize_t n = read(fd, buf + have, sizeof(buf) - 1 - have);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		have += (size_t)n;
		if (have == sizeof(buf) - 1)
			break;
	}
	close(fd);
	G.start_error[0] = 0;
	if (have <= sizeof(int))
		return;
	memcpy(&G.start_errno, buf, sizeof(int));
	memcpy(G.start_error, buf + sizeof(int), have - sizeof(int));
	G.start_error[have - sizeof(int)] = 0;
}

/* Whether a start that failed with this errno fails again with the same image and config
 * (not found, not a directory, not permitted, not an executable format, a link loop, a
 * name too long): the report then says not_started, and the host's restart policy does
 * not run it again.
 * Others may pass (ENOMEM, EAGAIN, ETXTBSY, E2BIG, a setgroups/setuid that failed). */
static int start_fails_again(int e)
{
	return e == ENOENT || e == ENOTDIR || e == EACCES || e == ENOEXEC || e == ELOOP ||
	       e == ENAMETOOLONG;
}

static pid_t spawn(struct config *c, const struct exec_user *u, const char *workdir)
{
	int errpipe[2];
	if (pipe2(errpipe, O_CLOEXEC) < 0)
		errpipe[0] = errpipe[1] = -1;
	pid_t pid = fork();
	if (pid != 0) {
		if (errpipe[1] >= 0)
			close(errpipe[1]);
		if (errpipe[0] >= 0) {
			if (pid > 0)
				read_start_error(errpipe[0]);
			else
				close(errpipe[0]);
		}
		return pid;
	}
	if (errpipe[0] >= 0)
		close(errpipe[0]);
	G.start_err_fd = errpipe[1];
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	setsid();
	int own = attach_child_stdio(); /* -i, -t: a stdin pipe, a terminal */
	int devnull = own & 1 ? -1 : open("/dev/null", O_RDWR);
	if (devnull >= 0 && devnull != 0) {
		dup2(devnull, 0);
		close(devnull);
	}
	if (!(own & 2) && G.ports[PORT_STDOUT] >= 0)
		dup2(G.ports[PORT_STDOUT], 1);
	if (!(own & 2) && G.ports[PORT_STDERR] >= 0)
		dup2(G.ports[PORT_STDERR], 2);
	/* chdir as root first, like runc: `USER app` with `WORKDIR /root/app` (/root 0700)
	 * starts there, though the user cannot go through /root.  Only when root may not
	 * enter (a root-squashed or FUSE volume) is it tried again as the user. */
	int cd = chdir(workdir) < 0 ? errno : 0;
	if (cd && cd != EACCES && cd != EPERM) {
		child_error("chdir", workdir, cd);
		_exit(EXIT_CANNOT_EXEC);
	}
	if (setgroups((size_t)u->ngroups, u->groups) < 0) {
		child_error("setgroups", "", errno);
		_exit(EXIT_CANNOT_EXEC);
	}
	if (setgid(u->gid) < 0 || setuid(u->uid) < 0) {
		child_error("setuid/setgid", c->user ? c->user : "", errno);
		_exit(EXIT_CANNOT_EXEC);
	}
	if (cd && chdir(workdir) < 0) {
		child_error("chdir", workdir, errno);
		_exit(EXIT_CANNOT_EXEC);
	}
	exec_command(c->argv, c->env);
}

/* ---- supervision ------------------------------------------------------------------- */

static int kmsg_saw_oom(int fd)
{
	char rec[8192];
	int oom = 0;
	for (;;) {
		ssize_t n = read(fd, rec, sizeof(rec) - 1);
		if (n < 0 && errno == EPIPE) /* overwritten records: keep reading */
			continue;
		if (n <= 0)
			break;
		rec[n] = 0;
		if (strstr(rec, "Killed process ") || strstr(rec, "oom-kill:"))
			oom = 1;
	}
	return oom;
}

struct control {
	char buf[256];
	size_t len;
	/* "stop_timeout N" sets the next stop's timeout (have_timeout); stop_with is the
	 * timeout of the stop request control_read returned (-1: no SIGKILL) */
	int have_timeout, timeout, stop_with;
};

/* "signal N" (1..64): deliver signal N to the program now (`ember kill -s`). */
static void control_signal(const char *arg, pid_t child)
{
	char *end;
	long sig = strtol(arg, &end, 10);
	if (end == arg || *end || sig < 1 || sig > 64) {
		logmsg("bad control request 'signal %.20s'", arg);
		return;
	}
	kill(child, (int)sig);
}

/* "stop_timeout N" (-1..86400): the next "stop" arms its SIGKILL after N seconds instead
 * of the run config's stop_timeout, -1 arms none (`ember stop -t N`).  A line of its own
 * before "stop", so that an older init logs and skips it and still stops the program. */
static void control_stop_timeout(const char *arg, struct control *ct)
{
	char *end;
	long t = strtol(arg, &end, 10);
	if (end == arg || *end || t < -1 || t > 86400) {
		logmsg("bad control request 'stop_timeout %.20s'", arg);
		return;
	}
	ct->timeout = (int)t;
	ct->have_timeout = 1;
}

/* Returns 1 for stop (its timeout in ct->stop_with), 2 for kill, 0 for nothing (yet).
 * *eof is set when the host end is not connected (a virtio port then reads as EOF and
 * polls as readable). */
static int control_read(int fd, struct control *ct, int *eof, pid_t child)
{
	int action = 0;
	for (;;) {
		ssize_t n = read(fd, ct->buf + ct->len, sizeof(ct->buf) - 1 - ct->len);
		if (n == 0)
			*eof = 1;
		if (n <= 0)
			break;
		ct->len += (size_t)n;
		char *nl;
		while ((nl = memchr(ct->buf, '\n', ct->len))) {
			*nl = 0;
			if (!strcmp(ct->buf, "stop")) {
				if (!action) {
					action = 1;
					ct->stop_with = ct->have_timeout ? ct->timeout : G.cfg.stop_timeout;
				}
				ct->have_timeout = 0; /* a timeout goes with the one stop after it */
			} else if (!strncmp(ct->buf, "stop_timeout ", 13))
				control_stop_timeout(ct->buf + 13, ct);
			else if (!strcmp(ct->buf, "kill"))
				action = 2;
			else if (!strncmp(ct->buf, "signal ", 7))
				control_signal(ct->buf + 7, child);
			else if (ct->buf[0])
				logmsg("unknown control request '%.40s'", ct->buf);
			size_t used = (size_t)(nl - ct->buf) + 1;
			memmove(ct->buf, nl + 1, ct->len - used);
			ct->len -= used;
		}
		if (ct->len == sizeof(ct->buf) - 1) /* a line too long to be ours */
			ct->len = 0;
	}
	return action;
}

static int supervise(pid_t child, int sigfd, int control_fd, int kmsg_fd, int *oom)
{
	struct control ct = {.len = 0};
	long long kill_at = -1, control_retry = -1;
	int stopping = 0;
	for (;;) {
		struct pollfd fds[3 + 4 * EXEC_PORTS + 2] = {
		    {sigfd, POLLIN, 0},
		    {control_retry < 0 ? control_fd : -1, POLLIN, 0},
		    {kmsg_fd, POLLIN, 0},
		};
		long long now = now_ms(), wake = -1;
		if (kill_at >= 0)
			wake = kill_at;
		if (control_retry >= 0 && (wake < 0 || control_retry < wake))
			wake = control_retry;
		int nexec = exec_pollfds(fds + 3, 4 * EXEC_PORTS, &wake);
		int nattach = attach_pollfds(fds + 3 + nexec, 2);
		int timeout = wake < 0 ? -1 : (int)(wake > now ? wake - now : 0);
		int r = poll(fds, (nfds_t)(3 + nexec + nattach), timeout);
		if (r < 0 && errno != EINTR)
			logmsg("poll: %s", strerror(errno));
		now = now_ms();
		if (kill_at >= 0 && now >= kill_at) {
			logmsg("stop timeout: sending SIGKILL");
			kill(child, SIGKILL);
			kill_at = -1;
		}
		if (control_retry >= 0 && now >= control_retry)
			control_retry = -1;
		if (fds[2].revents & POLLIN && kmsg_saw_oom(kmsg_fd))
			*oom = 1;
		if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			int eof = 0;
			int action = control_read(control_fd, &ct, &eof, child);
			/* nobody on the host end: look again later rather than spin */
			if (eof || (fds[1].revents & (POLLHUP | POLLERR)))
				control_retry = now + 200;
			if (action == 1 && !stopping) {
				stopping = 1; /* one stop at a time: the host's "kill" ends a slow one */
				if (ct.stop_with < 0) {
					logmsg("stop requested: sending signal %d, no SIGKILL (no timeout)",
					       G.cfg.stop_signal);
				} else {
					logmsg("stop requested: sending signal %d, SIGKILL in %ds",
					       G.cfg.stop_signal, ct.stop_with);
					kill_at = now + (long long)ct.stop_with * 1000;
				}
				kill(child, G.cfg.stop_signal);
			} else if (action == 2) {
				kill(child, SIGKILL);
			}
		}
		exec_handle(fds + 3, nexec);
		attach_handle(fds + 3 + nexec, nattach);
		if (fds[0].revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(sigfd, &si, sizeof(si)) == sizeof(si)) {
				/* SIGCHLD is ours; SIGPIPE would come from init's own writes; SIGIO
				 * from the exec ports' driver (a host came or went) */
				if (si.ssi_signo == SIGIO)
					exec_host_changed();
				else if (si.ssi_signo != SIGCHLD && si.ssi_signo != SIGPIPE)
					kill(child, (int)si.ssi_signo);
			}
			pid_t p;
			int st;
			while ((p = waitpid(-1, &st, WNOHANG)) > 0) {
				if (p == child)
					return st;
				exec_reaped(p, st);
			}
		}
	}
}

/* ---- main -------------------------------------------------------------------------- */

static void usage(void)
{
	logmsg("usage: ember-init [--test --config PATH [--control FIFO] [--status PATH] [--exec SOCKET]]");
	exit(2);
}

/* ---- templates ------------------------------------------------------------------------
 * A template boot (run config with a "template" record) loads every module but its "late"
 * ones, opens the ports, says "template ready" on the console and waits on the control
 * port: the host snapshots the VM there.  Each restored copy receives its machine's real
 * run config on that port, then goes on like a fresh boot (docs/run-config.md). */

static int config_complete(const char *buf, size_t len)
{
	return len >= 5 && !memcmp(buf + len - 5, "\nend\n", 5);
}

/* The buffer grows as read_file's does: init's memory is locked (pin_memory), so a
 * CONFIG_MAX_SIZE buffer up front would be 1 MiB of RAM in every restored machine. */
static char *receive_config(int fd, size_t *out_len)
{
	size_t len = 0, cap = 4096;
	char *buf = xrealloc(NULL, cap);
	while (!config_complete(buf, len)) {
		if (len == cap) {
			if (cap >= CONFIG_MAX_SIZE)
				fail("the run config from the host is too large");
			cap *= 2;
			buf = xrealloc(buf, cap);
		}
		ssize_t n = read_control(fd, buf + len, cap - len, -1);
		if (n < 0)
			fail("cannot read the run config from the control port");
		len += (size_t)n;
	}
	*out_len = len;
	return buf;
}

static void set_clock(const struct config *c)
{
	if (!c->have_clock)
		return;
	struct timespec ts = {.tv_sec = (time_t)c->clock_sec, .tv_nsec = c->clock_nsec};
	if (clock_settime(CLOCK_REALTIME, &ts) < 0)
		logmsg("clock_settime: %s", strerror(errno));
}

/* Every restored copy of a template starts with the template's random state: mix in the
 * host's fresh bytes (credited) and force the kernel's generator to reseed from them. */
static void reseed(const struct config *c)
{
	if (!c->seed)
		fail("a restored machine needs a seed from the host");
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[SEED_MAX_HEX / 2];
	} info;
	size_t n = strlen(c->seed) / 2;
	for (size_t i = 0; i < n; i++) {
		unsigned v;
		sscanf(c->seed + 2 * i, "%2x", &v);
		info.buf[i] = (unsigned char)v;
	}
	info.entropy_count = (int)(n * 8);
	info.buf_size = (int)n;
	int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, RNDADDENTROPY, &info) < 0 || ioctl(fd, RNDRESEEDCRNG) < 0)
		fail("cannot reseed the kernel's random number generator");
	close(fd);
	memset(&info, 0, sizeof(info));
}

static void await_restore(char *err, size_t errlen)
{
	char **late = G.cfg.late;
	int nlate = G.cfg.nlate;
	int fd = G.ports[PORT_CONTROL];
	if (fd < 0)
		fail("template boot without a control port");
	logmsg("template ready");
	size_t len = 0;
	char *raw = receive_config(fd, &len);
	mark("config received");
	struct config fresh;
	if (config_parse(raw, len, &fresh, err, errlen) < 0)
		fail(err);
	if (fresh.template)
		fail("the run config sent after a restore is a template's");
	/* the host keeps the connection until this: QEMU would drop unread bytes otherwise */
	write_all(fd, "ok\n", 3);
	/* and on the console (RESTORE_TAKEN in streams.py), which the host reads whatever
	 * became of its connection: one that gave up waiting for the "ok" finds here that
	 * the program may run, and does not boot the machine a second time */
	logmsg("run config taken");
	G.cfg = fresh;
	set_clock(&G.cfg);
	reseed(&G.cfg);
	load_named("/ember/modules", late, nlate);
	load_named("/ember/modules", G.cfg.modules, G.cfg.nmodules);
	mark("late modules loaded");
}

/* PID 1 must not need a new page while the guest is out of memory: the OOM killer never
 * picks init, and when the program it killed has had its memory reaped but init's fault
 * finds nothing else to kill, the kernel panics ("System is deadlocked on memory")
 * instead of letting init report the death.  So fault in the stack init can use and lock
 * every page it maps, now and later.  Neither lock passes to the program: fork does not
 * inherit them, and execve would drop them.  What the kernel allocates on init's behalf
 * (console and port writes, /dev/kmsg reads) is not covered; nothing here can be. */
#define STACK_RESERVE (256 * 1024) /* init's deepest path uses well under 64 KiB */
static void __attribute__((noinline)) touch_stack(void)
{
	volatile char stack[STACK_RESERVE];
	for (size_t i = 0; i < sizeof(stack); i += 4096)
		stack[i] = 0;
}

static void pin_memory(void)
{
	touch_stack();
	if (mlockall(MCL_CURRENT | MCL_FUTURE) < 0)
		logmsg("mlockall: %s (init may fault while the guest is out of memory)",
		       strerror(errno));
}

int main(int argc, char **argv)
{
	/* a tool, run by `ember top` in an exec session; never as PID 1 (a kernel command line
	 * word passes through to init's argv) */
	if (argc == 2 && !strcmp(argv[1], "--ps") && getpid() != 1)
		return ps_main();
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--test"))
			G.test = 1;
		else if (!strcmp(argv[i], "--config") && i + 1 < argc)
			G.config_path = argv[++i];
		else if (!strcmp(argv[i], "--control") && i + 1 < argc)
			G.control_path = argv[++i];
		else if (!strcmp(argv[i], "--exec") && i + 1 < argc)
			G.exec_path = argv[++i];
		else if (!strcmp(argv[i], "--status") && i + 1 < argc)
			G.status_path = argv[++i];
		else if (G.test)
			usage();
		/* in a VM, the kernel passes unknown command-line words: ignore them */
	}
	if (getpid() != 1) {
		logmsg("must run as PID 1 (in a VM, or with --test in a PID namespace)");
		return 2;
	}
	if (!G.test)
		pin_memory();
	umask(022);
	char err[512];
	timing = getenv("EMBER_INIT_TIMING") != NULL;

	/* block every signal and take them from a signalfd: PID 1 only receives
	 * signals it handles, and blocked ones are queued rather than dropped */
	sigset_t all;
	sigfillset(&all);
	/* musl's sigfillset leaves out the signals it keeps for its own use (32-34: timers,
	 * thread cancellation; init uses neither), and a signal PID 1 neither blocks nor
	 * handles is dropped: set by hand (sigaddset refuses them), they are forwarded too
	 * (glibc's SIGRTMIN is 34).  musl's sigset_t is the kernel's mask, bit N-1 for N. */
	for (int sig = 32; sig <= 34; sig++)
		((unsigned long *)(void *)&all)[(sig - 1) / (8 * sizeof(long))] |=
		    1UL << ((sig - 1) % (8 * sizeof(long)));
	sigprocmask(SIG_BLOCK, &all, NULL);
	int sigfd = signalfd(-1, &all, SFD_CLOEXEC | SFD_NONBLOCK);

	if (!G.test) {
		mkdir("/dev", 0755);
		if (mount("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755") < 0 && errno != EBUSY)
			logmsg("mount /dev: %s", strerror(errno));
		int con = open("/dev/console", O_RDWR | O_NOCTTY);
		if (con >= 0) {
			for (int fd = 0; fd < 3; fd++)
				if (fd != con)
					dup2(con, fd);
			if (con > 2)
				close(con);
		}
		mkdir("/sys", 0755);
		mount("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	}
	/* init's own messages keep going to the console after the program takes fds 1, 2 */
	G.console_fd = fcntl(2, F_DUPFD_CLOEXEC, 3);
	if (G.console_fd < 0)
		G.console_fd = 2;
	log_fd = G.console_fd;

	size_t len = 0;
	char *raw = read_file(G.config_path, CONFIG_MAX_SIZE, &len);
	int parsed = -1;
	if (raw)
		parsed = config_parse(raw, len, &G.cfg, err, sizeof(err));
	else
		snprintf(err, sizeof(err), "cannot read run config %s: %s", G.config_path,
		         strerror(errno));

	mark("start");
	if (!G.test) {
		int tmpl = parsed == 0 && G.cfg.template;
		load_modules("/ember/modules", parsed == 0 ? G.cfg.modules : NULL,
		             parsed == 0 ? G.cfg.nmodules : 0, tmpl ? G.cfg.late : NULL,
		             tmpl ? G.cfg.nlate : 0);
		mark("modules loaded");
		open_ports();
		mark("ports open");
	}
	if (parsed < 0)
		fail(err);
	if (G.cfg.template) {
		if (G.test)
			fail("a template run config needs a VM");
		await_restore(err, sizeof(err));
	}
	G.have_cfg = 1;
	struct config *c = &G.cfg;

	int switched = G.test ? 0 : mount_root_and_switch(c, err, sizeof(err));
	if (switched == -2)
		fail_not_started(err);
	if (switched < 0)
		fail(err);
	mark("root switched");
	if (mount_pseudo(err, sizeof(err)) < 0)
		fail_not_started(err);
	mark("pseudo file systems");
	raise_nofile(c->nofile);
	set_hostname_and_files(c);
	if (net_setup(c, err, sizeof(err)) < 0)
		fail(err);
	mark("network");
	int volumes = mount_volumes(c, err, sizeof(err));
	if (volumes == -2)
		fail_not_started(err); /* the image: the same start fails again */
	if (volumes < 0)
		fail(err);

	struct exec_user u;
	if (resolve_user(c->user ? c->user : "", "/etc/passwd", "/etc/group", &u, err,
	                 sizeof(err)) < 0)
		fail_not_started(err);
	env_add(c, "PATH", DEFAULT_PATH);
	env_set_home(c, u.home ? u.home : "/");
	if (c->hostname)
		env_add(c, "HOSTNAME", c->hostname);
	const char *workdir = c->workdir ? c->workdir : "/";
	/* chrooted into the image by now (switch_root in a VM, the test's chroot), so links
	 * in the WorkingDir resolve inside it, and dangling ones get their target created */
	char at[4096];
	if (mkdir_in_root(workdir, 0755, at, sizeof(at)) < 0) {
		walk_error(err, sizeof(err), "cannot create working directory", workdir, at, errno);
		fail_not_started(err);
	}

	int control_fd = G.ports[PORT_CONTROL];
	if (G.control_path) {
		control_fd = open(G.control_path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
		if (control_fd < 0)
			logmsg("control %s: %s", G.control_path, strerror(errno));
	}
	/* the kernel log tells whether the OOM killer struck; a test's namespace
	 * would see the host's, so only a VM looks */
	int kmsg_fd = -1;
	if (!G.test) {
		kmsg_fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
		if (kmsg_fd >= 0)
			lseek(kmsg_fd, 0, SEEK_END);
	}

	struct exec_env xenv = {c->env, c->envc, &u, workdir};
	exec_setup(G.ports + PORT_EXEC, EXEC_PORTS, G.exec_path, &xenv);

	mark("configured, starting the program");
	G.sent_base[0] = port_sent(PORT_STDOUT);
	G.sent_base[1] = port_sent(PORT_STDERR);
	if (attach_prepare(c, G.ports[PORT_STDOUT] >= 0 ? G.ports[PORT_STDOUT] : 1, err,
	                   sizeof(err)) < 0)
		fail(err);
	pid_t child = spawn(c, &u, workdir);
	if (child < 0) {
		snprintf(err, sizeof(err), "fork: %s", strerror(errno));
		fail(err);
	}
	attach_started(child);
	int oom = 0;
	int st = supervise(child, sigfd, control_fd, kmsg_fd, &oom);
	if (kmsg_fd >= 0) {
		msleep(20); /* the OOM report and the SIGCHLD race: let the log catch up */
		if (kmsg_saw_oom(kmsg_fd))
			oom = 1;
	}
	int code, sig = 0;
	if (WIFEXITED(st)) {
		code = WEXITSTATUS(st);
	} else {
		sig = WTERMSIG(st);
		code = 128 + sig;
	}
	mark("program ended");
	/* an error only when the program never ran (its own exit 127 is not one); not started
	 * (no restart) only when the same start would fail the same way again */
	if (G.start_error[0] && start_fails_again(G.start_errno))
		G.not_started = 1;
	finish(code, sig, oom, G.start_error[0] ? G.start_error : NULL);
}
