/*
 * fake_xenlight.c — the libxenlight operations that need a hypervisor, for tests.
 *
 * Built into the same shared object as fake_xen.c.  Each fakexl_<op> stands in for libxl_<op>
 * with the same prototype: the test binds libxl_<op> to fakexl_<op> and keeps the real
 * libxenlight for everything that works without a hypervisor (context, JSON parsing).  The
 * configs arrive parsed by the real libxl_domain_config_from_json, so their layout is the
 * real one.  Like libxl, a build: allocates the domain (fake_xen_create), writes its xenstore
 * directories with a guest-writable control/ area, introduces it to xenstored, and leaves it
 * paused.  Suspend writes an image (header + the domain's state) to the fd and shuts the
 * domain down with reason suspend; restore reads it back.  Device add/remove write and remove
 * the front/back-end xenstore entries.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <libxl.h>
#include <xenctrl.h>
#include <xenstore.h>

int fake_xen_create(const uint8_t *handle, int hvm, uint64_t max_kib, uint64_t target_kib,
                    uint32_t max_vcpus, uint32_t vcpus, uint64_t cpu_ns, uint32_t *domid);

#define IMAGE_MAGIC "FAKEXEN-IMAGE-1\n"

struct image {
    char magic[16];
    uint8_t handle[16];
    uint64_t tot_pages, max_pages, cpu_ns;
    uint32_t vcpus;
};

static void uuid_str(const uint8_t *u, char *out)
{
    sprintf(out, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
            u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

static bool put(struct xs_handle *xs, xs_transaction_t t, const char *path, const char *value)
{
    return xs_write(xs, t, path, value, strlen(value));
}

static bool putf(struct xs_handle *xs, xs_transaction_t t, const char *value, const char *fmt, ...)
{
    char path[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(path, sizeof(path), fmt, ap);
    va_end(ap);
    return put(xs, t, path, value);
}

/* Linux's numbering of xvdX/hdX/sdX disks, as blkfront expects it. */
static int disk_devid(const char *vdev)
{
    if (strncmp(vdev, "xvd", 3) == 0 && vdev[3] >= 'a' && vdev[3] <= 'z')
        return (202 << 8) | ((vdev[3] - 'a') << 4);
    if (strncmp(vdev, "hd", 2) == 0 && vdev[2] >= 'a' && vdev[2] <= 'd')
        return ((vdev[2] < 'c' ? 3 : 22) << 8) | (((vdev[2] - 'a') & 1) << 6);
    if (strncmp(vdev, "sd", 2) == 0 && vdev[2] >= 'a' && vdev[2] <= 'p')
        return (8 << 8) | ((vdev[2] - 'a') << 4);
    return -1;
}

static bool write_disk(struct xs_handle *xs, xs_transaction_t t, uint32_t domid, const libxl_device_disk *disk)
{
    char value[64];
    int devid = disk_devid(disk->vdev);
    if (devid < 0)
        return false;
    snprintf(value, sizeof(value), "/local/domain/0/backend/vbd/%u/%d", domid, devid);
    return putf(xs, t, value, "/local/domain/%u/device/vbd/%d/backend", domid, devid)
        && putf(xs, t, "1", "/local/domain/%u/device/vbd/%d/state", domid, devid)
        && putf(xs, t, disk->pdev_path ? disk->pdev_path : "", "/local/domain/0/backend/vbd/%u/%d/params", domid, devid)
        && putf(xs, t, disk->vdev, "/local/domain/0/backend/vbd/%u/%d/dev", domid, devid)
        && putf(xs, t, disk->readwrite ? "w" : "r", "/local/domain/0/backend/vbd/%u/%d/mode", domid, devid)
        && putf(xs, t, disk->is_cdrom ? "cdrom" : "disk", "/local/domain/0/backend/vbd/%u/%d/device-type", domid, devid)
        && putf(xs, t, "4", "/local/domain/0/backend/vbd/%u/%d/state", domid, devid);
}

