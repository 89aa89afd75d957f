/*
 * fake_xen.c — a stand-in for the hypervisor-facing calls of the Xen 4.17 libraries.
 *
 * Two uses, one shared object (gcc -shared -fPIC fake_xen.c -o fake_xen.so -ldl):
 *
 * 1. LD_PRELOAD for the real C xenstored (xen-utils-4.17): fakes the 17 libxenctrl,
 *    libxenevtchn and libxengnttab functions it imports and interposes open() for
 *    /proc/xen/xsd_port and /proc/xen/xsd_kva, so the daemon runs without a hypervisor.
 * 2. Loaded with ctypes.CDLL as a fake libxenctrl: the xc_* calls the Python bindings make,
 *    answered from a domain table with memory accounting (a 4 GiB, 4-CPU host).
 *
 * Domains: dom0 always exists; FAKE_XEN_DOMIDS (e.g. "1,2") adds others.  The table is
 * (re)built from that variable by fake_xen_reset() and lazily on first use.  With
 * FAKE_XEN_STATE naming a file, the table is shared through it by every process that loads
 * this object: a fake hypercall that shuts down or destroys a domain then raises
 * VIRQ_DOM_EXC in the preloaded xenstored (a byte on its event-channel pipe), which fires
 * @releaseDomain as on a real host.  Time stands still until fake_xen_advance(ns).
 * fake_xen_create/balloon/set_online_vcpus are the domain builder's and guest's parts, for
 * the fake libxenlight (fake_xenlight.c) and the fake guest agent of the tests.
 * FAKE_XEN_VERSION ("4.17" by default) is what xc_version(XENVER_version) reports.
 * Prototypes come from the installed headers, so a signature mismatch fails to compile.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenevtchn.h>
#include <xengnttab.h>

#define VIRQ_DOM_EXC 3

struct xc_interface_core { int dummy; };
struct xenevtchn_handle { int pipe[2]; };
struct xengntdev_handle { int dummy; };

#include "fake_table.h"

/* One lock for the table: ctypes releases the GIL, so the driver's threads and the fake
 * guests call in concurrently. */
static pthread_mutex_t table_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static void unlock_table(int *unused) { pthread_mutex_unlock(&table_lock); }
#define LOCKED pthread_mutex_lock(&table_lock); int locked_ __attribute__((cleanup(unlock_table))) = 0; (void)locked_

static struct fake_hv private_hv;
static evtchn_port_t next_port = 10, virq_port = 0;

static int cmp_dom(const void *a, const void *b)
{
    const struct fake_dom *x = a, *y = b;
    return (x->domid > y->domid) - (x->domid < y->domid);
}

static struct fake_hv *map_state(void)
{
    const char *path = getenv("FAKE_XEN_STATE");
    if (path == NULL || *path == 0)
        return &private_hv;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0)
        return &private_hv;
    struct stat st;
    if (fstat(fd, &st) < 0 || (st.st_size < (off_t)sizeof(struct fake_hv) && ftruncate(fd, sizeof(struct fake_hv)) < 0)) {
        close(fd);
        return &private_hv;
    }
    void *p = mmap(NULL, sizeof(struct fake_hv), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    return p == MAP_FAILED ? &private_hv : p;
}

/* Rebuild the domain table: dom0 plus the comma-separated domids in FAKE_XEN_DOMIDS.  The
 * table lives in $FAKE_XEN_STATE when set (re-read here).  xenstored's registration survives. */
void fake_xen_reset(void)
{
    LOCKED;
    if (hv != NULL && hv != &private_hv)
        munmap(hv, sizeof(*hv));
    hv = map_state();
    int valid = hv->magic == MAGIC;
    int32_t pid = valid ? hv->xsd_pid : 0, wfd = valid ? hv->xsd_wfd : 0;
    uint32_t next = valid ? hv->next_domid : 0;  /* domids are never reused, as in Xen */
    memset(hv, 0, sizeof(*hv));
    hv->xsd_pid = pid;
    hv->xsd_wfd = wfd;
    hv->next_domid = next;
    fill_table();
    qsort(hv->doms, hv->ndoms, sizeof(hv->doms[0]), cmp_dom);
}

static void ensure(void)
{
    if (hv == NULL) {
        hv = map_state();
        if (hv->magic != MAGIC)
            fake_xen_reset();
    }
}

