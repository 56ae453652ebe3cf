// Package uffd is the small part of Linux's userfaultfd that post-copy
// migration needs: open a descriptor, register a range of anonymous memory
// in MISSING mode, read page-fault events with a deadline, and resolve a
// fault by copying a page in (UFFDIO_COPY), mapping the zero page
// (UFFDIO_ZEROPAGE) or waking the waiters of a page that is already there.
//
// golang.org/x/sys/unix has the syscall number but none of the ioctls or
// structs; they are defined here from linux/userfaultfd.h, and their sizes
// are checked by the tests.
//
// What this package must never do: block without a deadline. ReadFault
// polls with a timeout; the ioctls do not wait for the faulting thread.
// It knows nothing of guests, pages that must arrive or the network.
package uffd
