/* ember-init: the guest's PID 1.  Shared declarations.
 *
 * Flow (main.c): load modules, mount the root disk and switch into it, mount the
 * pseudo file systems, apply the run config (hostname, hosts, DNS, network,
 * volumes, user, environment, workdir), spawn the program, supervise it, report
 * how it ended, power off.  The run config format is docs/run-config.md.
 */
#ifndef EMBER_INIT_H
#define EMBER_INIT_H

#include <stddef.h>
#include <sys/types.h>

/* Exit codes ember-init reports when the program could not be started. */
#define EXIT_INIT_FAILED 125 /* bad config, root disk, unknown user, ... */
#define EXIT_CANNOT_EXEC 126 /* found but not executable, or chdir/setuid failed */
#define EXIT_NOT_FOUND 127   /* command not found */

#define CONFIG_MAX_SIZE (1 << 20) /* keep in step with runconfig.MAX_CONFIG_SIZE */
/* the longest fstab-style option string of a mount (mount_with_options' buffers):
 * keep in step with runconfig.MAX_MOUNT_OPTIONS */
#define MOUNT_OPTIONS_MAX 1023

struct iface {
	char *name, *addr, *gateway; /* gateway NULL when "-" */
	int prefix, mtu;
};
struct hostent_rec {
	char *addr;
	char **names;
	int nnames;
};
struct vmount {
	char *source, *target, *fstype, *options;
	char *resolved; /* where it was mounted (its target resolved inside the root), or NULL */
};
struct macaddr {
	char *iface;
	unsigned char addr[6];
};

#define SEED_MAX_HEX 512 /* 256 bytes of host randomness at most */

struct config {
	char **argv; int argc;
	char **env; int envc;
	char *user, *workdir, *hostname;
	struct hostent_rec *hosts; int nhosts;
	char **nameservers; int nnameservers;
	char **search; int nsearch;
	struct iface *ifaces; int nifaces;
	struct vmount *mounts; int nmounts;
	int stop_signal, stop_timeout;
	char *root_dev, *root_fstype, *root_opts;
	char **modules; int nmodules;
	long nofile;
	/* after the exit report, wait up to this long for the host's "bye" on the control
	 * port before powering off: output the host has not taken yet dies with the VM */
	int exit_ack_ms;
	/* templates: "template" boots up to waiting for the real config; "late" modules
	 * are loaded only after it came (device drivers whose probe must see the restored
	 * machine's devices); "clock" and "seed" come with the config after a restore */
	int template;
	char **late; int nlate;
	int have_clock; long long clock_sec; long clock_nsec;
	char *seed;
	struct macaddr *macs; int nmacs;
	/* run -i: the program's stdin is a pipe the host feeds; run -t: its stdio is a
	 * terminal of this size (attach.c) */
	int open_stdin;
	int tty, tty_rows, tty_cols;
};

/* config.c */
int config_parse(char *buf, size_t len, struct config *c, char *err, size_t errlen);

/* util.c */
extern int log_fd;
void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Format into buf[at..size) and return the new end of the text, at most size - 1:
 * output that does not fit is cut, and the result is always a valid offset (snprintf
 * returns the length it would have needed, which must never be used as one). */
