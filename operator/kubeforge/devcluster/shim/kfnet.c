/*
 * Pod networking for dev-cluster pods, preloaded into every pod process (LD_PRELOAD).
 *
 * 1. Cluster DNS for native code.
 * The Python shim (sitecustomize.py) covers Python's resolver; C/C++ code calls libc's getaddrinfo directly
 * (e.g. torch c10d's TCPStore connecting to MASTER_ADDR). This wraps getaddrinfo: names found in the node
 * agent's hosts file ($KUBEFORGE_DEVCLUSTER_HOSTS, lines "ip fqdn") resolve to that IP, with the pod's search
 * list (<ns>.svc.cluster.local, svc.cluster.local, cluster.local); unknown *.svc / *.cluster.local names fail
 * with EAI_NONAME; everything else goes to the real getaddrinfo.
 *
 * 2. A pod's own "localhost" and wildcard binds. All pods share the host's network namespace, so two pods
 * binding 0.0.0.0:8000 would collide. bind() to 0.0.0.0 / 127.0.0.1 (and :: on dual-stack sockets) is
 * rewritten to the pod IP ($KUBEFORGE_DEVCLUSTER_POD_IP), as if each pod had its own network namespace;
 * connect() to 127.0.0.1:P / ::1:P goes to podIP:P when the pod listens there (containers of one pod talk
 * over localhost), and to the real loopback otherwise (host services such as the API server stay reachable).
 *
 * Built by the node agent at start: cc -shared -fPIC -O2 -o libkfnet.so kfnet.c -ldl
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dlfcn.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdint.h>
#include <sys/socket.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Find `name` in the hosts file; copy its first IP into ip. */
static int find(const char *path, const char *name, char *ip, size_t iplen) {
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char line[1024];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *save = NULL;
        char *addr = strtok_r(line, " \t\r\n", &save);
        if (!addr || addr[0] == '#') continue;
        for (char *tok = strtok_r(NULL, " \t\r\n", &save); tok; tok = strtok_r(NULL, " \t\r\n", &save)) {
            if (strcmp(tok, name) == 0) {
                snprintf(ip, iplen, "%s", addr);
                found = 1;
                break;
            }
        }
    }
    fclose(f);
    return found;
}

/* 1: cluster name found (ip set); -1: cluster name that does not exist; 0: not ours. */
static int lookup(const char *host, char *ip, size_t iplen) {
    const char *path = getenv("KUBEFORGE_DEVCLUSTER_HOSTS");
    if (!path || !*path || !host || !*host) return 0;
    char name[256];
    size_t n = strlen(host);
    if (n >= sizeof name) return 0;
    int absolute = host[n - 1] == '.';
    for (size_t i = 0; i <= n; i++) name[i] = (char)tolower((unsigned char)host[i]);
    if (absolute) name[n - 1] = '\0';

    const char *ns = getenv("KUBEFORGE_DEVCLUSTER_NAMESPACE");
    if (!ns || !*ns) ns = "default";
    char cand[512];
    if (ends_with(name, ".svc")) {
        snprintf(cand, sizeof cand, "%s.cluster.local", name);
        if (find(path, cand, ip, iplen)) return 1;
    }
    if (find(path, name, ip, iplen)) return 1;
    if (!absolute && !ends_with(name, ".svc")) {
        const char *fmts[] = {"%s.%s.svc.cluster.local", "%s.svc.cluster.local", "%s.cluster.local"};
        for (int i = 0; i < 3; i++) {
            if (i == 0)
                snprintf(cand, sizeof cand, fmts[i], name, ns);
            else
                snprintf(cand, sizeof cand, fmts[i], name);
            if (find(path, cand, ip, iplen)) return 1;
        }
    }
    if (ends_with(name, ".cluster.local") || ends_with(name, ".svc")) return -1;
    return 0;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    static gai_fn real = NULL;
    if (!real) real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
    char ip[64];
    int r = lookup(node, ip, sizeof ip);
    if (r == 1) {
        struct addrinfo h;
        if (hints)
            h = *hints;
        else
            memset(&h, 0, sizeof h);
        h.ai_flags |= AI_NUMERICHOST;
        return real(ip, service, &h, res);
    }
    if (r == -1) return EAI_NONAME;
    return real(node, service, hints, res);
}

/* ------------------------------------------------------------------------------------------ bind/connect */