static struct fake_dom *find_dom(uint32_t domid)
{
    ensure();
    for (int i = 0; i < hv->ndoms; i++)
        if (hv->doms[i].domid == domid)
            return &hv->doms[i];
    errno = ESRCH;
    return NULL;
}

static int runs(const struct fake_dom *d)
{
    return (d->flags & XEN_DOMINF_running) && !(d->flags & (XEN_DOMINF_paused | XEN_DOMINF_shutdown | XEN_DOMINF_dying));
}

/* Advance the hypervisor clock: each running vCPU is busy 10% of the time, the rest is idle. */
void fake_xen_advance(uint64_t ns)
{
    LOCKED;
    ensure();
    uint64_t busy = 0;
    for (int i = 0; i < hv->ndoms; i++)
        if (runs(&hv->doms[i])) {
            hv->doms[i].cpu_ns += ns / 10 * hv->doms[i].vcpus;
            busy += ns / 10 * hv->doms[i].vcpus;
        }
    for (int i = 0; i < NCPUS; i++)
        hv->idle_ns[i] += ns - (busy / NCPUS < ns ? busy / NCPUS : ns);
    hv->now_ns += ns;
}

/* Tell xenstored, as Xen's VIRQ_DOM_EXC does, that a domain shut down or died. */
static void kick_xenstored(void)
{
    char path[64];
    if (hv->xsd_pid <= 0 || hv->xsd_pid == getpid())
        return;
    snprintf(path, sizeof(path), "/proc/%d/fd/%d", hv->xsd_pid, hv->xsd_wfd);
    int fd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd >= 0) {
        if (write(fd, "!", 1) < 0) { /* a full pipe already carries a pending notification */ }
        close(fd);
    }
}

static uint64_t used_pages(void)
{
    uint64_t used = 0;
    for (int i = 0; i < hv->ndoms; i++)
        used += hv->doms[i].tot_pages;
    return used;
}

/* The domain builder's part of a domain creation (for the fake libxenlight): a new paused
 * domain with *handle*, or -1 with ENOMEM (memory), EEXIST (handle in use) or ENOSPC (table). */
int fake_xen_create(const uint8_t *handle, int hvm, uint64_t max_kib, uint64_t target_kib,
                    uint32_t max_vcpus, uint32_t vcpus, uint64_t cpu_ns, uint32_t *domid)
{
    LOCKED;
    ensure();
    for (int i = 0; i < hv->ndoms; i++)
        if (memcmp(hv->doms[i].handle, handle, 16) == 0) {
            errno = EEXIST;
            return -1;
        }
    if (used_pages() + target_kib / 4 > TOTAL_PAGES) {
        errno = ENOMEM;
        return -1;
    }
    if (hv->ndoms >= MAX_DOMS) {
        errno = ENOSPC;
        return -1;
    }
    struct fake_dom *d = &hv->doms[hv->ndoms++];
    memset(d, 0, sizeof(*d));
    d->domid = hv->next_domid++;
    memcpy(d->handle, handle, 16);
    d->flags = XEN_DOMINF_paused | XEN_DOMINF_blocked | (hvm ? XEN_DOMINF_hvm_guest : 0);
    d->max_kib = max_kib;
    d->tot_pages = target_kib / 4;
    d->max_vcpus = max_vcpus;
    d->vcpus = vcpus;
    d->weight = 256;
    d->cpu_ns = cpu_ns;
    *domid = d->domid;
    return 0;
}

/* The guest's side: balloon to *kib*, or bring *vcpus* online. */
int fake_xen_balloon(uint32_t domid, uint64_t kib)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (kib > d->max_kib || used_pages() - d->tot_pages + kib / 4 > TOTAL_PAGES) {
        errno = ENOMEM;
        return -1;
    }
    d->tot_pages = kib / 4;
    return 0;
}

int fake_xen_set_online_vcpus(uint32_t domid, uint32_t vcpus)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (vcpus < 1 || vcpus > d->max_vcpus) {
        errno = EINVAL;
        return -1;
    }
    d->vcpus = vcpus;
    return 0;
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

/* xenstored: domid D exists iff this returns 1 with info->domid == D; shutdown, crashed and
 * dying make it fire @releaseDomain. */
