package kvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// kickSignal interrupts KVM_RUN on a vCPU's thread. Go's runtime already
// handles SIGURG (its own preemption signal) and treats a stray one as a
// no-op, and a pending signal makes KVM_RUN return EINTR.
const kickSignal = unix.SIGURG

// kvm_run offsets.
const (
	runImmediateExit = 1
	runExitReason    = 8
	runExitData      = 32
	// kvm_valid_regs, and the sync-regs area (struct kvm_sync_regs on
	// x86: kvm_regs, kvm_sregs, kvm_vcpu_events) KVM fills at the end of
	// a KVM_RUN entered with kvm_valid_regs set (KVM_CAP_SYNC_REGS).
	runValidRegs  = 288
	runSyncRegs   = 304
	runSyncSregs  = runSyncRegs + 144
	runSyncEvents = runSyncSregs + 312
	// syncRegsAll asks for all three (KVM_SYNC_X86_REGS, _SREGS, _EVENTS).
	syncRegsAll = 1 | 2 | 4
)

// A vCPU's idle wait (idle), as Guest.Pause sees it.
const (
	idleNot     = iota // running, or serving an exit
	idleClean          // waiting, its exit completed: its state is whole and does not change until it wakes
	idleClaimed        // taken as parked by a Pause while it waited: it must not enter the guest before a resume
)

type vcpu struct {
	g       *Guest
	id      int
	fd      int
	run     []byte
	cpuid   []cpuidEntry
	tid     atomic.Int32
	wake    chan struct{} // capacity 1: leave an idle wait early
	parked  chan struct{} // capacity 1: the vCPU has parked for a pause
	exited  chan struct{} // closed when the vCPU goroutine returns
	started bool
	ring    *dirtyRing // with DirtyRing only

	// synced: kvm_run's sync-regs area holds this vCPU's registers,
	// special registers and events as they are now: KVM stored them at
	// the EINTR exit of a KVM_RUN entered with kvm_valid_regs set, and
	// the vCPU has not entered KVM_RUN since (cleared before every
	// KVM_RUN, and by a restore). saveState then reads them there
	// instead of with three ioctls.
	synced atomic.Bool
	// idleState is idleNot, idleClean or idleClaimed (see idle).
	idleState atomic.Int32
	// kicks counts kickRun's calls (idle keeps a kick's immediate_exit).
	kicks atomic.Uint32
	// pending: a KVM_RUN that only meant to complete an exit (idle)
	// returned pendingErr or a new exit instead of EINTR; the loop serves
	// it before entering KVM_RUN again. vCPU thread only.
	pending    bool
	pendingErr error
	// cpuidEnc is cpuid encoded (encodeState), nil until needed or after
	// cpuid changed; used under Guest.ctl.
	cpuidEnc []byte
}