typedef int (*sock_fn)(int, const struct sockaddr *, socklen_t);

static int pod_ip(struct in_addr *out) {
    const char *s = getenv("KUBEFORGE_DEVCLUSTER_POD_IP");
    return s && *s && inet_pton(AF_INET, s, out) == 1;
}

static int v4_local(struct in_addr a) { /* 0.0.0.0 or 127.0.0.1 only: the rest of 127/8 are pod IPs */
    uint32_t h = ntohl(a.s_addr);
    return h == INADDR_ANY || h == INADDR_LOOPBACK;
}

static void v4_mapped(struct in6_addr *dst, struct in_addr ip) {
    memset(dst, 0, sizeof *dst);
    dst->s6_addr[10] = 0xff;
    dst->s6_addr[11] = 0xff;
    memcpy(&dst->s6_addr[12], &ip, 4);
}

static int mapped_local(const struct in6_addr *a) {
    if (!IN6_IS_ADDR_V4MAPPED(a)) return 0;
    struct in_addr v4;
    memcpy(&v4, &a->s6_addr[12], 4);
    return v4_local(v4);
}

static int v6only(int fd) {
    int on = 0;
    socklen_t l = sizeof on;
    return getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &on, &l) == 0 && on;
}

/* Is something of this pod listening on podIP:port (IPv4, or v4-mapped on a dual-stack socket)? */
static int pod_listens(struct in_addr ip, unsigned port) {
    char want4[32], want6[64], line[512];
    snprintf(want4, sizeof want4, "%08X:%04X", (unsigned)ip.s_addr, port);
    snprintf(want6, sizeof want6, "0000000000000000FFFF0000%08X:%04X", (unsigned)ip.s_addr, port);
    const char *files[] = {"/proc/net/tcp", "/proc/net/tcp6"};
    const char *wants[] = {want4, want6};
    for (int i = 0; i < 2; i++) {
        FILE *f = fopen(files[i], "r");
        if (!f) continue;
        int found = 0;
        while (!found && fgets(line, sizeof line, f)) {
            char local[64], remote[64], st[8];
            if (sscanf(line, " %*d: %63s %63s %7s", local, remote, st) == 3 && strcmp(st, "0A") == 0 &&
                strcmp(local, wants[i]) == 0)
                found = 1;
        }
        fclose(f);
        if (found) return 1;
    }
    return 0;
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static sock_fn real = NULL;
    if (!real) real = (sock_fn)dlsym(RTLD_NEXT, "bind");
    struct in_addr pip;
    if (addr && pod_ip(&pip)) {
        if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
            struct sockaddr_in a = *(const struct sockaddr_in *)addr;
            if (v4_local(a.sin_addr)) {
                a.sin_addr = pip;
                return real(fd, (const struct sockaddr *)&a, sizeof a);
            }
        } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
            struct sockaddr_in6 a = *(const struct sockaddr_in6 *)addr;
            if ((IN6_IS_ADDR_UNSPECIFIED(&a.sin6_addr) && !v6only(fd)) || mapped_local(&a.sin6_addr)) {
                v4_mapped(&a.sin6_addr, pip); /* the socket then serves IPv4 on the pod IP only */
                return real(fd, (const struct sockaddr *)&a, sizeof a);
            }
        }
    }
    return real(fd, addr, len);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    static sock_fn real = NULL;
    if (!real) real = (sock_fn)dlsym(RTLD_NEXT, "connect");
    struct in_addr pip;
    if (addr && pod_ip(&pip)) {
        if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
            struct sockaddr_in a = *(const struct sockaddr_in *)addr;
            if (ntohl(a.sin_addr.s_addr) == INADDR_LOOPBACK && pod_listens(pip, ntohs(a.sin_port))) {
                a.sin_addr = pip;
                return real(fd, (const struct sockaddr *)&a, sizeof a);
            }
        } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
            struct sockaddr_in6 a = *(const struct sockaddr_in6 *)addr;
            if ((IN6_IS_ADDR_LOOPBACK(&a.sin6_addr) || mapped_local(&a.sin6_addr)) && !v6only(fd) &&
                pod_listens(pip, ntohs(a.sin6_port))) {
                v4_mapped(&a.sin6_addr, pip);
                return real(fd, (const struct sockaddr *)&a, sizeof a);
            }
        }
    }
    return real(fd, addr, len);
}