int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid, unsigned int max_doms, xc_dominfo_t *info)
{
    LOCKED;
    int n = 0;
    if (find_dom(0) == NULL)
        return -1;
    for (int i = 0; i < hv->ndoms && (unsigned)n < max_doms; i++) {
        const struct fake_dom *d = &hv->doms[i];
        if (d->domid < first_domid)
            continue;
        unsigned reason = (d->flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask;
        memset(&info[n], 0, sizeof(info[n]));
        info[n].domid = d->domid;
        info[n].running = runs(d);
        info[n].paused = !!(d->flags & XEN_DOMINF_paused);
        info[n].dying = !!(d->flags & XEN_DOMINF_dying);
        info[n].shutdown = !!(d->flags & XEN_DOMINF_shutdown) && reason != SHUTDOWN_crash;
        info[n].crashed = !!(d->flags & XEN_DOMINF_shutdown) && reason == SHUTDOWN_crash;
        info[n].shutdown_reason = reason;
        info[n].nr_online_vcpus = d->vcpus;
        memcpy(info[n].handle, d->handle, 16);
        n++;
    }
    return n;
}

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains, xc_domaininfo_t *info)
{
    LOCKED;
    int n = 0;
    ensure();
    for (int i = 0; i < hv->ndoms && (unsigned)n < max_domains; i++) {
        const struct fake_dom *d = &hv->doms[i];
        if (d->domid < first_domain)
            continue;
        memset(&info[n], 0, sizeof(info[n]));
        info[n].domain = d->domid;
        info[n].flags = d->flags;
        info[n].tot_pages = d->tot_pages;
        info[n].max_pages = d->max_kib / 4;
        info[n].cpu_time = d->cpu_ns;
        info[n].nr_online_vcpus = d->vcpus;
        info[n].max_vcpu_id = d->max_vcpus - 1;
        memcpy(info[n].handle, d->handle, 16);
        n++;
    }
    return n;
}

int xc_physinfo(xc_interface *xch, xc_physinfo_t *info)
{
    LOCKED;
    ensure();
    memset(info, 0, sizeof(*info));
    info->threads_per_core = 2;
    info->cores_per_socket = 2;
    info->nr_cpus = NCPUS;
    info->max_cpu_id = NCPUS - 1;
    info->nr_nodes = 1;
    info->cpu_khz = 2400000;
    info->capabilities = XEN_SYSCTL_PHYSCAP_hvm | XEN_SYSCTL_PHYSCAP_pv;
    info->total_pages = TOTAL_PAGES;
    info->free_pages = TOTAL_PAGES - used_pages();
    info->max_mfn = TOTAL_PAGES - 1;
    return 0;
}

int xc_get_max_cpus(xc_interface *xch) { return NCPUS; }

int xc_getcpuinfo(xc_interface *xch, int max_cpus, xc_cpuinfo_t *info, int *nr_cpus)
{
    LOCKED;
    ensure();
    int n = max_cpus < NCPUS ? max_cpus : NCPUS;
    for (int i = 0; i < n; i++)
        info[i].idletime = hv->idle_ns[i];
    *nr_cpus = n;
    return 0;
}

int xc_vcpu_getinfo(xc_interface *xch, uint32_t domid, uint32_t vcpu, xc_vcpuinfo_t *info)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (vcpu >= d->max_vcpus) {
        errno = EINVAL;
        return -1;
    }
    info->online = vcpu < d->vcpus;
    info->running = runs(d) && vcpu < d->vcpus;
    info->blocked = 0;
    info->cpu_time = vcpu < d->vcpus ? d->cpu_ns / d->vcpus : 0;
    info->cpu = vcpu % NCPUS;
    return 0;
}

static int set_flag(uint32_t domid, uint32_t flag, int on)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->flags = on ? (d->flags | flag) : (d->flags & ~flag);
    if (!on && flag == XEN_DOMINF_paused)
        d->flags |= XEN_DOMINF_running;
    return 0;
}

int xc_domain_pause(xc_interface *xch, uint32_t domid) { return set_flag(domid, XEN_DOMINF_paused, 1); }
int xc_domain_unpause(xc_interface *xch, uint32_t domid) { return set_flag(domid, XEN_DOMINF_paused, 0); }

