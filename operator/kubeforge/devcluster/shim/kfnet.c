/*
 * Cluster DNS for native code in dev-cluster pods (LD_PRELOAD).
 *
 * The Python shim (sitecustomize.py) covers Python's resolver; C/C++ code calls libc's getaddrinfo directly
 * (e.g. torch c10d's TCPStore connecting to MASTER_ADDR). This wraps getaddrinfo: names found in the node
 * agent's hosts file ($KUBEFORGE_DEVCLUSTER_HOSTS, lines "ip fqdn") resolve to that IP, with the pod's search
 * list (<ns>.svc.cluster.local, svc.cluster.local, cluster.local); unknown *.svc / *.cluster.local names fail
 * with EAI_NONAME; everything else goes to the real getaddrinfo.
 *
 * Built by the node agent at start: cc -shared -fPIC -O2 -o libkfdns.so kfdns.c -ldl
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <netdb.h>
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
