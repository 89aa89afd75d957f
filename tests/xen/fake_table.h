/* The fake hypervisor's domain table, shared by fake_xen.c (the libxenctrl-level fake and the
 * xenstored shim) and fake_privcmd.c (the fake below /dev/xen/privcmd): one layout, in a file
 * named by FAKE_XEN_STATE that every process of a test maps, so each fake sees the domains the
 * other builds.  An includer defines `static struct fake_hv *hv` before including this. */
#ifndef FAKE_TABLE_H
#define FAKE_TABLE_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DOMS 64
#define PAGE 4096
#define MAGIC 0x46616b58u
#define TOTAL_PAGES (4ULL << 18)   /* a 4 GiB host */
#define NCPUS 4

struct fake_dom {
    uint32_t domid;
    uint32_t flags;          /* XEN_DOMINF_* with the shutdown reason in bits 16..23 */
    uint8_t handle[16];
    uint64_t max_kib;        /* setmaxmem ceiling */
    uint64_t tot_pages;      /* allocated now */
    uint32_t vcpus, max_vcpus;
    uint16_t weight, cap;
    uint64_t cpu_ns;         /* cumulative, all vCPUs */
};

/* The hypervisor: in a file shared by every process that names it in FAKE_XEN_STATE, else
 * private to this process. */
struct fake_hv {
    uint32_t magic;
    int32_t ndoms;
    uint32_t next_domid;
    int32_t xsd_pid, xsd_wfd;  /* xenstored's event-channel pipe: a byte there is VIRQ_DOM_EXC */
    uint64_t now_ns;           /* the hypervisor's clock, advanced by fake_xen_advance() */
    uint64_t idle_ns[NCPUS];
    struct fake_dom doms[MAX_DOMS];
};

static struct fake_hv *hv;

static void add_dom(uint32_t domid)
{
    if (hv->ndoms >= MAX_DOMS)
        return;
    struct fake_dom *d = &hv->doms[hv->ndoms++];
    memset(d, 0, sizeof(*d));
    d->domid = domid;
    d->flags = XEN_DOMINF_running;
    d->max_kib = domid ? 262144 : 1048576;
    d->tot_pages = d->max_kib / 4;
    d->vcpus = d->max_vcpus = domid ? 2 : 1;
    d->weight = 256;
    d->cpu_ns = 1000000000ULL * (domid + 1);
    if (domid)
        d->handle[15] = domid;
    if (domid >= hv->next_domid)
        hv->next_domid = domid + 1;
}

/* dom0, then the comma-separated domids of FAKE_XEN_DOMIDS, with idle CPUs, in an empty table. */
static void fill_table(void)
{
    const char *list = getenv("FAKE_XEN_DOMIDS");
    hv->magic = MAGIC;
    for (int i = 0; i < NCPUS; i++)
        hv->idle_ns[i] = 1000000000ULL * (i + 1);
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

#endif