static bool write_nic(struct xs_handle *xs, xs_transaction_t t, uint32_t domid, const libxl_device_nic *nic)
{
    char mac[32], backend[64];
    snprintf(mac, sizeof(mac), LIBXL_MAC_FMT, LIBXL_MAC_BYTES(nic->mac));
    snprintf(backend, sizeof(backend), "/local/domain/0/backend/vif/%u/%d", domid, nic->devid);
    return putf(xs, t, backend, "/local/domain/%u/device/vif/%d/backend", domid, nic->devid)
        && putf(xs, t, mac, "/local/domain/%u/device/vif/%d/mac", domid, nic->devid)
        && putf(xs, t, "1", "/local/domain/%u/device/vif/%d/state", domid, nic->devid)
        && putf(xs, t, mac, "%s/mac", backend)
        && putf(xs, t, nic->bridge ? nic->bridge : "", "%s/bridge", backend)
        && putf(xs, t, "4", "%s/state", backend);
}

static int count_bits(const libxl_bitmap *map)
{
    int n = 0;
    for (uint32_t i = 0; i < map->size; i++)
        n += __builtin_popcount(map->map[i]);
    return n;
}

/* libxl's xenstore layout of a new domain, then the introduction to xenstored. */
static int populate(uint32_t domid, const libxl_domain_config *cfg, int vcpus)
{
    char uuid[40], value[192], path[128];
    struct xs_permissions ro[2] = {{0, XS_PERM_NONE}, {domid, XS_PERM_READ}};
    struct xs_permissions rw[1] = {{domid, XS_PERM_NONE}};
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    uuid_str(cfg->c_info.uuid.uuid, uuid);
    bool ok = false;
    for (int attempt = 0; attempt < 10 && !ok; attempt++) {
        xs_transaction_t t = xs_transaction_start(xs);
        snprintf(path, sizeof(path), "/local/domain/%u", domid);
        ok = xs_mkdir(xs, t, path) && xs_set_permissions(xs, t, path, ro, 2);
        snprintf(value, sizeof(value), "%u", domid);
        ok = ok && putf(xs, t, cfg->c_info.name ? cfg->c_info.name : "", "%s/name", path)
             && putf(xs, t, value, "%s/domid", path);
        snprintf(value, sizeof(value), "/vm/%s", uuid);
        ok = ok && putf(xs, t, value, "%s/vm", path)
             && putf(xs, t, cfg->c_info.name ? cfg->c_info.name : "", "/vm/%s/name", uuid)
             && putf(xs, t, uuid, "/vm/%s/uuid", uuid);
        snprintf(value, sizeof(value), "%s/control", path);
        ok = ok && xs_mkdir(xs, t, value) && xs_set_permissions(xs, t, value, rw, 1)
             && putf(xs, t, "", "%s/control/shutdown", path)
             && xs_set_permissions(xs, t, strcat(value, "/shutdown"), rw, 1);
        snprintf(value, sizeof(value), "%lu", (unsigned long)cfg->b_info.max_memkb);
        ok = ok && putf(xs, t, value, "%s/memory/static-max", path);
        snprintf(value, sizeof(value), "%lu", (unsigned long)cfg->b_info.target_memkb);
        ok = ok && putf(xs, t, value, "%s/memory/target", path);
        for (int i = 0; ok && i < cfg->b_info.max_vcpus; i++) {
            char cpu[32];
            snprintf(cpu, sizeof(cpu), "%d", i);
            ok = putf(xs, t, i < vcpus ? "online" : "offline", "%s/cpu/%s/availability", path, cpu);
        }
        for (int i = 0; ok && i < cfg->num_disks; i++)
            ok = write_disk(xs, t, domid, &cfg->disks[i]);
        for (int i = 0; ok && i < cfg->num_nics; i++)
            ok = write_nic(xs, t, domid, &cfg->nics[i]);
        if (!xs_transaction_end(xs, t, !ok))
            ok = false;
        if (!ok && errno != EAGAIN)
            break;
    }
    ok = ok && xs_introduce_domain(xs, domid, 0xfeed0000 + domid, 1);
    xs_close(xs);
    return ok ? 0 : ERROR_FAIL;
}