size_t append(char *buf, size_t size, size_t at, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
int mkdir_p(const char *path, mode_t mode);
/* mkdir_p for a path inside the image (WorkingDir, volume targets): symlinks, dangling
 * ones too, are resolved inside the root (at most 40, then ELOOP); AT gets the path it
 * resolved to, without links, or where a failure stopped. */
int mkdir_in_root(const char *path, mode_t mode, char *at, size_t atlen);
/* "WHAT PATH: [AT: ]REASON" for a failed mkdir_in_root (AT when it is not PATH). */
void walk_error(char *err, size_t errlen, const char *what, const char *path, const char *at,
                int e);
int write_file(const char *path, const char *data, size_t len, int flags, mode_t mode);
/* Open a path that must be a regular file (following symlinks, as open does, unless
 * FLAGS has O_NOFOLLOW: a symlink is then ELOOP): -1 with errno EINVAL when it is
 * anything else.  An image's /etc/passwd or /etc/hosts may be a FIFO, whose open or
 * read would hang init before the program starts, or a device. */
int open_regular(const char *path, int flags, mode_t mode);
char *read_file(const char *path, size_t max, size_t *len);
/* read_file with open flags added (O_NOFOLLOW) */
char *read_file_flags(const char *path, size_t max, size_t *len, int flags);
int dir_is_empty(const char *path);
void msleep(int ms);
long long now_ms(void);

/* mounts.c */
int load_modules(const char *dir, char **extra, int nextra, char **skip, int nskip);
int load_named(const char *dir, char **names, int n);
/* -1 on a failure, -2 when the image itself cannot be used (a symlinked /dev or /sys) */
int mount_root_and_switch(const struct config *c, char *err, size_t errlen);
int mount_pseudo(char *err, size_t errlen);
int mount_volumes(struct config *c, char *err, size_t errlen);
void unmount_volumes(const struct config *c);
int mount_with_options(const char *src, const char *target, const char *fstype, const char *opts);
int wait_for_path(const char *path, int timeout_ms);

/* user.c */
struct exec_user {
	uid_t uid;
	gid_t gid;
	gid_t *groups;
	int ngroups;
	char *home; /* NULL when not known from passwd */
};
int resolve_user(const char *spec, const char *passwd_path, const char *group_path,
                 struct exec_user *out, char *err, size_t errlen);
int uid_name(const char *passwd_path, unsigned long uid, char *out, size_t outlen);

/* ps.c: `ember-init --ps`, the guest's processes for `ember top` */
int ps_main(void);

/* exec.c: `ember exec` sessions, one per exec port (docs/guest.md, "Exec") */
#define EXEC_PORTS 4
struct exec_env {
	char **env; int envc;              /* the program's environment */
	const struct exec_user *user;      /* its user, the default one */
	const char *workdir;
};
struct pollfd;
/* FDS: the exec ports (-1: absent); TEST_PATH: a unix socket to connect to instead */
void exec_setup(const int *fds, int n, const char *test_path,
                const struct exec_env *env);
/* Fill at most MAX pollfds (4 per port); *WAKE lowered to when the ports want a look */
int exec_pollfds(struct pollfd *fds, int max, long long *wake);
void exec_handle(struct pollfd *fds, int n);
void exec_host_changed(void);
/* Whether PID was a session's command (its end is then reported) */
int exec_reaped(pid_t pid, int status);
/* main.c: exec ARGV with ENVP as the program's start does (PATH search, errors, exit codes) */
__attribute__((noreturn)) void exec_command(char **argv, char **envp);

/* A pseudo-terminal of ROWS x COLS: its master (close-on-exec, non-blocking), its
 * slave's path in SLAVE; -1 when none can be had (exec.c) */
int open_pty(int rows, int cols, char *slave, size_t len);

/* attach.c: the program's stdin (run -i) and terminal (run -t), which exec ports
 * attach to (docs/guest.md, "Attach") */
/* Before the program's fork; OUT: where its terminal's output goes (the stdout port) */
int attach_prepare(const struct config *c, int out, char *err, size_t errlen);
/* In the program's child, after setsid: what it set up of the child's stdio, bits 1
 * (stdin) and 2 (stdout and stderr) */
int attach_child_stdio(void);
/* In init after the fork: the program's pid (signals from attached hosts) */
void attach_started(pid_t pid);
/* A new descriptor to write the program's stdin to, -1 when it has none held open */
int attach_stdin_fd(void);
int attach_is_tty(void);
pid_t attach_pid(void);
/* An attached host's stdin ended: the program's ends once every attached host's has */
void attach_close_stdin(void);
/* Fill at most MAX pollfds (2); handle what they say */
int attach_pollfds(struct pollfd *fds, int max);
void attach_handle(struct pollfd *fds, int n);
/* Everything else is gone: the terminal's last output to its port, for up to MS */
void attach_drain(int ms);

/* net.c */
int net_setup(const struct config *c, char *err, size_t errlen);

#endif
