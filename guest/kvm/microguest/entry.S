/*
 * Image header, entry point and exception stubs. Everything here but the
 * stubs runs at CPL3; the stubs run at CPL0 (emulated on kvm-pvm, which is
 * fine: they only report the vector and stop).
 */
#include "layout.h"

	.section .text.head, "ax"
	.globl _hdr
_hdr:
	.quad IMAGE_MAGIC
	.long 1                 /* version */
	.long 48                /* header size */
	.quad _start
	.quad exc_stub0
	.long 16
	.long 32
	.quad _end

	.text
	.globl _start
/* The VMM enters here at CPL3 with rdi = vCPU index, rsi = boot block,
 * rsp = top of this vCPU's stack. */
_start:
	andq $-16, %rsp
	call guest_main
	movl $0xdead, %eax
	movw $PORT_PANIC, %dx
	outl %eax, %dx
1:	jmp 1b

/* 32 stubs, 16 bytes apart, so the VMM can build the IDT from exc_stub0.
 * Vectors 8, 10-14, 17, 21, 29, 30 push an error code; the others push 0
 * so the frame is the same: [rsp]=vector, [rsp+8]=error, [rsp+16]=rip. */
	.balign 16
exc_stub0:
	.set vec, 0
	.rept 32
	.balign 16
	.if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	pushq $vec
	.else
	pushq $0
	pushq $vec
	.endif
	jmp exc_common
	.set vec, vec + 1
	.endr

exc_common:
	movl (%rsp), %eax
	movw $PORT_EXC, %dx
	outl %eax, %dx
2:	hlt
	jmp 2b
	.section .note.GNU-stack,"",@progbits
