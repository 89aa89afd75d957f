/*
 * abi_probe.c — prints the layout of every Xen struct the ctypes bindings declare, and the
 * constants they hard-code, as seen by gcc against the installed headers.
 * Lines: "S|type|sizeof|alignof", "F|type|field|offsetof|sizeof", "C|name|value".
 */
#include <stddef.h>
#include <stdio.h>
#include <xenctrl.h>
#include <xenstore.h>
#include <libxl.h>

#define S(T) printf("S|%s|%zu|%zu\n", #T, sizeof(T), _Alignof(T))
#define F(T, f) printf("F|%s|%s|%zu|%zu\n", #T, #f, offsetof(T, f), sizeof(((T *)0)->f))
#define C(name) printf("C|%s|%lld\n", #name, (long long)(name))
#define E(name) printf("E|%s|%d\n", #name, (int)(name))

int main(void)
{
    S(xc_domaininfo_t);
    F(xc_domaininfo_t, domain); F(xc_domaininfo_t, pad1); F(xc_domaininfo_t, flags);
    F(xc_domaininfo_t, tot_pages); F(xc_domaininfo_t, max_pages); F(xc_domaininfo_t, outstanding_pages);
    F(xc_domaininfo_t, shr_pages); F(xc_domaininfo_t, paged_pages); F(xc_domaininfo_t, shared_info_frame);
    F(xc_domaininfo_t, cpu_time); F(xc_domaininfo_t, nr_online_vcpus); F(xc_domaininfo_t, max_vcpu_id);
    F(xc_domaininfo_t, ssidref); F(xc_domaininfo_t, handle); F(xc_domaininfo_t, cpupool);
    F(xc_domaininfo_t, gpaddr_bits); F(xc_domaininfo_t, pad2); F(xc_domaininfo_t, arch_config);

    S(struct xen_arch_domainconfig);
    F(struct xen_arch_domainconfig, emulation_flags); F(struct xen_arch_domainconfig, misc_flags);

    S(xc_physinfo_t);
    F(xc_physinfo_t, threads_per_core); F(xc_physinfo_t, cores_per_socket); F(xc_physinfo_t, nr_cpus);
    F(xc_physinfo_t, max_cpu_id); F(xc_physinfo_t, nr_nodes); F(xc_physinfo_t, max_node_id);
    F(xc_physinfo_t, cpu_khz); F(xc_physinfo_t, capabilities); F(xc_physinfo_t, arch_capabilities);
    F(xc_physinfo_t, pad); F(xc_physinfo_t, total_pages); F(xc_physinfo_t, free_pages);
    F(xc_physinfo_t, scrub_pages); F(xc_physinfo_t, outstanding_pages); F(xc_physinfo_t, max_mfn);
    F(xc_physinfo_t, hw_cap);

    S(xc_vcpuinfo_t);
    F(xc_vcpuinfo_t, vcpu); F(xc_vcpuinfo_t, online); F(xc_vcpuinfo_t, blocked);
    F(xc_vcpuinfo_t, running); F(xc_vcpuinfo_t, cpu_time); F(xc_vcpuinfo_t, cpu);

    S(xc_cpuinfo_t);
    F(xc_cpuinfo_t, idletime);

    S(struct xen_domctl_sched_credit);
    F(struct xen_domctl_sched_credit, weight); F(struct xen_domctl_sched_credit, cap);
    S(struct xen_domctl_sched_credit2);
    F(struct xen_domctl_sched_credit2, weight); F(struct xen_domctl_sched_credit2, cap);

    S(xen_compile_info_t);
    F(xen_compile_info_t, compiler); F(xen_compile_info_t, compile_by);
    F(xen_compile_info_t, compile_domain); F(xen_compile_info_t, compile_date);

    S(struct xs_permissions);
    F(struct xs_permissions, id); F(struct xs_permissions, perms);

    S(xs_transaction_t);
    S(xen_extraversion_t);
    S(xen_capabilities_info_t);
    S(xen_changeset_info_t);

    C(XENVER_version); C(XENVER_extraversion); C(XENVER_compile_info); C(XENVER_capabilities);
    C(XENVER_changeset);
    C(XEN_DOMINF_dying); C(XEN_DOMINF_hvm_guest); C(XEN_DOMINF_shutdown); C(XEN_DOMINF_paused);
    C(XEN_DOMINF_blocked); C(XEN_DOMINF_running); C(XEN_DOMINF_debugged); C(XEN_DOMINF_xs_domain);
    C(XEN_DOMINF_hap); C(XEN_DOMINF_shutdownshift); C(XEN_DOMINF_shutdownmask);
    C(XBT_NULL); C(XS_WATCH_PATH); C(XS_WATCH_TOKEN);
    C(XS_PERM_NONE); C(XS_PERM_READ); C(XS_PERM_WRITE); C(XS_PERM_OWNER);

    /* libxenlight: opaque buffers of these sizes, and its error codes */
    S(libxl_domain_config);
    S(libxl_domain_restore_params);
    F(libxl_domain_restore_params, checkpointed_stream); F(libxl_domain_restore_params, stream_version);
    F(libxl_domain_restore_params, colo_proxy_script); F(libxl_domain_restore_params, userspace_colo_proxy);
    S(libxl_device_disk);
    S(libxl_device_nic);
    C(LIBXL_SUSPEND_LIVE);
    E(ERROR_NONSPECIFIC); E(ERROR_VERSION); E(ERROR_FAIL); E(ERROR_NI); E(ERROR_NOMEM); E(ERROR_INVAL);
    E(ERROR_BADFAIL); E(ERROR_GUEST_TIMEDOUT); E(ERROR_TIMEDOUT); E(ERROR_NOPARAVIRT);
    E(ERROR_NOT_READY); E(ERROR_OSEVENT_REG_FAIL); E(ERROR_BUFFERFULL); E(ERROR_UNKNOWN_CHILD);
    E(ERROR_LOCK_FAIL); E(ERROR_JSON_CONFIG_EMPTY); E(ERROR_DEVICE_EXISTS);
    E(ERROR_CHECKPOINT_DEVOPS_DOES_NOT_MATCH); E(ERROR_CHECKPOINT_DEVICE_NOT_SUPPORTED);
    E(ERROR_VNUMA_CONFIG_INVALID); E(ERROR_DOMAIN_NOTFOUND); E(ERROR_ABORTED); E(ERROR_NOTFOUND);
    E(ERROR_DOMAIN_DESTROYED); E(ERROR_FEATURE_REMOVED); E(ERROR_PROTOCOL_ERROR_QMP);
    E(ERROR_UNKNOWN_QMP_ERROR); E(ERROR_QMP_GENERIC_ERROR); E(ERROR_QMP_COMMAND_NOT_FOUND);
    E(ERROR_QMP_DEVICE_NOT_ACTIVE); E(ERROR_QMP_DEVICE_NOT_FOUND); E(ERROR_QEMU_API);
    return 0;
}