/* As libxl applies b_info.sched_params: through the calls of the scheduler that runs. */
static int set_sched_params(uint32_t domid, const libxl_domain_sched_params *params)
{
    int sched;
    if (xc_sched_id(NULL, &sched) < 0)
        return ERROR_FAIL;
    uint16_t weight = params->weight == LIBXL_DOMAIN_SCHED_PARAM_WEIGHT_DEFAULT ? 256 : params->weight;
    uint16_t cap = params->cap == LIBXL_DOMAIN_SCHED_PARAM_CAP_DEFAULT ? 0 : params->cap;
    if (sched == XEN_SCHEDULER_CREDIT2) {
        struct xen_domctl_sched_credit2 c2 = {.weight = weight, .cap = cap};
        return xc_sched_credit2_domain_set(NULL, domid, &c2) < 0 ? ERROR_FAIL : 0;
    }
    struct xen_domctl_sched_credit c1 = {.weight = weight, .cap = cap};
    return xc_sched_credit_domain_set(NULL, domid, &c1) < 0 ? ERROR_FAIL : 0;
}

static int build(libxl_domain_config *cfg, uint32_t *domid, uint64_t pages, uint64_t cpu_ns, int vcpus)
{
    uint32_t id;
    if (cfg->b_info.max_vcpus < 1 || vcpus < 1 || vcpus > cfg->b_info.max_vcpus)
        return ERROR_INVAL;
    if (fake_xen_create(cfg->c_info.uuid.uuid, cfg->c_info.type == LIBXL_DOMAIN_TYPE_HVM, cfg->b_info.max_memkb,
                        pages ? pages * 4 : cfg->b_info.target_memkb, cfg->b_info.max_vcpus, vcpus, cpu_ns, &id) < 0)
        return errno == ENOMEM ? ERROR_NOMEM : ERROR_FAIL;
    int rc = populate(id, cfg, vcpus);
    if (rc == 0)
        rc = set_sched_params(id, &cfg->b_info.sched_params);
    if (rc) {
        xc_domain_destroy(NULL, id);
        return rc;
    }
    *domid = id;
    return 0;
}

int fakexl_domain_create_new(libxl_ctx *ctx, libxl_domain_config *d_config, uint32_t *domid,
                             const libxl_asyncop_how *ao_how, const libxl_asyncprogress_how *aop_console_how)
{
    if (ctx == NULL)
        return ERROR_INVAL;
    int vcpus = count_bits(&d_config->b_info.avail_vcpus);
    return build(d_config, domid, 0, 0, vcpus ? vcpus : d_config->b_info.max_vcpus);
}

int fakexl_domain_create_restore(libxl_ctx *ctx, libxl_domain_config *d_config, uint32_t *domid, int restore_fd,
                                 int send_back_fd, const libxl_domain_restore_params *params,
                                 const libxl_asyncop_how *ao_how, const libxl_asyncprogress_how *aop_console_how)
{
    struct image image;
    if (read(restore_fd, &image, sizeof(image)) != sizeof(image) || memcmp(image.magic, IMAGE_MAGIC, 16) != 0)
        return ERROR_BADFAIL;
    if (memcmp(image.handle, d_config->c_info.uuid.uuid, 16) != 0)
        return ERROR_INVAL;
    return build(d_config, domid, image.tot_pages, 0, image.vcpus); /* CPU time restarts, as in Xen */
}

static int from_errno(int rc)
{
    if (rc == 0)
        return 0;
    return errno == ESRCH ? ERROR_DOMAIN_NOTFOUND : ERROR_FAIL;
}

int fakexl_domain_unpause(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how)
{
    return from_errno(xc_domain_unpause(NULL, domid));
}

int fakexl_domain_pause(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how)
{
    return from_errno(xc_domain_pause(NULL, domid));
}

