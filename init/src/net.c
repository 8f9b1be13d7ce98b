/* Network setup over rtnetlink (no `ip` binary in the image is assumed):
 * lo up; each configured interface gets its MTU, comes up, gets its IPv4
 * address, and a default route through its gateway. */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "init.h"

unsigned int if_nametoindex(const char *);

struct req {
	struct nlmsghdr nh;
	union {
		struct ifinfomsg ifi;
		struct ifaddrmsg ifa;
		struct rtmsg rtm;
	} u;
	char attrs[256];
};

static void add_attr(struct req *r, unsigned short type, const void *data, unsigned short len)
{
	struct rtattr *a = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->nh.nlmsg_len));
	a->rta_type = type;
	a->rta_len = (unsigned short)RTA_LENGTH(len);
	memcpy(RTA_DATA(a), data, len);
	r->nh.nlmsg_len = NLMSG_ALIGN(r->nh.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

/* Send one request and wait for its ACK; returns 0 or -errno. */
static int talk(int fd, struct req *r)
{
	static unsigned int seq;
	r->nh.nlmsg_seq = ++seq;
	r->nh.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	struct sockaddr_nl sa = {.nl_family = AF_NETLINK};
	if (sendto(fd, r, r->nh.nlmsg_len, 0, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return -errno;
	char buf[4096];
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf), 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned int)n);
		     h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_seq != seq)
				continue;
			if (h->nlmsg_type == NLMSG_ERROR) {
				struct nlmsgerr *e = NLMSG_DATA(h);
				return e->error;
			}
		}
	}
}

static int link_up(int fd, int index, int mtu, const unsigned char *mac)
{
	struct req r;
	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
	r.nh.nlmsg_type = RTM_NEWLINK;
	r.u.ifi.ifi_family = AF_UNSPEC;
	r.u.ifi.ifi_index = index;
	r.u.ifi.ifi_flags = IFF_UP;
	r.u.ifi.ifi_change = IFF_UP;
	if (mtu > 0) {
		unsigned int m = (unsigned int)mtu;
		add_attr(&r, IFLA_MTU, &m, sizeof(m));
	}
	if (mac)
		add_attr(&r, IFLA_ADDRESS, mac, 6);
	return talk(fd, &r);
}

static int add_address(int fd, int index, struct in_addr addr, int prefix)
{
	struct req r;
	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifaddrmsg));
	r.nh.nlmsg_type = RTM_NEWADDR;
	r.nh.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
	r.u.ifa.ifa_family = AF_INET;
	r.u.ifa.ifa_prefixlen = (unsigned char)prefix;
	r.u.ifa.ifa_index = (unsigned int)index;
	add_attr(&r, IFA_LOCAL, &addr, sizeof(addr));
	add_attr(&r, IFA_ADDRESS, &addr, sizeof(addr));
	if (prefix < 31) {
		struct in_addr brd = addr;
		brd.s_addr |= htonl(prefix ? (0xffffffffu >> prefix) : 0xffffffffu);
		add_attr(&r, IFA_BROADCAST, &brd, sizeof(brd));
	}
	return talk(fd, &r);
}

static int add_default_route(int fd, int index, struct in_addr gw)
{
	struct req r;
	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
	r.nh.nlmsg_type = RTM_NEWROUTE;
	r.nh.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
	r.u.rtm.rtm_family = AF_INET;
	r.u.rtm.rtm_table = RT_TABLE_MAIN;
	r.u.rtm.rtm_protocol = RTPROT_BOOT;
	r.u.rtm.rtm_scope = RT_SCOPE_UNIVERSE;
	r.u.rtm.rtm_type = RTN_UNICAST;
	unsigned int oif = (unsigned int)index;
	add_attr(&r, RTA_GATEWAY, &gw, sizeof(gw));
	add_attr(&r, RTA_OIF, &oif, sizeof(oif));
	return talk(fd, &r);
}

int net_setup(const struct config *c, char *err, size_t errlen)
{
	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0) {
		snprintf(err, errlen, "netlink socket: %s", strerror(errno));
		return -1;
	}
	int rc = -1, e;
	/* What Docker (20.10 and later) sets in every container: a program running as a
	 * non-root image user may bind port 80.  The machine's kernel is its own. */
	if (write_file("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0", 1, O_TRUNC, 0644) < 0)
		logmsg("ip_unprivileged_port_start: %s", strerror(errno));
	unsigned int lo = if_nametoindex("lo");
	if (lo && (e = link_up(fd, (int)lo, 0, NULL)) < 0)
		logmsg("lo up: %s", strerror(-e));
	for (int i = 0; i < c->nifaces; i++) {
		const struct iface *f = &c->ifaces[i];
		struct in_addr addr, gw;
		if (inet_pton(AF_INET, f->addr, &addr) != 1 ||
		    (f->gateway && inet_pton(AF_INET, f->gateway, &gw) != 1)) {
			snprintf(err, errlen, "%s: invalid IPv4 address or gateway", f->name);
			goto out;
		}
		/* the NIC's driver may still be probing: give it a moment */
		unsigned int index = 0;
		for (long long deadline = now_ms() + 3000; !(index = if_nametoindex(f->name));) {
			if (now_ms() >= deadline) {
				snprintf(err, errlen, "network interface %s does not exist", f->name);
				goto out;
			}
			msleep(10);
		}
		/* a restored template's NIC still has the template's address: take the machine's */
		const unsigned char *mac = NULL;
		for (int m = 0; m < c->nmacs; m++)
			if (!strcmp(c->macs[m].iface, f->name))
				mac = c->macs[m].addr;
		if ((e = link_up(fd, (int)index, f->mtu, mac)) < 0) {
			snprintf(err, errlen, "%s up (mtu %d): %s", f->name, f->mtu, strerror(-e));
			goto out;
		}
		if ((e = add_address(fd, (int)index, addr, f->prefix)) < 0) {
			snprintf(err, errlen, "%s address %s/%d: %s", f->name, f->addr, f->prefix,
			         strerror(-e));
			goto out;
		}
		if (f->gateway && (e = add_default_route(fd, (int)index, gw)) < 0) {
			snprintf(err, errlen, "%s default route via %s: %s", f->name, f->gateway,
			         strerror(-e));
			goto out;
		}
	}
	rc = 0;
out:
	close(fd);
	return rc;
}
