/*
 * fake_privcmd.c — a fake Xen hypervisor BELOW the privcmd device, for tests.
 *
 * An LD_PRELOAD shared object (gcc -shared -fPIC fake_privcmd.c -o fake_privcmd.so -ldl).
 * Unlike fake_xen.c, which replaces libxenctrl functions, this one lets the REAL
 * libxenctrl, libxencall, libxenforeignmemory, libxenguest and libxenlight run: it
 * interposes open() of /dev/xen/privcmd (and /proc/xen/privcmd), stat()/access() of it,
 * ioctl() and mmap() on the file it hands out, and answers IOCTL_PRIVCMD_HYPERCALL for the
 * hypercalls the libraries issue (xen_version, sysctl, domctl, memory_op, sched_op,
 * event_channel_op).  /dev/xen/hypercall is left absent, so libxencall allocates its
 * hypercall buffers as anonymous memory (its documented fallback) and hypercall arguments
 * are plain pointers in this process.
 *
 * The domain table is fake_xen.c's struct fake_hv (same layout, same magic), in the file
 * named by FAKE_XEN_STATE, so the real xenstored running under fake_xen.so as its shim
 * sees the same domains, and a destroy or shutdown here raises its VIRQ_DOM_EXC
 * (@releaseDomain).  Every process that preloads this object with the same FAKE_XEN_STATE
 * (including libxl's forked children) shares the table; each hypercall runs under
 * flock() on that file.
 *
 * Environment:
 *   FAKE_XEN_STATE   the shared domain-table file (else the table is private to the process)
 *   FAKE_XEN_DOMIDS  domains besides dom0 when the table is first created ("1,2")
 *   FAKE_XEN_SCHED   credit2 (default, as stock Debian's Xen 4.17) or credit
 *   FAKE_PRIVCMD_FAIL a file of refusals the tests inject, one "<kind> <cmd> <errno>" a line
 *                    (kind: domctl or sysctl; e.g. "domctl 3 1": pausedomain fails with EPERM);
 *                    read at every such hypercall, so writing or emptying it takes effect at once
 *   FAKE_PRIVCMD_LOG a file to which unknown hypercalls/commands/ioctls are appended, one
 *                    line each ("ENOSYS domctl cmd=NN"); with FAKE_PRIVCMD_TRACE=1 every
 *                    hypercall is logged there too
 *
 * Unknown hypercalls and unknown sysctl/domctl/memory_op commands fail with -ENOSYS and are
 * logged, so a missing command is obvious.  Scheduler operations for the other scheduler's
 * structures fail with EINVAL, as in Xen.  Guest memory mapped through privcmd
 * (IOCTL_PRIVCMD_MMAPBATCH_V2) is backed per domain by a file beside the state file, so the
 * domain builder's mappings of the same frame agree.  Enough of a PV guest is modelled for
 * libxc's save and restore (see "the fake PV guest" below): an identity M2P
 * (XENMEM_machphys_mfn_list), vCPU contexts kept by set/getvcpucontext, page types
 * (getpageframeinfo3), log-dirty that never finds a dirty page, and a guest that publishes its
 * p2m when it first runs and names its start_info when it shuts down for suspend.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xen/memory.h>
#include <xen/version.h>
#include <xen/event_channel.h>
#include <xen/sched.h>
#include <xen/grant_table.h>
#include <xen/sys/privcmd.h>

/* ---- the shared domain table (fake_table.h) ---- */

#include "fake_table.h"

static struct fake_hv private_hv;
static pthread_mutex_t private_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static uint32_t next_port = 20;

/* ---- logging of what the fake does not know ---- */

static void note(const char *fmt, ...)
{
    const char *path = getenv("FAKE_PRIVCMD_LOG");
    if (path == NULL || *path == 0)
        return;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(line) - 2)
        n = sizeof(line) - 2;
    line[n++] = '\n';
    if (write(fd, line, n) < 0) { /* nothing to do */ }
    close(fd);
}

static int tracing(void)
{
    const char *t = getenv("FAKE_PRIVCMD_TRACE");
    return t && *t == '1';
}

