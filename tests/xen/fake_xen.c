/*
 * fake_xen.c — a stand-in for the hypervisor-facing calls of the Xen 4.17 libraries.
 *
 * Two uses, one shared object (gcc -shared -fPIC fake_xen.c -o fake_xen.so -ldl):
 *
 * 1. LD_PRELOAD for the real C xenstored (xen-utils-4.17): fakes the 17 libxenctrl,
 *    libxenevtchn and libxengnttab functions it imports and interposes open() for
 *    /proc/xen/xsd_port and /proc/xen/xsd_kva, so the daemon runs without a hypervisor.
 * 2. Loaded with ctypes.CDLL as a fake libxenctrl: canned answers for the xc_* calls the
 *    Python bindings make, from a small in-memory domain table.
 *
 * Domains: dom0 always exists; FAKE_XEN_DOMIDS (e.g. "1,2") adds others.  The table is
 * (re)built from that variable by fake_xen_reset() and lazily on first use.
 * FAKE_XEN_VERSION ("4.17" by default) is what xc_version(XENVER_version) reports.
 * Prototypes come from the installed headers, so a signature mismatch fails to compile.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define MAX_DOMS 64
#define PAGE 4096

struct xc_interface_core { int dummy; };
struct xenevtchn_handle { int pipe[2]; };
struct xengntdev_handle { int dummy; };

struct fake_dom {
    uint32_t domid;
    uint32_t flags;      /* XEN_DOMINF_* */
    uint64_t max_kib;
    uint32_t vcpus;
    uint16_t weight, cap;
};

static struct fake_dom doms[MAX_DOMS];
static int ndoms = -1;
static evtchn_port_t next_port = 10;

static void add_dom(uint32_t domid)
{
    if (ndoms >= MAX_DOMS)
        return;
    struct fake_dom *d = &doms[ndoms++];
    memset(d, 0, sizeof(*d));
    d->domid = domid;
    d->flags = XEN_DOMINF_running;
    d->max_kib = domid ? 262144 : 1048576;
    d->vcpus = domid ? 2 : 1;
    d->weight = 256;
}

/* Rebuild the domain table: dom0 plus the comma-separated domids in FAKE_XEN_DOMIDS. */
void fake_xen_reset(void)
{
    const char *list = getenv("FAKE_XEN_DOMIDS");
    ndoms = 0;
    add_dom(0);
    while (list && *list) {
        char *end;
        unsigned long domid = strtoul(list, &end, 10);
        if (end == list)
            break;
        if (domid)
            add_dom(domid);
        list = *end == ',' ? end + 1 : end;
    }
}

static struct fake_dom *find_dom(uint32_t domid)
{
    if (ndoms < 0)
        fake_xen_reset();
    for (int i = 0; i < ndoms; i++)
        if (doms[i].domid == domid)
            return &doms[i];
    errno = ESRCH;
    return NULL;
}

/* ---- libxenctrl ---- */

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger, unsigned open_flags)
{
    return calloc(1, sizeof(xc_interface));
}

int xc_interface_close(xc_interface *xch)
{
    free(xch);
    return 0;
}

/* xenstored: domid D exists iff this returns 1 with info->domid == D. */
int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms, xc_dominfo_t *info)
{
    int n = 0;
    if (find_dom(0) == NULL)
        return -1;
    for (int i = 0; i < ndoms && (unsigned)n < max_doms; i++) {
        if (doms[i].domid < first_domid)
            continue;
        memset(&info[n], 0, sizeof(info[n]));
        info[n].domid = doms[i].domid;
        info[n].running = 1;
        info[n].nr_online_vcpus = doms[i].vcpus;
        n++;
    }
    return n;
}