/* Remove the domain's xenstore directories, then the domain (xenstored then releases it). */
int fakexl_domain_destroy(libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how)
{
    xc_domaininfo_t info;
    char path[128], vm[128];
    if (domid == 0)
        return ERROR_INVAL;
    if (xc_domain_getinfolist(NULL, domid, 1, &info) != 1 || info.domain != domid)
        return ERROR_DOMAIN_NOTFOUND;
    struct xs_handle *xs = xs_open(0);
    if (xs != NULL) {
        char uuid[40];
        uuid_str(info.handle, uuid);
        snprintf(vm, sizeof(vm), "/vm/%s", uuid);
        xs_rm(xs, XBT_NULL, vm);
        snprintf(path, sizeof(path), "/local/domain/0/backend/vbd/%u", domid);
        xs_rm(xs, XBT_NULL, path);
        snprintf(path, sizeof(path), "/local/domain/0/backend/vif/%u", domid);
        xs_rm(xs, XBT_NULL, path);
        snprintf(path, sizeof(path), "/local/domain/%u", domid);
        xs_rm(xs, XBT_NULL, path);
        xs_close(xs);
    }
    return from_errno(xc_domain_destroy(NULL, domid));
}

/* Save the domain to *fd* and leave it shut down with reason suspend (the caller destroys it). */
int fakexl_domain_suspend(libxl_ctx *ctx, uint32_t domid, int fd, int flags, const libxl_asyncop_how *ao_how)
{
    xc_domaininfo_t info;
    struct image image;
    if (xc_domain_getinfolist(NULL, domid, 1, &info) != 1 || info.domain != domid)
        return ERROR_DOMAIN_NOTFOUND;
    if (!(info.flags & XEN_DOMINF_running) || (info.flags & (XEN_DOMINF_paused | XEN_DOMINF_shutdown)))
        return ERROR_FAIL;
    memset(&image, 0, sizeof(image));
    memcpy(image.magic, IMAGE_MAGIC, 16);
    memcpy(image.handle, info.handle, 16);
    image.tot_pages = info.tot_pages;
    image.max_pages = info.max_pages;
    image.cpu_ns = info.cpu_time;
    image.vcpus = info.nr_online_vcpus;
    if (write(fd, &image, sizeof(image)) != sizeof(image))
        return ERROR_FAIL;
    return from_errno(xc_domain_shutdown(NULL, domid, SHUTDOWN_suspend));
}

int fakexl_device_disk_add(libxl_ctx *ctx, uint32_t domid, libxl_device_disk *disk, const libxl_asyncop_how *ao_how)
{
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    bool ok = write_disk(xs, XBT_NULL, domid, disk);
    xs_close(xs);
    return ok ? 0 : ERROR_FAIL;
}

int fakexl_device_nic_add(libxl_ctx *ctx, uint32_t domid, libxl_device_nic *nic, const libxl_asyncop_how *ao_how)
{
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    bool ok = write_nic(xs, XBT_NULL, domid, nic);
    xs_close(xs);
    return ok ? 0 : ERROR_FAIL;
}

static int remove_device(uint32_t domid, const char *kind, int devid)
{
    char path[128];
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    snprintf(path, sizeof(path), "/local/domain/%u/device/%s/%d", domid, kind, devid);
    bool ok = xs_rm(xs, XBT_NULL, path);
    snprintf(path, sizeof(path), "/local/domain/0/backend/%s/%u/%d", kind, domid, devid);
    ok = xs_rm(xs, XBT_NULL, path) && ok;
    xs_close(xs);
    return ok ? 0 : ERROR_FAIL;
}

int fakexl_device_disk_remove(libxl_ctx *ctx, uint32_t domid, libxl_device_disk *disk, const libxl_asyncop_how *ao_how)
{
    int devid = disk_devid(disk->vdev);
    return devid < 0 ? ERROR_INVAL : remove_device(domid, "vbd", devid);
}