/* The errno FAKE_PRIVCMD_FAIL names for this *kind* of call and *cmd* (0: none). */
static int injected(const char *kind, unsigned long cmd)
{
    const char *path = getenv("FAKE_PRIVCMD_FAIL");
    if (path == NULL || *path == 0)
        return 0;
    int fd = (int)syscall(SYS_openat, AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    char *save = NULL;
    for (char *line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char k[32];
        unsigned long c;
        int e;
        if (sscanf(line, "%31s %lu %d", k, &c, &e) == 3 && strcmp(k, kind) == 0 && c == cmd && e > 0)
            return e;
    }
    return 0;
}

static int unknown(const char *what, unsigned long cmd)
{
    note("ENOSYS %s cmd=%lu", what, cmd);
    return -ENOSYS;
}

/* ---- the table ---- */

static int real_openat(int dirfd, const char *path, int flags, mode_t mode)
{
    return (int)syscall(SYS_openat, dirfd, path, flags, mode);
}

static void init_table(void)
{
    memset(hv, 0, sizeof(*hv));
    fill_table();
}

static const char *state_path(void)
{
    const char *path = getenv("FAKE_XEN_STATE");
    return path && *path ? path : NULL;
}

static void ensure(void)
{
    if (hv != NULL)
        return;
    const char *path = state_path();
    hv = &private_hv;
    if (path) {
        int fd = real_openat(AT_FDCWD, path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        struct stat st;
        if (fd >= 0 && fstat(fd, &st) == 0
            && (st.st_size >= (off_t)sizeof(struct fake_hv) || ftruncate(fd, sizeof(struct fake_hv)) == 0)) {
            void *p = (void *)syscall(SYS_mmap, NULL, sizeof(struct fake_hv), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
            if (p != MAP_FAILED)
                hv = p;
        }
        if (fd >= 0)
            close(fd);
    }
    if (hv->magic != MAGIC)
        init_table();
}

/* One hypercall at a time across every process sharing the table (flock on the state file,
 * a new open file description each time so forked children exclude their parent too). */
static int lock_table(void)
{
    ensure();
    const char *path = state_path();
    if (path == NULL || hv == &private_hv) {
        pthread_mutex_lock(&private_lock);
        return -1;
    }
    int fd = real_openat(AT_FDCWD, path, O_RDONLY | O_CLOEXEC, 0);
    if (fd >= 0)
        while (flock(fd, LOCK_EX) < 0 && errno == EINTR)
            ;
    return fd;
}

static void unlock_table(int fd)
{
    if (fd >= 0)
        close(fd);
    else
        pthread_mutex_unlock(&private_lock);
}

static struct fake_dom *find_dom(uint32_t domid)
{
    for (int i = 0; i < hv->ndoms; i++)
        if (hv->doms[i].domid == domid)
            return &hv->doms[i];
    return NULL;
}

static uint64_t used_pages(void)
{
    uint64_t used = 0;
    for (int i = 0; i < hv->ndoms; i++)
        used += hv->doms[i].tot_pages;
    return used;
}

static int runs(const struct fake_dom *d)
{
    return (d->flags & XEN_DOMINF_running) && !(d->flags & (XEN_DOMINF_paused | XEN_DOMINF_shutdown | XEN_DOMINF_dying));
}

/* Raise VIRQ_DOM_EXC in the xenstored running under fake_xen.so (a byte on its pipe). */
static void kick_xenstored(void)
{
    char path[64];
    if (hv->xsd_pid <= 0 || hv->xsd_pid == getpid())
        return;
    snprintf(path, sizeof(path), "/proc/%d/fd/%d", hv->xsd_pid, hv->xsd_wfd);
    int fd = real_openat(AT_FDCWD, path, O_WRONLY | O_NONBLOCK | O_CLOEXEC, 0);
    if (fd >= 0) {
        if (write(fd, "!", 1) < 0) { /* a full pipe already carries a pending notification */ }
        close(fd);
    }
}

static uint32_t scheduler(void)
{
    const char *s = getenv("FAKE_XEN_SCHED");
    return s && strcmp(s, "credit") == 0 ? XEN_SCHEDULER_CREDIT : XEN_SCHEDULER_CREDIT2;
}

/* ---- guest memory: one sparse file per domain beside the state file (or an unlinked one) ---- */

#define MAX_MEMFILES 16
static struct { uint32_t domid; int fd; } memfiles[MAX_MEMFILES];
static int nmemfiles;

static int guest_memory(uint32_t domid)
{
    for (int i = 0; i < nmemfiles; i++)
        if (memfiles[i].domid == domid)
            return memfiles[i].fd;
    int fd = -1;
    const char *path = state_path();
    if (path) {
        char name[4096];
        snprintf(name, sizeof(name), "%s.mem%u", path, domid);
        fd = real_openat(AT_FDCWD, name, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    } else {
        fd = memfd_create("fake-guest-memory", MFD_CLOEXEC);
    }
    if (fd < 0)
        return -1;
    if (ftruncate(fd, 1ULL << 36) < 0) {  /* sparse: 64 GiB of guest frame numbers */
        close(fd);
        return -1;
    }
    if (nmemfiles < MAX_MEMFILES) {
        memfiles[nmemfiles].domid = domid;
        memfiles[nmemfiles++].fd = fd;
    }
    return fd;
}

static void drop_guest_memory(uint32_t domid)
{
    const char *path = state_path();
    for (int i = 0; i < nmemfiles; i++)
        if (memfiles[i].domid == domid) {
            close(memfiles[i].fd);
            memfiles[i] = memfiles[--nmemfiles];
            break;
        }
    if (path) {
        char name[4096];
        snprintf(name, sizeof(name), "%s.mem%u", path, domid);
        unlink(name);
    }
}

/* ---- the fake PV guest: what a running Linux PV kernel keeps for save/restore ----
 *
 * Frames are identity-mapped (populate_physmap leaves the builder's pfns as the "mfns"), so the
 * M2P is the identity too.  Beside guest RAM, each domain's memory file holds, at frames no guest
 * uses: the shared_info page (SHINFO_FRAME), and bookkeeping (META_FRAME: the start_info frame
 * found at setvcpucontext; then one context per vCPU as setvcpucontext last set it).  When the
 * domain first runs (unpause) the fake guest publishes its p2m as a Linux PV kernel does: a
 * three-level tree (frame list list in shared_info's arch.pfn_to_mfn_frame_list_list, frame
 * list, leaves) in the top frames of its RAM, and arch.max_pfn.  The M2P lives in DOMID_XEN's
 * memory file at M2P_FRAME, handed out by XENMEM_machphys_mfn_list. */

#define SHINFO_FRAME 0xff000ULL    /* beyond the RAM of any guest below ~4 GiB, clear of the grant frames (0xf0000+) */
#define META_FRAME 0xffff00ULL     /* near the end of the 24-bit frame space MMAPBATCH maps */
#define M2P_FRAME 0x100000ULL      /* in DOMID_XEN's file */
#define META_MAGIC 0x4d657461ULL
#define PV_VIRT_BASE 0xffffffff80000000ULL  /* fake_pv_kernel.S's XEN_ELFNOTE_VIRT_BASE */
#define P2M_FPP (PAGE / 8)

struct guest_meta {
    uint64_t magic;
    uint64_t start_info_pfn;  /* ~0: not found */
    uint64_t contexts;        /* bit per vCPU: a context was set */
};

static int mem_io(uint32_t domid, uint64_t frame, uint64_t off, void *buf, size_t len, int write)
{
    int fd = guest_memory(domid);
    if (fd < 0)
        return -1;
    off_t at = (off_t)(frame * PAGE + off);
    ssize_t n = write ? pwrite(fd, buf, len, at) : pread(fd, buf, len, at);
    return n == (ssize_t)len ? 0 : -1;
}

#define CTX_SIZE sizeof(vcpu_guest_context_any_t)
#define CTX_FRAME(vcpu) (META_FRAME + 1 + 2ULL * (vcpu))

static int read_meta(uint32_t domid, struct guest_meta *m)
{
    return mem_io(domid, META_FRAME, 0, m, sizeof(*m), 0) == 0 && m->magic == META_MAGIC ? 0 : -1;
}

static int is_start_info(uint32_t domid, uint64_t pfn, uint64_t max)
{
    char magic[8];
    return pfn < max && mem_io(domid, pfn, 0, magic, sizeof(magic), 0) == 0 && memcmp(magic, "xen-3.0", 7) == 0;
}

static long set_context(struct fake_dom *d, struct xen_domctl_vcpucontext *v)
{
    if (v->vcpu >= d->max_vcpus || v->vcpu >= 64)
        return -EINVAL;
    if (v->ctxt.p == NULL || (d->flags & XEN_DOMINF_hvm_guest))
        return 0;
    vcpu_guest_context_any_t *c = (void *)v->ctxt.p;
    if (mem_io(d->domid, CTX_FRAME(v->vcpu), 0, c, CTX_SIZE, 1) < 0)
        return -EIO;
    struct guest_meta m;
    if (read_meta(d->domid, &m) < 0) {
        memset(&m, 0, sizeof(m));
        m.magic = META_MAGIC;
        m.start_info_pfn = ~0ULL;
    }
    m.contexts |= 1ULL << v->vcpu;
    if (v->vcpu == 0) {
        /* the builder points rsi at start_info (virtual); a restored vCPU names its frame in rdx */
        uint64_t rsi = c->x64.user_regs.rsi, rdx = c->x64.user_regs.rdx;
        if (rsi >= PV_VIRT_BASE && is_start_info(d->domid, (rsi - PV_VIRT_BASE) / PAGE, d->tot_pages))
            m.start_info_pfn = (rsi - PV_VIRT_BASE) / PAGE;
        else if (is_start_info(d->domid, rdx, d->tot_pages))
            m.start_info_pfn = rdx;
    }
    return mem_io(d->domid, META_FRAME, 0, &m, sizeof(m), 1) < 0 ? -EIO : 0;
}

/* A vCPU never given a context shares vCPU 0's (a PV kernel brings its other vCPUs up on the
 * same page tables). */
static long get_context(struct fake_dom *d, struct xen_domctl_vcpucontext *v)
{
    struct guest_meta m;
    if (v->vcpu >= d->max_vcpus || v->vcpu >= 64)
        return -EINVAL;
    if (v->ctxt.p == NULL)
        return 0;
    if (read_meta(d->domid, &m) < 0 || !(m.contexts & 1)) {
        memset((void *)v->ctxt.p, 0, CTX_SIZE);
        return 0;
    }
    uint32_t from = (m.contexts >> v->vcpu) & 1 ? v->vcpu : 0;
    return mem_io(d->domid, CTX_FRAME(from), 0, (void *)v->ctxt.p, CTX_SIZE, 0) < 0 ? -EIO : 0;
}

/* The guest's SCHEDOP_shutdown(suspend): it names its start_info frame in rdx (the "suspend
 * record" the save converts to a pfn). */
static void guest_suspends(struct fake_dom *d)
{
    struct guest_meta m;
    vcpu_guest_context_any_t c;
    if (read_meta(d->domid, &m) < 0 || !(m.contexts & 1) || m.start_info_pfn == ~0ULL)
        return;
    if (mem_io(d->domid, CTX_FRAME(0), 0, &c, CTX_SIZE, 0) == 0) {
        c.x64.user_regs.rdx = m.start_info_pfn;
        mem_io(d->domid, CTX_FRAME(0), 0, &c, CTX_SIZE, 1);
    }
}

/* The guest runs: it publishes its p2m (see above) unless shared_info already anchors one. */
static void guest_runs(struct fake_dom *d)
{
    struct guest_meta m;
    struct arch_shared_info arch;
    const off_t at = offsetof(struct shared_info, arch);
    if ((d->flags & XEN_DOMINF_hvm_guest) || read_meta(d->domid, &m) < 0 || !(m.contexts & 1))
        return;
    if (mem_io(d->domid, SHINFO_FRAME, at, &arch, sizeof(arch), 0) < 0 || arch.pfn_to_mfn_frame_list_list)
        return;
    uint64_t n = arch.max_pfn && arch.max_pfn <= d->tot_pages ? arch.max_pfn : d->tot_pages;
    uint64_t leaves = (n + P2M_FPP - 1) / P2M_FPP, fls = (leaves + P2M_FPP - 1) / P2M_FPP;
    if (n < 16 || fls > P2M_FPP || leaves + fls + 1 >= n / 2) {
        note("note: domain %u: cannot publish a p2m for %llu pages", d->domid, (unsigned long long)n);
        return;
    }
    uint64_t fll = n - 1, fl0 = fll - fls, leaf0 = fl0 - leaves;
    uint64_t page[P2M_FPP];
    for (uint64_t l = 0; l < leaves; l++) {
        for (uint64_t i = 0; i < P2M_FPP; i++)
            page[i] = l * P2M_FPP + i < n ? l * P2M_FPP + i : ~0ULL;
        mem_io(d->domid, leaf0 + l, 0, page, PAGE, 1);
    }
    for (uint64_t f = 0; f < fls; f++) {
        for (uint64_t i = 0; i < P2M_FPP; i++)
            page[i] = f * P2M_FPP + i < leaves ? leaf0 + f * P2M_FPP + i : 0;
        mem_io(d->domid, fl0 + f, 0, page, PAGE, 1);
    }
    for (uint64_t i = 0; i < P2M_FPP; i++)
        page[i] = i < fls ? fl0 + i : 0;
    mem_io(d->domid, fll, 0, page, PAGE, 1);
    arch.max_pfn = n;
    arch.pfn_to_mfn_frame_list_list = fll;
    arch.p2m_cr3 = 0;
    mem_io(d->domid, SHINFO_FRAME, at, &arch, sizeof(arch), 1);
}

/* Page types for the save: vCPU 0's top page table is a pinned L4, everything else in RAM a
 * plain page (the fake does not track the lower tables), frames beyond RAM invalid. */
static long page_types(struct fake_dom *d, struct xen_domctl_getpageframeinfo3 *p)
{
    struct guest_meta m;
    vcpu_guest_context_any_t c;
    uint64_t cr3 = ~0ULL;
    if (read_meta(d->domid, &m) == 0 && (m.contexts & 1) && mem_io(d->domid, CTX_FRAME(0), 0, &c, CTX_SIZE, 0) == 0)
        cr3 = c.x64.ctrlreg[3] >> 12;
    xen_pfn_t *arr = p->array.p;
    for (uint64_t i = 0; i < p->num; i++)
        arr[i] = arr[i] == cr3 ? XEN_DOMCTL_PFINFO_L4TAB | XEN_DOMCTL_PFINFO_LPINTAB
                 : arr[i] < d->tot_pages ? XEN_DOMCTL_PFINFO_NOTAB : XEN_DOMCTL_PFINFO_XTAB;
    return 0;
}

/* Log-dirty: the fake guest writes nothing while the toolstack looks, so no page is ever dirty. */
static long shadow_op(struct xen_domctl_shadow_op *s)
{
    switch (s->op) {
    case XEN_DOMCTL_SHADOW_OP_OFF:
    case XEN_DOMCTL_SHADOW_OP_ENABLE:
    case XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
    case XEN_DOMCTL_SHADOW_OP_SET_ALLOCATION:
        return 0;
    case XEN_DOMCTL_SHADOW_OP_GET_ALLOCATION:
        s->mb = 0;
        return 0;
    case XEN_DOMCTL_SHADOW_OP_CLEAN:
    case XEN_DOMCTL_SHADOW_OP_PEEK:
        if (s->dirty_bitmap.p)
            memset(s->dirty_bitmap.p, 0, (s->pages + 7) / 8);
        memset(&s->stats, 0, sizeof(s->stats));
        return 0;
    }
    return unknown("domctl shadow_op", s->op);
}

/* The identity M2P, written once into DOMID_XEN's file. */
static int fill_m2p(void)
{
    uint64_t probe = 0, buf[P2M_FPP];
    if (mem_io(DOMID_XEN, M2P_FRAME, 8 * (TOTAL_PAGES - 1), &probe, 8, 0) == 0 && probe == TOTAL_PAGES - 1)
        return 0;
    for (uint64_t f = 0; f < TOTAL_PAGES / P2M_FPP; f++) {
        for (uint64_t i = 0; i < P2M_FPP; i++)
            buf[i] = f * P2M_FPP + i;
        if (mem_io(DOMID_XEN, M2P_FRAME + f, 0, buf, PAGE, 1) < 0)
            return -1;
    }
    return 0;
}

/* ---- xen_version ---- */

static long do_xen_version(unsigned long cmd, void *arg)
{
    switch (cmd) {
    case XENVER_version:
        return 4 << 16 | 17;
    case XENVER_extraversion:
        snprintf(arg, sizeof(xen_extraversion_t), ".7-fake");
        return 0;
    case XENVER_capabilities:
        snprintf(arg, sizeof(xen_capabilities_info_t), "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64");
        return 0;
    case XENVER_changeset:
        snprintf(arg, sizeof(xen_changeset_info_t), "fake");
        return 0;
    case XENVER_commandline:
        snprintf(arg, sizeof(xen_commandline_t), "placeholder dom0_mem=1024M");
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
    case XENVER_platform_parameters:
        ((xen_platform_parameters_t *)arg)->virt_start = 0xffff800000000000ULL;
        return 0;
    case XENVER_get_features: {
        xen_feature_info_t *fi = arg;
        fi->submap = 0;
        return 0;
    }
    case XENVER_pagesize:
        return PAGE;
    case XENVER_build_id:
        return -ENODATA;
    }
    return unknown("xen_version", cmd);
}

/* ---- CPUID policy: a minimal Intel one (the vendor leaf only), no MSRs ---- */

#define POLICY_MAX_LEAVES 100  /* below 4.17's CPUID_MAX_SERIALISED_LEAVES */
#define POLICY_MAX_MSRS 8

static int cpu_policy(uint32_t *nr_leaves, xen_cpuid_leaf_t *leaves, uint32_t *nr_msrs, xen_msr_entry_t *msrs)
{
    if (leaves == NULL && msrs == NULL) {
        *nr_leaves = POLICY_MAX_LEAVES;
        *nr_msrs = POLICY_MAX_MSRS;
        return 0;
    }
    if (leaves) {
        /* the vendor leaf, repeated: a real policy has ~100 entries, and libxc serialises the
         * edited policy into a buffer of the size the hypervisor reported */
        xen_cpuid_leaf_t vendor = {0, XEN_CPUID_NO_SUBLEAF, 0x1, 0x756e6547, 0x6c65746e, 0x49656e69};  /* GenuineIntel */
        uint32_t n = *nr_leaves < POLICY_MAX_LEAVES ? *nr_leaves : POLICY_MAX_LEAVES;
        if (n < 1)
            return -ENOBUFS;
        for (uint32_t i = 0; i < n; i++)
            leaves[i] = vendor;
        *nr_leaves = n;
    }
    if (msrs)
        *nr_msrs = 0;
    return 0;
}

/* ---- sysctl ---- */

static void fill_info(xen_domctl_getdomaininfo_t *info, const struct fake_dom *d)
{
    memset(info, 0, sizeof(*info));
    info->domain = d->domid;
    info->flags = d->flags;
    info->tot_pages = d->tot_pages;
    info->max_pages = d->max_kib / 4;
    info->shared_info_frame = SHINFO_FRAME;  /* per-domain memory files: the same frame number in each */
    info->cpu_time = d->cpu_ns;
    info->nr_online_vcpus = d->vcpus;
    info->max_vcpu_id = d->max_vcpus ? d->max_vcpus - 1 : 0;
    info->gpaddr_bits = 52;
    memcpy(info->handle, d->handle, 16);
}

static void fill_bitmap(struct xenctl_bitmap *map, unsigned nbits_set)
{
    uint8_t *bytes = map->bitmap.p;
    unsigned nbytes = (map->nr_bits + 7) / 8;
    if (bytes == NULL)
        return;
    memset(bytes, 0, nbytes);
    for (unsigned i = 0; i < nbits_set && i < map->nr_bits; i++)
        bytes[i / 8] |= 1 << (i % 8);
}

static long do_sysctl(struct xen_sysctl *op)
{
    if (op->interface_version != XEN_SYSCTL_INTERFACE_VERSION)
        return -EACCES;
    int refused = injected("sysctl", op->cmd);
    if (refused)
        return -refused;
    switch (op->cmd) {
    case XEN_SYSCTL_physinfo: {
        struct xen_sysctl_physinfo *pi = &op->u.physinfo;
        memset(pi, 0, sizeof(*pi));
        pi->threads_per_core = 2;
        pi->cores_per_socket = 2;
        pi->nr_cpus = NCPUS;
        pi->max_cpu_id = NCPUS - 1;
        pi->nr_nodes = 1;
        pi->max_node_id = 0;
        pi->cpu_khz = 2400000;
        pi->capabilities = XEN_SYSCTL_PHYSCAP_hvm | XEN_SYSCTL_PHYSCAP_pv | XEN_SYSCTL_PHYSCAP_hap | XEN_SYSCTL_PHYSCAP_shadow;
        pi->total_pages = TOTAL_PAGES;
        pi->free_pages = TOTAL_PAGES - used_pages();
        pi->max_mfn = TOTAL_PAGES - 1;
        return 0;
    }
    case XEN_SYSCTL_sched_id:
        op->u.sched_id.sched_id = scheduler();
        return 0;
    case XEN_SYSCTL_getdomaininfolist: {
        struct xen_sysctl_getdomaininfolist *l = &op->u.getdomaininfolist;
        xen_domctl_getdomaininfo_t *out = l->buffer.p;
        uint32_t n = 0;
        for (int i = 0; i < hv->ndoms && n < l->max_domains; i++)
            if (hv->doms[i].domid >= l->first_domain)
                fill_info(&out[n++], &hv->doms[i]);
        l->num_domains = n;
        return 0;
    }
    case XEN_SYSCTL_getcpuinfo: {
        struct xen_sysctl_getcpuinfo *c = &op->u.getcpuinfo;
        xen_sysctl_cpuinfo_t *out = c->info.p;
        uint32_t n = c->max_cpus < NCPUS ? c->max_cpus : NCPUS;
        for (uint32_t i = 0; i < n; i++)
            out[i].idletime = hv->idle_ns[i];
        c->nr_cpus = n;
        return 0;
    }
    case XEN_SYSCTL_cpupool_op: {
        struct xen_sysctl_cpupool_op *c = &op->u.cpupool_op;
        switch (c->op) {
        case XEN_SYSCTL_CPUPOOL_OP_INFO:
            if (c->cpupool_id > 0)
                return -ENOENT;
            c->cpupool_id = 0;
            c->sched_id = scheduler();
            c->n_dom = hv->ndoms;
            fill_bitmap(&c->cpumap, NCPUS);
            return 0;
        case XEN_SYSCTL_CPUPOOL_OP_FREEINFO:
            fill_bitmap(&c->cpumap, 0);
            return 0;
        case XEN_SYSCTL_CPUPOOL_OP_MOVEDOMAIN:
            return c->cpupool_id == 0 ? 0 : -ENOENT;
        }
        return unknown("sysctl cpupool_op", c->op);
    }
    case XEN_SYSCTL_scheduler_op: {
        struct xen_sysctl_scheduler_op *s = &op->u.scheduler_op;
        if (s->cpupool_id != 0)
            return -ESRCH;
        if (s->sched_id != scheduler())
            return -EINVAL;
        if (s->cmd == XEN_SYSCTL_SCHEDOP_getinfo) {
            if (s->sched_id == XEN_SCHEDULER_CREDIT) {
                s->u.sched_credit.tslice_ms = 30;
                s->u.sched_credit.ratelimit_us = 1000;
                s->u.sched_credit.vcpu_migr_delay_us = 0;
            } else {
                s->u.sched_credit2.ratelimit_us = 1000;
            }
        }
        return 0;
    }
    case XEN_SYSCTL_numainfo: {
        struct xen_sysctl_numainfo *ni = &op->u.numainfo;
        if (ni->meminfo.p == NULL && ni->distance.p == NULL) {
            ni->num_nodes = 1;
            return 0;
        }
        if (ni->num_nodes < 1)
            return -ENOBUFS;
        if (ni->meminfo.p) {
            xen_sysctl_meminfo_t *m = ni->meminfo.p;
            m[0].memsize = TOTAL_PAGES * PAGE;
            m[0].memfree = (TOTAL_PAGES - used_pages()) * PAGE;
        }
        if (ni->distance.p)
            ((uint32_t *)ni->distance.p)[0] = 10;
        ni->num_nodes = 1;
        return 0;
    }
    case XEN_SYSCTL_get_cpu_policy: {
        struct xen_sysctl_cpu_policy *cp = &op->u.cpu_policy;
        if (cp->index > XEN_SYSCTL_cpu_policy_hvm_default)
            return -EINVAL;
        return cpu_policy(&cp->nr_leaves, cp->leaves.p, &cp->nr_msrs, cp->msrs.p);
    }
    case XEN_SYSCTL_get_cpu_featureset: {
        struct xen_sysctl_cpu_featureset *fs = &op->u.cpu_featureset;
        if (fs->index > XEN_SYSCTL_cpu_featureset_hvm_max)
            return -EINVAL;
        if (fs->features.p)
            memset(fs->features.p, 0, fs->nr_features * sizeof(uint32_t));  /* no optional features */
        return 0;
    }
    case XEN_SYSCTL_cputopoinfo: {
        struct xen_sysctl_cputopoinfo *ct = &op->u.cputopoinfo;
        if (ct->cputopo.p == NULL) {
            ct->num_cpus = NCPUS;
            return 0;
        }
        xen_sysctl_cputopo_t *t = ct->cputopo.p;
        uint32_t n = ct->num_cpus < NCPUS ? ct->num_cpus : NCPUS;
        for (uint32_t i = 0; i < n; i++) {
            t[i].core = i / 2;
            t[i].socket = 0;
            t[i].node = 0;
        }
        ct->num_cpus = n;
        return 0;
    }
    }
    return unknown("sysctl", op->cmd);
}

/* ---- domctl ---- */

static long sched_domctl(struct fake_dom *d, struct xen_domctl_scheduler_op *s)
{
    if (s->sched_id != scheduler())
        return -EINVAL;  /* Xen: the domain's scheduler is not the one named */
    int credit = s->sched_id == XEN_SCHEDULER_CREDIT;
    switch (s->cmd) {
    case XEN_DOMCTL_SCHEDOP_getinfo:
        if (credit) {
            s->u.credit.weight = d->weight;
            s->u.credit.cap = d->cap;
        } else {
            s->u.credit2.weight = d->weight;
            s->u.credit2.cap = d->cap;
        }
        return 0;
    case XEN_DOMCTL_SCHEDOP_putinfo: {
        uint16_t weight = credit ? s->u.credit.weight : s->u.credit2.weight;
        uint16_t cap = credit ? s->u.credit.cap : s->u.credit2.cap;
        if (cap > 100 * (d->max_vcpus ? d->max_vcpus : 1))
            return -EINVAL;
        if (weight)
            d->weight = weight;
        d->cap = cap;
        return 0;
    }
    }
    return unknown("domctl scheduler_op", s->cmd);
}

static long create_domain(struct xen_domctl *op)
{
    struct xen_domctl_createdomain *c = &op->u.createdomain;
    uint32_t domid = op->domain;
    if (domid == 0 || domid >= DOMID_FIRST_RESERVED) {
        while (find_dom(hv->next_domid) || hv->next_domid == 0)
            hv->next_domid++;
        domid = hv->next_domid++;
    } else if (find_dom(domid)) {
        return -EEXIST;
    }
    if (hv->ndoms >= MAX_DOMS)
        return -ENOSPC;
    if (c->flags & XEN_DOMCTL_CDF_hvm)
        note("note: createdomain of an HVM domain (only PV is modelled)");
    struct fake_dom *d = &hv->doms[hv->ndoms++];
    memset(d, 0, sizeof(*d));
    d->domid = domid;
    memcpy(d->handle, c->handle, 16);
    d->flags = XEN_DOMINF_paused | XEN_DOMINF_blocked | ((c->flags & XEN_DOMCTL_CDF_hvm) ? XEN_DOMINF_hvm_guest : 0);
    d->max_vcpus = c->max_vcpus;
    d->vcpus = c->max_vcpus;
    d->weight = 256;
    /* keep the table in domid order, as getdomaininfolist walks it */
    for (int i = hv->ndoms - 1; i > 0 && hv->doms[i - 1].domid > hv->doms[i].domid; i--) {
        struct fake_dom t = hv->doms[i];
        hv->doms[i] = hv->doms[i - 1];
        hv->doms[i - 1] = t;
    }
    op->domain = domid;
    return 0;
}

static long do_domctl(struct xen_domctl *op)
{
    if (op->interface_version != XEN_DOMCTL_INTERFACE_VERSION)
        return -EACCES;
    int refused = injected("domctl", op->cmd);
    if (refused)
        return -refused;
    if (op->cmd == XEN_DOMCTL_createdomain)
        return create_domain(op);
    if (op->cmd == XEN_DOMCTL_getdomaininfo) {
        /* 4.17: the first domain with an id >= the one asked for */
        for (int i = 0; i < hv->ndoms; i++)
            if (hv->doms[i].domid >= op->domain) {
                fill_info(&op->u.getdomaininfo, &hv->doms[i]);
                op->domain = hv->doms[i].domid;
                return 0;
            }
        return -ESRCH;
    }
    struct fake_dom *d = find_dom(op->domain);
    if (d == NULL)
        return -ESRCH;
    switch (op->cmd) {
    case XEN_DOMCTL_destroydomain:
        if (op->domain == 0)
            return -EINVAL;
        drop_guest_memory(d->domid);
        memmove(d, d + 1, (size_t)(&hv->doms[--hv->ndoms] - d) * sizeof(*d));
        kick_xenstored();
        return 0;
    case XEN_DOMCTL_pausedomain:
        if (op->domain == 0)
            return -EINVAL;
        d->flags |= XEN_DOMINF_paused;
        return 0;
    case XEN_DOMCTL_unpausedomain:
        d->flags = (d->flags & ~(XEN_DOMINF_paused | XEN_DOMINF_blocked)) | XEN_DOMINF_running;
        guest_runs(d);
        return 0;
    case XEN_DOMCTL_resumedomain:
        d->flags = (d->flags & ~(XEN_DOMINF_shutdown | (XEN_DOMINF_shutdownmask << XEN_DOMINF_shutdownshift)));
        return 0;
    case XEN_DOMCTL_max_mem:
        d->max_kib = op->u.max_mem.max_memkb;
        return 0;
    case XEN_DOMCTL_max_vcpus:
        d->max_vcpus = op->u.max_vcpus.max;
        if (d->vcpus > d->max_vcpus || d->vcpus == 0)
            d->vcpus = d->max_vcpus;
        return 0;
    case XEN_DOMCTL_setdomainhandle:
        memcpy(d->handle, op->u.setdomainhandle.handle, 16);
        return 0;
    case XEN_DOMCTL_scheduler_op:
        return sched_domctl(d, &op->u.scheduler_op);
    case XEN_DOMCTL_getvcpuinfo: {
        struct xen_domctl_getvcpuinfo *v = &op->u.getvcpuinfo;
        if (v->vcpu >= d->max_vcpus)
            return -EINVAL;
        v->online = v->vcpu < d->vcpus;
        v->running = runs(d) && v->online;
        v->blocked = !v->running;
        v->cpu_time = v->online ? d->cpu_ns / (d->vcpus ? d->vcpus : 1) : 0;
        v->cpu = v->vcpu % NCPUS;
        return 0;
    }
    case XEN_DOMCTL_setvcpuaffinity:
    case XEN_DOMCTL_getvcpuaffinity: {
        struct xen_domctl_vcpuaffinity *a = &op->u.vcpuaffinity;
        if (a->vcpu >= d->max_vcpus)
            return -EINVAL;
        if (a->flags & XEN_VCPUAFFINITY_HARD)
            fill_bitmap(&a->cpumap_hard, NCPUS);
        if (a->flags & XEN_VCPUAFFINITY_SOFT)
            fill_bitmap(&a->cpumap_soft, NCPUS);
        return 0;
    }
    case XEN_DOMCTL_hypercall_init:
    case XEN_DOMCTL_setnodeaffinity:
    case XEN_DOMCTL_settimeoffset:
    case XEN_DOMCTL_settscinfo:
    case XEN_DOMCTL_set_address_size:
    case XEN_DOMCTL_set_virq_handler:
    case XEN_DOMCTL_iomem_permission:
    case XEN_DOMCTL_ioport_permission:
    case XEN_DOMCTL_irq_permission:
    case XEN_DOMCTL_set_paging_mempool_size:
    case XEN_DOMCTL_set_cpu_policy:
        return 0;
    case XEN_DOMCTL_setvcpucontext:
        return set_context(d, &op->u.vcpucontext);
    case XEN_DOMCTL_getvcpucontext:
        return get_context(d, &op->u.vcpucontext);
    case XEN_DOMCTL_getpageframeinfo3:
        return page_types(d, &op->u.getpageframeinfo3);
    case XEN_DOMCTL_shadow_op:
        return shadow_op(&op->u.shadow_op);
    case XEN_DOMCTL_get_ext_vcpucontext:  /* nothing beyond the basic context: the save skips the record */
        op->u.ext_vcpucontext.size = 0;
        return op->u.ext_vcpucontext.vcpu < d->max_vcpus ? 0 : -EINVAL;
    case XEN_DOMCTL_getvcpuextstate:      /* no xsave state */
        op->u.vcpuextstate.xfeature_mask = 0;
        op->u.vcpuextstate.size = 0;
        return 0;
    case XEN_DOMCTL_get_vcpu_msrs:        /* no MSRs */
        op->u.vcpu_msrs.msr_count = 0;
        return 0;
    case XEN_DOMCTL_set_ext_vcpucontext:
    case XEN_DOMCTL_setvcpuextstate:
    case XEN_DOMCTL_set_vcpu_msrs:
        return 0;
    case XEN_DOMCTL_get_cpu_policy:
        return cpu_policy(&op->u.cpu_policy.nr_leaves, op->u.cpu_policy.leaves.p, &op->u.cpu_policy.nr_msrs,
                          op->u.cpu_policy.msrs.p);
    case XEN_DOMCTL_getnodeaffinity:
        fill_bitmap(&op->u.nodeaffinity.nodemap, 1);
        return 0;
    case XEN_DOMCTL_get_address_size:
        op->u.address_size.size = 64;
        return 0;
    case XEN_DOMCTL_gettscinfo:
        memset(&op->u.tsc_info, 0, sizeof(op->u.tsc_info));
        return 0;
    case XEN_DOMCTL_get_paging_mempool_size:
        op->u.paging_mempool.size = 0;
        return 0;
    }
    return unknown("domctl", op->cmd);
}

/* ---- memory_op, sched_op, event_channel_op ---- */

static long do_memory_op(unsigned long cmd, void *arg)
{
    switch (cmd) {
    case XENMEM_maximum_ram_page:
        return TOTAL_PAGES - 1;
    case XENMEM_current_reservation:
    case XENMEM_maximum_reservation: {
        struct fake_dom *d = find_dom(*(domid_t *)arg);
        if (d == NULL)
            return -ESRCH;
        return cmd == XENMEM_current_reservation ? (long)d->tot_pages : (long)(d->max_kib / 4);
    }
    case XENMEM_increase_reservation:
    case XENMEM_populate_physmap:
    case XENMEM_decrease_reservation: {
        struct xen_memory_reservation *r = arg;
        struct fake_dom *d = find_dom(r->domid);
        if (d == NULL)
            return -ESRCH;
        uint64_t pages = r->nr_extents << r->extent_order;
        if (cmd == XENMEM_decrease_reservation) {
            d->tot_pages -= pages < d->tot_pages ? pages : d->tot_pages;
            return r->nr_extents;
        }
        if (used_pages() + pages > TOTAL_PAGES || (d->max_kib && (d->tot_pages + pages) * 4 > d->max_kib))
            return 0;  /* Xen: the number of extents done; the caller reports ENOMEM */
        d->tot_pages += pages;
        return r->nr_extents;
    }
    case XENMEM_maximum_gpfn: {  /* a PV domain: shared_info's arch.max_pfn, less one (0 before it is set) */
        struct fake_dom *d = find_dom(*(domid_t *)arg);
        struct arch_shared_info arch;
        if (d == NULL)
            return -ESRCH;
        if (mem_io(d->domid, SHINFO_FRAME, offsetof(struct shared_info, arch), &arch, sizeof(arch), 0) < 0)
            return -EIO;
        return (long)(arch.max_pfn ? arch.max_pfn : 1) - 1;
    }
    case XENMEM_machphys_mfn_list: {  /* the M2P's 2 MiB chunks (see fill_m2p) */
        struct xen_machphys_mfn_list *l = arg;
        unsigned chunks = (unsigned)((TOTAL_PAGES * 8 + (1U << 21) - 1) >> 21), i;
        if (fill_m2p() < 0)
            return -EIO;
        for (i = 0; i < chunks && i < l->max_extents; i++)
            l->extent_start.p[i] = M2P_FRAME + i * ((1U << 21) / PAGE);
        l->nr_extents = i;
        return 0;
    }
    case XENMEM_set_memory_map:
    case XENMEM_set_pod_target:
    case XENMEM_claim_pages:
    case XENMEM_get_sharing_freed_pages:
    case XENMEM_get_sharing_shared_pages:
        return 0;
    case XENMEM_get_vnumainfo:  /* no domain has a vNUMA topology: Xen's answer then */
        return find_dom(((struct xen_vnuma_topology_info *)arg)->domid) ? -EOPNOTSUPP : -ESRCH;
    case XENMEM_get_pod_target: {
        xen_pod_target_t *t = arg;
        struct fake_dom *d = find_dom(t->domid);
        if (d == NULL)
            return -ESRCH;
        t->tot_pages = d->tot_pages;
        t->pod_cache_pages = t->pod_entries = 0;
        return 0;
    }
    }
    return unknown("memory_op", cmd);
}

static long do_sched_op(unsigned long cmd, void *arg)
{
    if (cmd != SCHEDOP_remote_shutdown)
        return unknown("sched_op", cmd);
    struct sched_remote_shutdown *s = arg;
    struct fake_dom *d = find_dom(s->domain_id);
    if (d == NULL)
        return -ESRCH;
    d->flags = (d->flags & ~(XEN_DOMINF_running | (XEN_DOMINF_shutdownmask << XEN_DOMINF_shutdownshift)))
               | XEN_DOMINF_shutdown | ((uint32_t)s->reason << XEN_DOMINF_shutdownshift);
    if (s->reason == SHUTDOWN_suspend)
        guest_suspends(d);
    kick_xenstored();
    return 0;
}

static long do_evtchn_op(unsigned long cmd, void *arg)
{
    switch (cmd) {
    case EVTCHNOP_alloc_unbound: {
        struct evtchn_alloc_unbound *a = arg;
        if (a->dom != DOMID_SELF && find_dom(a->dom) == NULL)
            return -ESRCH;
        a->port = next_port++;
        return 0;
    }
    case EVTCHNOP_reset:
    case EVTCHNOP_close:
        return 0;
    }
    return unknown("event_channel_op", cmd);
}

static long do_grant_table_op(unsigned long cmd, void *arg, unsigned long count);

static long dispatch(uint64_t op, const uint64_t *arg)
{
    long rc;
    void *a0 = (void *)(uintptr_t)arg[0], *a1 = (void *)(uintptr_t)arg[1];
    switch (op) {
    case __HYPERVISOR_xen_version:
        rc = do_xen_version(arg[0], a1);
        break;
    case __HYPERVISOR_sysctl:
        rc = do_sysctl(a0);
        break;
    case __HYPERVISOR_domctl:
        rc = do_domctl(a0);
        break;
    case __HYPERVISOR_memory_op:
        rc = do_memory_op(arg[0], a1);
        break;
    case __HYPERVISOR_sched_op:
        rc = do_sched_op(arg[0], a1);
        break;
    case __HYPERVISOR_event_channel_op:
        rc = do_evtchn_op(arg[0], a1);
        break;
    case __HYPERVISOR_grant_table_op:
        rc = do_grant_table_op(arg[0], a1, arg[2]);
        break;
    case __HYPERVISOR_xsm_op:
        rc = -ENOSYS;  /* as a Xen built without XSM/FLASK answers */
        break;
    case __HYPERVISOR_mmuext_op:    /* (ops, count, *done, domid): pinning the guest's page tables */
    case __HYPERVISOR_mmu_update: { /* (reqs, count, *done, domid) */
        if (arg[3] != DOMID_SELF && find_dom((uint32_t)arg[3]) == NULL) {
            rc = -ESRCH;
            break;
        }
        if (arg[2])
            *(unsigned *)(uintptr_t)arg[2] = (unsigned)arg[1];
        rc = 0;
        break;
    }
    case __HYPERVISOR_multicall: {
        multicall_entry_t *calls = a0;
        for (uint64_t i = 0; i < arg[1]; i++) {
            uint64_t args[5];
            for (int j = 0; j < 5; j++)
                args[j] = calls[i].args[j];
            calls[i].result = dispatch(calls[i].op, args);
        }
        rc = 0;
        break;
    }
    default:
        rc = unknown("hypercall", op);
    }
    if (tracing()) {
        unsigned cmd = op == __HYPERVISOR_sysctl || op == __HYPERVISOR_domctl ? *(uint32_t *)a0 : (unsigned)arg[0];
        note("trace pid=%d op=%llu cmd=%u rc=%ld", getpid(), (unsigned long long)op, cmd, rc);
    }
    return rc;
}

static long do_grant_table_op(unsigned long cmd, void *arg, unsigned long count)
{
    if (cmd != GNTTABOP_setup_table)
        return unknown("grant_table_op", cmd);
    struct gnttab_setup_table *t = arg;
    for (unsigned long i = 0; i < count; i++, t++) {
        struct fake_dom *d = find_dom(t->dom);
        if (d == NULL) {
            t->status = GNTST_bad_domain;
            continue;
        }
        for (uint32_t f = 0; f < t->nr_frames; f++)
            t->frame_list.p[f] = 0xf0000 + f;  /* a guest frame no builder allocation uses */
        t->status = GNTST_okay;
    }
    return 0;
}

static long hypercall(privcmd_hypercall_t *h)
{
    int lock = lock_table();
    uint64_t args[5];
    for (int i = 0; i < 5; i++)
        args[i] = h->arg[i];
    long rc = dispatch(h->op, args);
    unlock_table(lock);
    return rc;
}

/* ---- the device: which fds are ours ---- */

#define MAX_FAKE_FDS 64
static struct { dev_t dev; ino_t ino; } fake_files[MAX_FAKE_FDS];
static int nfake_files;
static pthread_mutex_t files_lock = PTHREAD_MUTEX_INITIALIZER;

static int is_privcmd_path(const char *path)
{
    return path && (strcmp(path, "/dev/xen/privcmd") == 0 || strcmp(path, "/proc/xen/privcmd") == 0);
}

static int open_privcmd(int flags)
{
    int fd = memfd_create("fake-privcmd", (flags & O_CLOEXEC) ? MFD_CLOEXEC : 0);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0)
        return -1;
    pthread_mutex_lock(&files_lock);
    if (nfake_files < MAX_FAKE_FDS) {
        fake_files[nfake_files].dev = st.st_dev;
        fake_files[nfake_files++].ino = st.st_ino;
    } else {
        /* reuse the oldest slot: old descriptions are closed by now in practice */
        memmove(fake_files, fake_files + 1, sizeof(fake_files[0]) * (MAX_FAKE_FDS - 1));
        fake_files[MAX_FAKE_FDS - 1].dev = st.st_dev;
        fake_files[MAX_FAKE_FDS - 1].ino = st.st_ino;
    }
    pthread_mutex_unlock(&files_lock);
    return fd;
}

static int is_privcmd_fd(int fd)
{
    struct stat st;
    if (fd < 0 || nfake_files == 0 || fstat(fd, &st) < 0)
        return 0;
    int found = 0;
    pthread_mutex_lock(&files_lock);
    for (int i = 0; i < nfake_files && !found; i++)
        found = fake_files[i].dev == st.st_dev && fake_files[i].ino == st.st_ino;
    pthread_mutex_unlock(&files_lock);
    return found;
}

/* libxl's run and lib directories (/var/run/xen, /var/lib/xen), moved under $FAKE_XEN_ROOT
 * when that is set, so lock files and domain userdata stay in the test's temp dir. */
static const char *redirect(const char *path, char *buf, size_t size)
{
    static const char *const dirs[] = {"/var/run/xen", "/run/xen", "/var/lib/xen"};
    const char *root = getenv("FAKE_XEN_ROOT");
    if (path == NULL || root == NULL || *root == 0)
        return path;
    for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++) {
        size_t n = strlen(dirs[i]);
        if (strncmp(path, dirs[i], n) == 0 && (path[n] == '/' || path[n] == 0)) {
            snprintf(buf, size, "%s%s", root, path);
            return buf;
        }
    }
    return path;
}

#define REDIRECT(path) char redirect_buf_[4096]; path = redirect(path, redirect_buf_, sizeof(redirect_buf_))

static int mode_arg(int flags, va_list ap)
{
    return (flags & (O_CREAT | O_TMPFILE)) ? va_arg(ap, int) : 0;
}

/* open and openat alike: privcmd faked, libxl's directories redirected, the rest real. */
static int open_at(int dirfd, const char *path, int flags, mode_t mode)
{
    if (is_privcmd_path(path))
        return open_privcmd(flags);
    REDIRECT(path);
    return real_openat(dirfd, path, flags, mode);
}

int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_at(AT_FDCWD, path, flags, mode);
}

int open64(const char *path, int flags, ...) __attribute__((alias("open")));

int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = mode_arg(flags, ap);
    va_end(ap);
    return open_at(dirfd, path, flags, mode);
}

