/*
 * fake_pv_kernel.S — the smallest x86-64 PV guest kernel libxenguest's ELF loader accepts:
 * a "linux" guest for "xen-3.0" with the Xen ELF notes, whose entry point halts.  Linked by
 * tests/xenhost.py with fake_pv_kernel.ld (virtual base 0xffffffff80000000, loaded at 1 MiB).
 * Nothing ever runs it: the fake hypervisor (fake_privcmd.c) only builds the domain.
 */
#define NOTE(type, body)                 \
    .balign 4;                           \
    .long 2f - 1f;                       \
    .long 4f - 3f;                       \
    .long type;                          \
1:  .asciz "Xen";                        \
2:  .balign 4;                           \
3:  body;                                \
4:  .balign 4

    .section .note.Xen, "a", @note
    NOTE(6, .asciz "linux")                    /* XEN_ELFNOTE_GUEST_OS */
    NOTE(7, .asciz "2.6")                      /* XEN_ELFNOTE_GUEST_VERSION */
    NOTE(5, .asciz "xen-3.0")                  /* XEN_ELFNOTE_XEN_VERSION */
    NOTE(3, .quad 0xffffffff80000000)          /* XEN_ELFNOTE_VIRT_BASE */
    NOTE(4, .quad 0)                           /* XEN_ELFNOTE_PADDR_OFFSET */
    NOTE(1, .quad _start)                      /* XEN_ELFNOTE_ENTRY */
    NOTE(2, .quad hypercall_page)              /* XEN_ELFNOTE_HYPERCALL_PAGE */
    NOTE(8, .asciz "generic")                  /* XEN_ELFNOTE_LOADER */
    NOTE(10, .asciz "!writable_page_tables")   /* XEN_ELFNOTE_FEATURES */

    .text
    .globl _start
_start:
    hlt
    jmp _start

    .balign 4096
hypercall_page:
    .fill 4096, 1, 0xcc