int fakexl_device_nic_remove(libxl_ctx *ctx, uint32_t domid, libxl_device_nic *nic, const libxl_asyncop_how *ao_how)
{
    return remove_device(domid, "vif", nic->devid);
}

/* libxl_set_memory_target (libxl_mem.c) on the fake host: the target in KiB, absolute or
 * relative, refused above memory/static-max; with enforce the ceiling is target + videoram
 * + LIBXL_MAXMEM_CONSTANT (1024 KiB); memory/target and /vm/<uuid>/memory (MiB) written. */
int fakexl_set_memory_target(libxl_ctx *ctx, uint32_t domid, int64_t target_memkb, int relative, int enforce)
{
    char path[128], value[64];
    int rc = ERROR_FAIL;
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    unsigned int len;
    snprintf(path, sizeof(path), "/local/domain/%u/memory/target", domid);
    char *current = xs_read(xs, XBT_NULL, path, &len);
    snprintf(path, sizeof(path), "/local/domain/%u/memory/static-max", domid);
    char *max = xs_read(xs, XBT_NULL, path, &len);
    snprintf(path, sizeof(path), "/local/domain/%u/memory/videoram", domid);
    char *video = xs_read(xs, XBT_NULL, path, &len);
    int64_t target = target_memkb + (relative && current ? strtoll(current, NULL, 10) : 0);
    if (current == NULL || max == NULL || target < 0 || (domid != 0 && target > strtoll(max, NULL, 10))) {
        rc = ERROR_INVAL;
        goto out;
    }
    if (enforce && xc_domain_setmaxmem(NULL, domid, target + (video ? strtoll(video, NULL, 10) : 0) + 1024) < 0)
        goto out;
    snprintf(path, sizeof(path), "/local/domain/%u/memory/target", domid);
    snprintf(value, sizeof(value), "%lld", (long long)target);
    if (!put(xs, XBT_NULL, path, value))
        goto out;
    snprintf(path, sizeof(path), "/local/domain/%u/vm", domid);
    char *vm = xs_read(xs, XBT_NULL, path, &len);
    if (vm != NULL) {
        snprintf(path, sizeof(path), "%s/memory", vm);
        snprintf(value, sizeof(value), "%lld", (long long)(target / 1024));
        put(xs, XBT_NULL, path, value);
        free(vm);
    }
    rc = 0;
out:
    free(current);
    free(max);
    free(video);
    xs_close(xs);
    return rc;
}

/* libxl_wait_for_memory_target: until the domain's allocation reaches memory/target (the fake
 * guests, dom0 included, balloon at once), ERROR_FAIL after wait_secs without progress. */
int fakexl_wait_for_memory_target(libxl_ctx *ctx, uint32_t domid, int wait_secs)
{
    char path[128];
    unsigned int len;
    struct xs_handle *xs = xs_open(0);
    if (xs == NULL)
        return ERROR_FAIL;
    snprintf(path, sizeof(path), "/local/domain/%u/memory/target", domid);
    char *target = xs_read(xs, XBT_NULL, path, &len);
    xs_close(xs);
    if (target == NULL)
        return ERROR_FAIL;
    uint64_t want = strtoull(target, NULL, 10) / 4;
    free(target);
    for (int tick = 0; tick <= wait_secs * 100; tick++) {
        xc_domaininfo_t info;
        if (xc_domain_getinfolist(NULL, domid, 1, &info) != 1 || info.domain != domid)
            return ERROR_DOMAIN_NOTFOUND;
        if (info.tot_pages <= want)
            return 0;
        usleep(10000);
    }
    return ERROR_FAIL;
}

/* libxl_get_free_memory: the hypervisor's free memory in KiB. */
int fakexl_get_free_memory(libxl_ctx *ctx, uint64_t *memkb)
{
    xc_physinfo_t info;
    if (xc_physinfo(NULL, &info) < 0)
        return ERROR_FAIL;
    *memkb = info.free_pages * 4;
    return 0;
}