int openat64(int dirfd, const char *path, int flags, ...) __attribute__((alias("openat")));

int __open_2(const char *path, int flags)
{
    return open(path, flags);
}

int __open64_2(const char *path, int flags) __attribute__((alias("__open_2")));

static void privcmd_stat(struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_mode = S_IFCHR | 0600;
    st->st_rdev = makedev(10, 60);
    st->st_nlink = 1;
    st->st_blksize = PAGE;
}

int stat(const char *restrict path, struct stat *restrict st)
{
    if (is_privcmd_path(path)) {
        privcmd_stat(st);
        return 0;
    }
    REDIRECT(path);
    return fstatat(AT_FDCWD, path, st, 0);
}

int stat64(const char *restrict path, struct stat64 *restrict st) __attribute__((alias("stat")));

int access(const char *path, int mode)
{
    if (is_privcmd_path(path))
        return 0;
    REDIRECT(path);
    return faccessat(AT_FDCWD, path, mode, 0);
}

int lstat(const char *restrict path, struct stat *restrict st)
{
    REDIRECT(path);
    return fstatat(AT_FDCWD, path, st, AT_SYMLINK_NOFOLLOW);
}

int lstat64(const char *restrict path, struct stat64 *restrict st) __attribute__((alias("lstat")));

int unlink(const char *path)
{
    REDIRECT(path);
    return unlinkat(AT_FDCWD, path, 0);
}