int xc_domain_shutdown(xc_interface *xch, uint32_t domid, int reason)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->flags = (d->flags & ~(XEN_DOMINF_running | (XEN_DOMINF_shutdownmask << XEN_DOMINF_shutdownshift)))
               | XEN_DOMINF_shutdown | ((uint32_t)reason << XEN_DOMINF_shutdownshift);
    kick_xenstored();
    return 0;
}

int xc_domain_destroy(xc_interface *xch, uint32_t domid)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    if (domid == 0) {
        errno = EINVAL;
        return -1;
    }
    memmove(d, d + 1, (size_t)(&hv->doms[--hv->ndoms] - d) * sizeof(*d));  /* the table stays in domid order */
    kick_xenstored();
    return 0;
}

int xc_domain_setmaxmem(xc_interface *xch, uint32_t domid, uint64_t max_memkb)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->max_kib = max_memkb;
    return 0;
}

int xc_domain_max_vcpus(xc_interface *xch, uint32_t domid, unsigned int max)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (d == NULL)
        return -1;
    d->max_vcpus = d->vcpus = max;
    return 0;
}

/* The scheduler: credit2 (stock Debian's default) when FAKE_XEN_SCHED=credit2, else credit.
 * The calls of the other scheduler fail with EINVAL, as Xen's do. */
static int credit2(void)
{
    const char *sched = getenv("FAKE_XEN_SCHED");
    return sched != NULL && strcmp(sched, "credit2") == 0;
}

int xc_sched_id(xc_interface *xch, int *sched_id)
{
    *sched_id = credit2() ? XEN_SCHEDULER_CREDIT2 : XEN_SCHEDULER_CREDIT;
    return 0;
}

static int sched_get(uint32_t domid, int want2, uint16_t *weight, uint16_t *cap)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (credit2() != want2) {
        errno = EINVAL;
        return -1;
    }
    if (d == NULL)
        return -1;
    *weight = d->weight;
    *cap = d->cap;
    return 0;
}

static int sched_set(uint32_t domid, int want2, uint16_t weight, uint16_t cap)
{
    LOCKED;
    struct fake_dom *d = find_dom(domid);
    if (credit2() != want2) {
        errno = EINVAL;
        return -1;
    }
    if (d == NULL)
        return -1;
    d->weight = weight;
    d->cap = cap;
    return 0;
}

int xc_sched_credit_domain_get(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit *sdom)
{
    return sched_get(domid, 0, &sdom->weight, &sdom->cap);
}

int xc_sched_credit_domain_set(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit *sdom)
{
    return sched_set(domid, 0, sdom->weight, sdom->cap);
}

int xc_sched_credit2_domain_get(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit2 *sdom)
{
    return sched_get(domid, 1, &sdom->weight, &sdom->cap);
}

int xc_sched_credit2_domain_set(xc_interface *xch, uint32_t domid, struct xen_domctl_sched_credit2 *sdom)
{
    return sched_set(domid, 1, sdom->weight, sdom->cap);
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
    case XENVER_commandline:
        snprintf(arg, sizeof(xen_commandline_t), "%s", getenv("FAKE_XEN_CMDLINE") ? getenv("FAKE_XEN_CMDLINE") : "");
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

/* ---- libxenevtchn: a pipe that becomes readable when a fake hypercall raises VIRQ_DOM_EXC ---- */

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    xenevtchn_handle *h = calloc(1, sizeof(*h));
    if (h && pipe2(h->pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
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
/* xenstored binds VIRQ_DOM_EXC: publish its pipe so fake hypercalls can raise the VIRQ. */
xenevtchn_port_or_error_t xenevtchn_bind_virq(xenevtchn_handle *xce, unsigned int virq)
{
    evtchn_port_t port = next_port++;
    if (virq == VIRQ_DOM_EXC) {
        ensure();
        virq_port = port;
        hv->xsd_pid = getpid();
        hv->xsd_wfd = xce->pipe[1];
    }
    return port;
}
int xenevtchn_unbind(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }
int xenevtchn_unmask(xenevtchn_handle *xce, evtchn_port_t port) { return 0; }

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *xce)
{
    char byte;
    if (read(xce->pipe[0], &byte, 1) == 1)
        return virq_port;
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