func (g *Guest) createVCPUs() error {
	cpuid, err := supportedCPUID(g.sysFd)
	if err != nil {
		return err
	}
	for i := 0; i < g.cfg.VCPUs; i++ {
		fd, err := ioctl(g.vmFd, kvmCreateVCPU, uintptr(i))
		if err != nil {
			return fmt.Errorf("kvm: KVM_CREATE_VCPU %d: %w", i, err)
		}
		v := &vcpu{g: g, id: i, fd: int(fd), wake: make(chan struct{}, 1), parked: make(chan struct{}, 1), exited: make(chan struct{})}
		g.vcpus = append(g.vcpus, v)
		run, err := unix.Mmap(v.fd, 0, g.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err != nil {
			return fmt.Errorf("kvm: mmap kvm_run of vCPU %d: %w", i, err)
		}
		v.run = run
		if g.ringEntries > 0 {
			if err := g.mapDirtyRing(v); err != nil {
				return err
			}
		}
		v.cpuid = vcpuCPUID(cpuid, uint32(i))
		if err := setCPUID(v.fd, v.cpuid); err != nil {
			return fmt.Errorf("kvm: KVM_SET_CPUID2 vCPU %d: %w", i, err)
		}
	}
	return g.probeMSRs()
}

// supportedCPUID reads KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG.
func supportedCPUID(sysFd int) ([]cpuidEntry, error) {
	for n := 128; n <= 4096; n *= 2 {
		buf := make([]byte, 8+40*n)
		binary.LittleEndian.PutUint32(buf, uint32(n))
		_, err := ioctl(sysFd, kvmGetSupportedCPUID, uintptr(unsafe.Pointer(&buf[0])))
		runtime.KeepAlive(buf)
		if errors.Is(err, unix.E2BIG) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		nent := binary.LittleEndian.Uint32(buf)
		out := make([]cpuidEntry, nent)
		copy(unsafe.Slice((*byte)(unsafe.Pointer(&out[0])), 40*int(nent)), buf[8:])
		return out, nil
	}
	return nil, fmt.Errorf("kvm: KVM_GET_SUPPORTED_CPUID: more than 4096 entries")
}

// vcpuCPUID sets the APIC ID of vCPU id in leaves 1 and 0xB.
func vcpuCPUID(base []cpuidEntry, id uint32) []cpuidEntry {
	out := append([]cpuidEntry(nil), base...)
	for i := range out {
		switch out[i].Function {
		case 1:
			out[i].EBX = out[i].EBX&0x00ffffff | id<<24
		case 0xb:
			out[i].EDX = id
		}
	}
	return out
}

func setCPUID(fd int, es []cpuidEntry) error {
	buf := make([]byte, 8+40*len(es))
	binary.LittleEndian.PutUint32(buf, uint32(len(es)))
	if len(es) > 0 {
		copy(buf[8:], unsafe.Slice((*byte)(unsafe.Pointer(&es[0])), 40*len(es)))
	}
	_, err := ioctl(fd, kvmSetCPUID2, uintptr(unsafe.Pointer(&buf[0])))
	runtime.KeepAlive(buf)
	return err
}

// setEntryState puts the vCPU in 64-bit long mode at CPL3 at the image's
// entry, with IOPL=3 so its port I/O exits to Tandem, interrupts off.
func (v *vcpu) setEntryState(entry uint64) error {
	var s Sregs
	if _, err := ioctlPtr(v.fd, kvmGetSregs, &s); err != nil {
		return fmt.Errorf("kvm: KVM_GET_SREGS vCPU %d: %w", v.id, err)
	}
	code := Segment{Limit: 0xffffffff, Selector: selUserCode, Type: 11, Present: 1, DPL: 3, S: 1, L: 1, G: 1}
	data := Segment{Limit: 0xffffffff, Selector: selUserData, Type: 3, Present: 1, DPL: 3, DB: 1, S: 1, G: 1}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = Segment{Base: uint64(tssGPA + tssStride*v.id), Limit: tssLimit, Selector: uint16(selTSS0 + 16*v.id), Type: 11, Present: 1}
	s.GDT = DTable{Base: gdtGPA, Limit: uint16(8*5 + 16*v.g.cfg.VCPUs - 1)}
	s.IDT = DTable{Base: idtGPA, Limit: 16*256 - 1}
	s.CR0 = 0x80010033 // PG WP NE ET MP PE
	s.CR3 = pml4GPA
	s.CR4 = 0x620  // OSXMMEXCPT OSFXSR PAE; TSD clear so rdtsc works at CPL3
	s.EFER = 0x500 // LMA LME
	if _, err := ioctlPtr(v.fd, kvmSetSregs, &s); err != nil {
		return fmt.Errorf("kvm: KVM_SET_SREGS vCPU %d: %w", v.id, err)
	}
	r := Regs{RIP: entry, RSP: ustackGPA + ustackSize*uint64(v.id+1), RDI: uint64(v.id), RSI: bootGPA, RFLAGS: 0x3002}
	if _, err := ioctlPtr(v.fd, kvmSetRegs, &r); err != nil {
		return fmt.Errorf("kvm: KVM_SET_REGS vCPU %d: %w", v.id, err)
	}
	return nil
}

// runWord is the first 32-bit word of kvm_run, holding
// request_interrupt_window (byte 0, always 0 here) and immediate_exit
// (byte 1); Tandem writes it atomically from other threads.
func (v *vcpu) runWord() *uint32 { return (*uint32)(unsafe.Pointer(&v.run[0])) }

// setValidRegs sets kvm_valid_regs for the next KVM_RUN: all three sync
// register sets, or none (storing them costs every exit). vCPU thread
// only; the kernel reads the field at the end of KVM_RUN.
func (v *vcpu) setValidRegs(on bool) {
	var w uint64
	if on {
		w = syncRegsAll
	}
	binary.LittleEndian.PutUint64(v.run[runValidRegs:], w)
}

// syncedRegs, syncedSregs and syncedEvents are the sync-regs area's
// parts; they hold the vCPU's state only while synced says so.
func (v *vcpu) syncedRegs() *Regs { return (*Regs)(unsafe.Pointer(&v.run[runSyncRegs])) }
func (v *vcpu) syncedSregs() *Sregs {
	return (*Sregs)(unsafe.Pointer(&v.run[runSyncSregs]))
}
func (v *vcpu) syncedEvents() *VCPUEvents {
	return (*VCPUEvents)(unsafe.Pointer(&v.run[runSyncEvents]))
}

// run enters KVM_RUN once. With stop (a pause is requested) it asks for
// an immediate exit, so KVM only completes the exit being served (a port
// I/O is finished on the next KVM_RUN) and returns EINTR, and, where KVM
// offers sync regs, for the registers to be stored in kvm_run on the way
// out: synced then says they are there.
func (v *vcpu) runOnce(stop bool) error {
	sync := stop && v.g.syncRegs
	if stop {
		v.setImmediateExit(true)
	}
	v.synced.Store(false)
	v.setValidRegs(sync)
	_, err := ioctl(v.fd, kvmRun, 0)
	if sync && errors.Is(err, unix.EINTR) {
		v.synced.Store(true)
	}
	return err
}

func (v *vcpu) setImmediateExit(on bool) {
	var w uint32
	if on {
		w = 1 << (8 * runImmediateExit)
	}
	atomic.StoreUint32(v.runWord(), w)
}

// kick makes the vCPU leave KVM_RUN or an idle wait soon: immediate_exit
// covers a thread about to enter KVM_RUN, the signal one already inside,
// the wake token one waiting in Tandem.
func (v *vcpu) kick() {
	if !v.kickRun() {
		return
	}
	select {
	case v.wake <- struct{}{}:
	default:
	}
}

// kickRun takes the vCPU out of KVM_RUN without ending an idle wait. It
// reports false for a vCPU that is not running at all.
func (v *vcpu) kickRun() bool {
	if !v.started {
		return false
	}
	select {
	case <-v.exited:
		return false
	default:
	}
	v.kicks.Add(1)
	v.setImmediateExit(true)
	if tid := v.tid.Load(); tid != 0 {
		_ = unix.Tgkill(unix.Getpid(), int(tid), kickSignal)
	}
	return true
}

// loop runs the vCPU on its own locked OS thread until Close or a guest
// failure. It only parks after a KVM_RUN returned EINTR, so a port I/O
// that exited to Tandem has been completed by KVM before any state is read.
func (v *vcpu) loop() {
	runtime.LockOSThread()
	// The thread is not unlocked: it dies with the goroutine, so a stale
	// tid can never name a thread running other Go code of ours.
	defer close(v.exited)
	v.tid.Store(int32(unix.Gettid()))
	g := v.g
	for {
		var err error
		if v.pending {
			// What idle's completing KVM_RUN returned: served now.
			v.pending, err = false, v.pendingErr
			v.pendingErr = nil
		} else {
			err = v.runOnce(g.pauseReq.Load())
		}
		// A kick (EINTR: a pause or the throttle) is not timed as an
		// exit: the pause phases and throttle_percent report that time.
		et := g.exitTimes.Load()
		var left time.Time
		if et != nil && err == nil {
			left = time.Now()
		}
		if errors.Is(err, unix.EINTR) {
			v.setImmediateExit(false)
			if g.syncRegs && !v.synced.Load() && g.pauseReq.Load() {
				// Kicked out of the guest for a pause: once more
				// without entering it, so KVM stores the registers for
				// the state save (one KVM_RUN instead of three ioctls).
				continue
			}
			if !v.parkIfRequested() {
				return
			}
			v.throttleSleep()
			continue
		}
		if err != nil {
			g.fail(fmt.Errorf("kvm: vCPU %d: KVM_RUN: %w", v.id, err))
			return
		}
		h := 0
		if et != nil {
			h = v.exitHandler()
		}
		ferr := v.handleExit()
		var served time.Time
		if et != nil {
			served = time.Now()
			et.Exit(h, v.id, left, served.Sub(left))
		}
		if ferr != nil {
			g.fail(ferr)
			return
		}
		if v.throttleSleep() && et != nil {
			served = time.Now()
		}
		if et != nil {
			et.Outside(v.id, served.Sub(left))
		}
	}
}

// parkIfRequested waits while a pause is requested. It returns false when
// the guest is closing.
func (v *vcpu) parkIfRequested() bool {
	g := v.g
	select {
	case <-g.closing:
		return false
	default:
	}
	g.mu.Lock()
	if !g.pauseReq.Load() {
		g.mu.Unlock()
		return true
	}
	ch := g.resumeCh
	g.mu.Unlock()
	select {
	case v.parked <- struct{}{}:
	default:
	}
	select {
	case <-ch:
		return true
	case <-g.closing:
		return false
	}
}

// throttleSleep keeps the vCPU out of the guest until the current throttle
// window ends; a pause or close ends the sleep early. It reports whether
// it slept.
func (v *vcpu) throttleSleep() bool {
	d := v.g.throttleRemaining()
	if d <= 0 {
		return false
	}
	select { // a stale token must not end the sleep; Pause sends a fresh one
	case <-v.wake:
	default:
	}
	if v.g.pauseReq.Load() {
		return false
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-v.wake:
	case <-v.g.closing:
	}
	return true
}

// handleExit serves one exit; a non-nil error stops the vCPU and fails
// the guest.
func (v *vcpu) handleExit() error {
	reason := binary.LittleEndian.Uint32(v.run[runExitReason:])
	d := v.run[runExitData:]
	switch reason {
	case exitIO:
		dir, size := d[0], int(d[1])
		port := binary.LittleEndian.Uint16(d[2:])
		count := int(binary.LittleEndian.Uint32(d[4:]))
		off := binary.LittleEndian.Uint64(d[8:])
		if size != 1 && size != 2 && size != 4 || off+uint64(size*count) > uint64(len(v.run)) {
			return fmt.Errorf("kvm: vCPU %d: malformed I/O exit (port %#x size %d count %d)", v.id, port, size, count)
		}
		buf := v.run[off : off+uint64(size*count)]
		if dir == 1 {
			return v.portOut(port, size, buf)
		}
		v.portIn(port, size, buf)
		return nil
	case exitHLT:
		return v.describeStop("halted")
	case exitShutdown:
		return v.describeStop("triple fault (shutdown)")
	case exitMMIO:
		return fmt.Errorf("kvm: vCPU %d: guest accessed unbacked memory at GPA %#x", v.id, binary.LittleEndian.Uint64(d))
	case exitFailEntry:
		return fmt.Errorf("kvm: vCPU %d: VM entry failed, hardware reason %#x", v.id, binary.LittleEndian.Uint64(d))
	case exitInternalError:
		return fmt.Errorf("kvm: vCPU %d: KVM internal error, suberror %d", v.id, binary.LittleEndian.Uint32(d))
	case exitIntr:
		return nil
	case exitDirtyRingFull:
		if v.ring == nil {
			return fmt.Errorf("kvm: vCPU %d: dirty-ring-full exit without a dirty ring", v.id)
		}
		return v.g.ringFull(v)
	default:
		return fmt.Errorf("kvm: vCPU %d: unexpected exit reason %d", v.id, reason)
	}
}

func (v *vcpu) describeStop(what string) error {
	var r Regs
	_, _ = ioctlPtr(v.fd, kvmGetRegs, &r)
	return fmt.Errorf("kvm: vCPU %d: guest %s at rip %#x", v.id, what, r.RIP)
}

var vectorNames = [32]string{"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "", "#TS", "#NP", "#SS", "#GP", "#PF", "",
	"#MF", "#AC", "#MC", "#XM", "#VE", "#CP"}

func (v *vcpu) portOut(port uint16, size int, buf []byte) error {
	g := v.g
	val := func() uint32 {
		switch size {
		case 1:
			return uint32(buf[0])
		case 2:
			return uint32(binary.LittleEndian.Uint16(buf))
		}
		return binary.LittleEndian.Uint32(buf)
	}
	switch {
	case port >= portUART && port < portUART+8:
		if size != 1 {
			return nil
		}
		g.uart.write(port-portUART, buf, g.console.sink())
	case port == portExc:
		return v.exceptionError(val())
	case port == portPanic:
		return fmt.Errorf("kvm: vCPU %d: micro-guest panic, code %#x", v.id, val())
	case port == portIdle:
		v.idle(time.Duration(val()) * time.Microsecond)
	case port == portProgress:
		g.progress.Store(val())
	case port == portConsTx:
		// Bulk output: one exit per batch of replies instead of one per
		// byte. The sink gets a copy; the guest reuses its buffer.
		n := min(uint64(val()), consBuf)
		if src, ok := g.guestBytes(consTxGPA, n); ok && n > 0 {
			g.uart.write(0, append([]byte(nil), src...), g.console.sink())
		}
	case port == portDiskSubmit:
		if g.disk != nil {
			g.disk.submit(uint64(val()))
		}
	case port == portNetTx:
		// vCPU 0 owns the card: one thread writes the host's indices.
		if g.nic != nil && v.id == 0 {
			g.nic.transmit(val())
		}
	}
	return nil
}

func (v *vcpu) portIn(port uint16, size int, buf []byte) {
	g := v.g
	switch {
	case port >= portUART && port < portUART+8 && size == 1:
		for i := range buf {
			buf[i] = g.uart.read(port - portUART)
		}
		return
	case port == portConsRx && size == 4:
		// Bulk input: queued bytes move into the guest's buffer (a write
		// by Tandem, so it is marked dirty) and EAX gets the count.
		dst, _ := g.guestBytes(consRxGPA, consBuf)
		n := g.uart.readBulk(dst)
		if n > 0 {
			g.MarkDirty(consRxGPA>>12, 1)
		}
		if g.nic != nil && v.id == 0 {
			g.nic.fill() // the console poll is the card's poll too
		}
		binary.LittleEndian.PutUint32(buf, uint32(n))
		return
	case port == portDiskDone && size == 4 && g.disk != nil:
		binary.LittleEndian.PutUint32(buf, g.disk.completedCount())
		return
	}
	for i := range buf { // no device: the bus floats high
		buf[i] = 0xff
	}
}

// idle blocks the vCPU thread (outside KVM_RUN) until console input, a
// kick, close, or d.
//
// While pauses come (a protected guest: Guest.cleanIdle), the vCPU first
// completes the idle port write with a KVM_RUN that does not enter the
// guest (runOnce) and marks itself idleClean: its state is then whole and
// stays as it is while it waits, so a Pause takes it as parked without
// waking it (Guest.Pause: no kick, no thread switch, and its registers
// already stored). A vCPU that a Pause claimed so (idleClaimed) and wakes
// before the resume parks at once instead of entering the guest.
func (v *vcpu) idle(d time.Duration) {
	if d > time.Second {
		d = time.Second
	}
	if v.id == 0 && (v.g.uart.hasInput() || v.g.nic.hasPending()) || v.g.pauseReq.Load() {
		return
	}
	clean := false
	if v.g.cleanIdle() {
		k := v.kicks.Load()
		err := v.runOnce(true)
		v.setImmediateExit(false)
		if v.kicks.Load() != k {
			// A kick (a pause, the throttle, Close) set immediate_exit
			// meanwhile too: it stays set for the loop's next KVM_RUN.
			// (kickRun counts before it sets; both atomic, so a kick
			// whose flag the clear above overwrote is counted here.)
			v.setImmediateExit(true)
		}
		if !errors.Is(err, unix.EINTR) {
			// Not the EINTR asked for (KVM completes an OUT and stops
			// there; nothing else is expected): the loop serves it.
			v.pending, v.pendingErr = true, err
			return
		}
		clean = true
		v.idleState.Store(idleClean)
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-v.wake:
	case <-v.g.closing:
	}
	if clean && !v.idleState.CompareAndSwap(idleClean, idleNot) {
		// Claimed by a Pause: out of the idle state first, then look at
		// the request (Pause sets the request, then looks at the state:
		// one of the two sees the other), and park while it lasts.
		v.idleState.Store(idleNot)
		v.parkIfRequested()
	}
}

// exceptionError reads the exception frame the CPL0 stub left on its stack
// ([rsp]=vector, [rsp+8]=error code, [rsp+16]=rip) to name the fault.
func (v *vcpu) exceptionError(vec uint32) error {
	var r Regs
	var s Sregs
	_, _ = ioctlPtr(v.fd, kvmGetRegs, &r)
	_, _ = ioctlPtr(v.fd, kvmGetSregs, &s)
	name := "exception"
	if vec < 32 && vectorNames[vec] != "" {
		name = vectorNames[vec]
	}
	msg := fmt.Sprintf("kvm: vCPU %d: guest exception %s (vector %d)", v.id, name, vec)
	if frame, ok := v.g.guestBytes(r.RSP, 24); ok {
		msg += fmt.Sprintf(" at rip %#x, error code %#x", binary.LittleEndian.Uint64(frame[16:]), binary.LittleEndian.Uint64(frame[8:]))
	}
	if vec == 14 {
		msg += fmt.Sprintf(", address %#x", s.CR2)
	}
	return errors.New(msg)
}

// guestBytes returns n bytes of guest memory at gpa if they lie in one
// region, faulted in while post-copy is on (faultIn: that may wait for
// the source as long as a page is missing).
func (g *Guest) guestBytes(gpa, n uint64) ([]byte, bool) {
	b, ok := g.memAt(gpa, n)
	if ok {
		g.faultIn(b)
	}
	return b, ok
}

// memAt is guestBytes without the fault-in: nothing is touched.
func (g *Guest) memAt(gpa, n uint64) ([]byte, bool) {
	for _, r := range g.regions {
		if gpa >= r.GPA && gpa-r.GPA+n <= uint64(len(r.Mem)) && gpa+n > gpa {
			return r.Mem[gpa-r.GPA : gpa-r.GPA+n], true
		}
	}
	return nil, false
}

func (v *vcpu) release() {
	v.ring.release()
	if v.run != nil {
		_ = unix.Munmap(v.run)
		v.run = nil
	}
	if v.fd >= 0 {
		unix.Close(v.fd)
		v.fd = -1
	}
}