static int cmp_dom(const void *a, const void *b)
{
    const struct fake_dom *x = a, *y = b;
    return (x->domid > y->domid) - (x->domid < y->domid);
}

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains, xc_domaininfo_t *info)
{
    int n = 0;
    find_dom(0);
    qsort(doms, ndoms, sizeof(doms[0]), cmp_dom);
    for (int i = 0; i < ndoms && (unsigned)n < max_domains; i++) {
        const struct fake_dom *d = &doms[i];
        if (d->domid < first_domain)
            continue;
        memset(&info[n], 0, sizeof(info[n]));
        info[n].domain = d->domid;
        info[n].flags = d->flags;
        info[n].tot_pages = d->max_kib / 4;
        info[n].max_pages = d->max_kib / 4;
        info[n].cpu_time = 1000000000ULL * (d->domid + 1);
        info[n].nr_online_vcpus = d->vcpus;
        info[n].max_vcpu_id = d->vcpus - 1;
        info[n].handle[15] = d->domid;
        n++;
    }
    return n;
}

int xc_physinfo(xc_interface *xch, xc_physinfo_t *info)
{
    memset(info, 0, sizeof(*info));
    info->threads_per_core = 2;
    info->cores_per_socket = 2;
    info->nr_cpus = 4;
    info->max_cpu_id = 3;
    info->nr_nodes = 1;
    info->cpu_khz = 2400000;
    info->capabilities = XEN_SYSCTL_PHYSCAP_hvm | XEN_SYSCTL_PHYSCAP_pv;
    info->total_pages = 4ULL << 18; /* 4 GiB */
    info->free_pages = 3ULL << 18;
    info->max_mfn = (4ULL << 18) - 1;
    return 0;
}

int xc_get_max_cpus(xc_interface *xch) { return 4; }

int xc_getcpuinfo(xc_interface *xch, int max_cpus, xc_cpuinfo_t *info, int *nr_cpus)
{
    int n = max_cpus < 4 ? max_cpus : 4;
    for (int i = 0; i < n; i++)
        info[i].idletime = 1000000000ULL * (i + 1);
    *nr_cpus = n;
    return 0;
}

int xc_vcpu_getinfo(xc_interface *xch, uint32_t domid, uint32_t vcpu, xc_vcpuinfo_t *info)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (vcpu >= d->vcpus) {
        errno = EINVAL;
        return -1;
    }
    info->online = 1;
    info->running = !(d->flags & XEN_DOMINF_paused);
    info->blocked = 0;
    info->cpu_time = 500000000ULL * (vcpu + 1);
    info->cpu = vcpu % 4;
    return 0;
}

static int set_flag(uint32_t domid, uint32_t flag, int on)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->flags = on ? (d->flags | flag) : (d->flags & ~flag);
    return 0;
}

int xc_domain_pause(xc_interface *xch, uint32_t domid) { return set_flag(domid, XEN_DOMINF_paused, 1); }
int xc_domain_unpause(xc_interface *xch, uint32_t domid) { return set_flag(domid, XEN_DOMINF_paused, 0); }

int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->flags = (d->flags & ~(XEN_DOMINF_running | (XEN_DOMINF_shutdownmask << XEN_DOMINF_shutdownshift)))
               | XEN_DOMINF_shutdown | ((uint32_t)reason << XEN_DOMINF_shutdownshift);
    return 0;
}

int xc_domain_destroy(xc_interface *xch, uint32_t domid)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (domid == 0) {
        errno = EINVAL;
        return -1;
    }
    *d = doms[--ndoms];
    return 0;
}

int xc_domain_setmaxmem(xc_interface *xch, uint32_t domid, uint64_t max_memkb)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->max_kib = max_memkb;
    return 0;
}

int xc_domain_max_vcpus(xc_interface *xch, uint32_t domid, unsigned int max)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->vcpus = max;
    return 0;
}

int xc_sched_id(xc_interface *xch, int *sched_id)
{
    *sched_id = XEN_SCHEDULER_CREDIT;
    return 0;
}

int xc_sched_credit_domain_get(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit *sdom)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    sdom->weight = d->weight;
    sdom->cap = d->cap;
    return 0;
}

int xc_sched_credit_domain_set(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit *sdom)
{
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->weight = sdom->weight;
    d->cap = sdom->cap;
    return 0;
}