int mkdir(const char *path, mode_t mode)
{
    REDIRECT(path);
    return mkdirat(AT_FDCWD, path, mode);
}

int rename(const char *from, const char *to)
{
    char buf[4096];
    to = redirect(to, buf, sizeof(buf));
    REDIRECT(from);
    return renameat(AT_FDCWD, from, AT_FDCWD, to);
}

FILE *fopen(const char *restrict path, const char *restrict mode)
{
    static FILE *(*real_fopen)(const char *, const char *);
    if (real_fopen == NULL)
        real_fopen = (FILE * (*)(const char *, const char *)) dlsym(RTLD_NEXT, "fopen");
    REDIRECT(path);
    return real_fopen(path, mode);
}

FILE *fopen64(const char *restrict path, const char *restrict mode) __attribute__((alias("fopen")));

int ioctl(int fd, unsigned long request, ...)
{
    va_list ap;
    va_start(ap, request);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!is_privcmd_fd(fd))
        return (int)syscall(SYS_ioctl, fd, request, arg);
    if (request == IOCTL_PRIVCMD_HYPERCALL) {
        long rc = hypercall(arg);
        if (rc < 0) {
            errno = (int)-rc;
            return -1;
        }
        return (int)rc;
    }
    if (request == IOCTL_PRIVCMD_MMAPBATCH_V2) {
        privcmd_mmapbatch_v2_t *m = arg;
        int mem = guest_memory(m->dom);
        for (unsigned i = 0; i < m->num; i++) {
            void *page = (void *)(uintptr_t)(m->addr + (uint64_t)i * PAGE);
            void *p = mem < 0 ? MAP_FAILED
                : (void *)syscall(SYS_mmap, page, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, mem,
                                  (off_t)(m->arr[i] & ((1ULL << 24) - 1)) * PAGE);
            m->err[i] = p == MAP_FAILED ? -EFAULT : 0;
        }
        return 0;
    }
    /* the libraries' probes, each with a fallback: ENOTTY as from an older kernel */
    if (request != IOCTL_PRIVCMD_UNIMPLEMENTED && request != IOCTL_PRIVCMD_DM_OP && request != IOCTL_PRIVCMD_MMAP_RESOURCE)
        note("ENOTTY ioctl request=%#lx", request);
    errno = ENOTTY;
    return -1;
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
    if (fd >= 0 && is_privcmd_fd(fd))  /* a window for foreign pages: MMAPBATCH fills it */
        return (void *)syscall(SYS_mmap, addr, len, prot, (flags & ~MAP_SHARED) | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off) __attribute__((alias("mmap")));