int xc_sched_credit2_domain_get(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit2 *sdom)
{
    errno = EINVAL; /* the fake host runs the credit scheduler */
    return -1;
}

int xc_sched_credit2_domain_set(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit2 *sdom)
{
    errno = EINVAL;
    return -1;
}

int xc_version(xc_interface *xch, int cmd, void *arg)
{
    const char *version = getenv("FAKE_XEN_VERSION");
    unsigned major = 4, minor = 17;
    if (version)
        sscanf(version, "%u.%u", &major, &minor);
    switch (cmd) {
    case XENVER_version:
        return (int)(major << 16 | minor);
    case XENVER_extraversion:
        snprintf(arg, sizeof(xen_extraversion_t), ".7-fake");
        return 0;
    case XENVER_capabilities:
        snprintf(arg, sizeof(xen_capabilities_info_t), "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_64");
        return 0;
    case XENVER_changeset:
        snprintf(arg, sizeof(xen_changeset_info_t), "fake");
        return 0;
    case XENVER_compile_info: {
        xen_compile_info_t *ci = arg;
        memset(ci, 0, sizeof(*ci));
        snprintf(ci->compiler, sizeof(ci->compiler), "gcc (fake)");
        snprintf(ci->compile_by, sizeof(ci->compile_by), "xapid");
        snprintf(ci->compile_domain, sizeof(ci->compile_domain), "example.org");
        snprintf(ci->compile_date, sizeof(ci->compile_date), "Mon Jan  1 00:00:00 UTC 2024");
        return 0;
    }
    }
    errno = ENOSYS;
    return -1;
}

/* ---- libxenevtchn: a pipe whose read end never becomes readable ---- */

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    xenevtchn_handle *h = calloc(1, sizeof(*h));
    if (h && pipe2(h->pipe, O_CLOEXEC) < 0) {
        free(h);
        return NULL;
    }
    return h;
}

xenevtchn_handle *xenevtchn_fdopen(struct xentoollog_logger *logger, int fd, unsigned open_flags)
{
    return xenevtchn_open(logger, open_flags);
}

int xenevtchn_fd(xenevtchn_handle *xce) { return xce->pipe[0]; }
int xenevtchn_notify(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }
xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *xce, uint32_t domid, evtchn_port_t remote_port)
{
    return next_port++;
}
xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq) { return next_port++; }
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    errno = EAGAIN;
    return -1;
}

/* ---- libxengnttab: a guest's ring page is a private anonymous page ---- */

xengnttab_handle *xengnttab_open(struct xentoollog_logger *logger, unsigned open_flags)
{
    return calloc(1, sizeof(xengnttab_handle));
}

int xengnttab_close(xengnttab_handle *xgt)
{
    free(xgt);
    return 0;
}

int xengnttab_set_max_grants(xengnttab_handle *xgt, uint32_t nr_grants) { return 0; }

void *xengnttab_map_grant_ref(xengnttab_handle *xgt, uint32_t domid, uint32_t ref, int prot)
{
    void *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

int xengnttab_unmap(xengnttab_handle *xgt, void *start_address, uint32_t count)
{
    return munmap(start_address, (size_t)PAGE * count);
}

/* ---- /proc/xen/xsd_port and /proc/xen/xsd_kva ---- */

static int memfd_with(const char *name, const char *content, size_t size)
{
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0)
        return -1;
    if (ftruncate(fd, size) < 0 || (content && pwrite(fd, content, strlen(content), 0) < 0)) {
        close(fd);
        return -1;
    }
    return fd;
}

int open(const char *path, int flags, ...)
{
    static int (*real_open)(const char *, int, ...);
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    if (strcmp(path, "/proc/xen/xsd_port") == 0)
        return memfd_with("xsd_port", "1", 1);
    if (strcmp(path, "/proc/xen/xsd_kva") == 0)
        return memfd_with("xsd_kva", NULL, PAGE);
    if (real_open == NULL)
        real_open = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open");
    return real_open(path, flags, mode);
}
