package synth

import (
	"runtime"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/tandemvm/tandem/guest"
)

// Work-unit sizes. A unit is what a vCPU does between two looks at the
// pause flag, so these bound the pause latency (a few microseconds each).
const (
	touchPerUnit  = 8  // pages first-touched per unit (each may fault)
	writesPerUnit = 16 // page writes per unit in the dirty phase
	// throttleSlice is the period within which a throttled vCPU runs for
	// (100-percent)% and sleeps for the rest.
	throttleSlice = 10 * time.Millisecond
	// maxBacklog caps how far a vCPU that fell behind its dirty rate
	// (descheduled host, slow faults) may catch up in a burst.
	maxBacklog = 10 * time.Millisecond
	// diskEvery is how many page writes of the dirty workload go with one
	// disk write when the guest has a disk.
	diskEvery = 64
	// diskSpan is the per-vCPU range of the disk the dirty workload writes.
	diskSpan = 16 << 20
)

// Phases of the dirty workload.
const (
	phaseTouch = 0
	phaseDirty = 1
)

// vcpuState is one vCPU's saved state, version 1: where its workload is.
// Everything else a vCPU holds is derived from the configuration or is
// wall-clock pacing, which restarts on resume.
type vcpuState struct {
	Phase     uint8
	TouchNext uint64 // next page to touch, relative to the vCPU's range
	Cursor    uint64 // seq pattern position, relative to the range
	RNG       uint64 // splitmix64 state
	Counter   uint64 // page writes made, the value written
}

const vcpuStateVersion = 1

// vcpu is one virtual CPU: a goroutine that runs work units of the
// workload until paused or closed.
type vcpu struct {
	g     *Guest
	index int

	// The vCPU's share of the dirty workload: pages [first, first+n) of
	// the touched range at rate pages per second.
	first, n uint64
	rate     uint64

	// st is written only by the vCPU goroutine while it runs and by the
	// controller while the guest is paused; parking orders the two.
	st vcpuState

	// writes mirrors st.Counter for readers outside the vCPU (PageWrites).
	writes atomic.Uint64

	// scratch holds one write's data.
	scratch [guest.PageSize]byte

	// tid is the OS thread this vCPU is locked to while post-copy is on
	// (0: not locked), so a userfaultfd fault's thread names its vCPU.
	tid atomic.Int32

	// pacing, not saved: reset on every resume.
	tokens    float64
	lastTick  time.Time
	sliceFrom time.Time
}

func (v *vcpu) run() {
	defer v.g.vcpuWG.Done()
	defer v.unpin() // a vCPU ending while post-copy is on
	for {
		if v.g.stopReq.Load() {
			parked := true
			v.timed(hPark, func() { parked = v.g.park() })
			if !parked {
				return
			}
			now := time.Now()
			v.lastTick, v.sliceFrom, v.tokens = now, now, 0
			continue
		}
		if !v.throttle() {
			continue
		}
		v.pinForPostcopy()
		v.step()
	}
}

// pinForPostcopy locks the vCPU to its OS thread while post-copy is on
// and unlocks it after, so the blocked time a userfaultfd reports per
// thread is the vCPU's (VCPUOfThread).
func (v *vcpu) pinForPostcopy() {
	on := v.g.mem.postcopy.Load()
	switch {
	case on && v.tid.Load() == 0:
		runtime.LockOSThread()
		v.tid.Store(int32(unix.Gettid()))
	case !on:
		v.unpin()
	}
}

// unpin undoes pinForPostcopy's lock, if it holds one: the thread is no
// longer the vCPU's (and a goroutine that ends locked takes its thread
// down with it).
func (v *vcpu) unpin() {
	if v.tid.Load() != 0 {
		v.tid.Store(0)
		runtime.UnlockOSThread()
	}
}

// throttle sleeps for the throttled share of the current slice; it
// returns false when it slept (the caller looks at the pause flag again).
func (v *vcpu) throttle() bool {
	p := v.g.throttle.Load()
	if p <= 0 {
		return true
	}
	now := time.Now()
	run := throttleSlice * time.Duration(100-p) / 100
	if now.Sub(v.sliceFrom) < run {
		return true
	}
	v.g.sleep(throttleSlice - run)
	now = time.Now()
	// Time spent throttled earns no dirty-rate credit: that is the point.
	v.sliceFrom, v.lastTick = now, now
	return false
}

// step runs one work unit.
func (v *vcpu) step() {
	switch {
	case v.g.kv != nil && v.index == 0:
		v.serveConsole()
	case v.g.kv != nil && v.n == 0:
		v.g.sleep(time.Hour) // other vCPUs of a kv guest idle, unless they dirty
	case v.st.Phase == phaseTouch:
		v.touch()
	default:
		v.dirty()
	}
}

func (v *vcpu) serveConsole() {
	c := v.g.console
	line, tooLong, ok := c.takeLine()
	if !ok {
		if v.g.nic != nil {
			if f, ok := v.g.nic.take(); ok {
				v.serveFrame(f)
				return
			}
		}
		v.timed(hIdle, v.g.waitInput)
		return
	}
	reply := v.serveRequest(line, tooLong)
	v.timed(hConsTx, func() { c.emit(append(reply, '\n')) })
}

// serveRequest serves one kv request (from the console or a datagram):
// its reply, after submitting the disk write it made, if any.
func (v *vcpu) serveRequest(req []byte, tooLong bool) []byte {
	if tooLong {
		return []byte("ERR line too long")
	}
	reply, dw := v.g.kv.serve(req)
	if dw != nil {
		v.timed(hDiskSubmit, func() { v.g.diskWrite(dw.off, dw.data) })
	}
	return reply
}

// serveFrame runs one received frame through the card's stack: an ARP
// request for the guest's address is answered, a UDP datagram to its kv
// port is served as one request (the same table, the same <client>:<seq>
// record as on the console) and answered to its sender. The reply leaves
// on this vCPU in this work unit, like a console reply.
func (v *vcpu) serveFrame(frame []byte) {
	n := v.g.nic
	out, req, from, ok := n.input(frame)
	if out != nil {
		n.emit(out)
	}
	if !ok || req == nil {
		return
	}
	reply := v.serveRequest(req, len(req) > maxLineBytes)
	if f, err := n.reply(from, append(reply, '\n')); err == nil {
		n.emit(f)
	}
}

// touch fills the next pages of the vCPU's range with the fill profile
// (guest.FillPage: the same bytes the micro-guest writes). A file fill was
// done by the host at boot, so the touch only moves through the range.
func (v *vcpu) touch() {
	m := v.g.mem
	w := &v.g.cfg.Workload
	kind := guest.FillKind(w.Fill)
	for i := 0; i < touchPerUnit && v.st.TouchNext < v.n; i++ {
		p := v.first + v.st.TouchNext
		switch kind {
		case guest.FillKindZero:
			m.putUint64(p<<guest.PageShift, p+1)
		case guest.FillKindFile:
		default:
			m.faultIn(p<<guest.PageShift, guest.PageSize)
			page := m.mem[p<<guest.PageShift : (p+1)<<guest.PageShift]
			guest.FillPage(page, kind, w.Seed, p)
			if kind != guest.FillKindMixed || guest.MixedClass(w.Seed, p) != guest.ClassEmpty {
				m.mark(p)
			}
		}
		v.st.TouchNext++
	}
	if v.st.TouchNext >= v.n {
		v.st.Phase = phaseDirty
		now := time.Now()
		v.lastTick, v.tokens = now, 0
	}
}

func (v *vcpu) dirty() {
	if v.rate == 0 || v.n == 0 {
		v.g.sleep(time.Hour)
		return
	}
	now := time.Now()
	v.tokens += now.Sub(v.lastTick).Seconds() * float64(v.rate)
	v.lastTick = now
	if limit := maxBacklog.Seconds() * float64(v.rate); v.tokens > limit && v.tokens > writesPerUnit {
		v.tokens = max(limit, writesPerUnit)
	}
	if v.tokens < 1 {
		wait := time.Duration((1 - v.tokens) / float64(v.rate) * float64(time.Second))
		v.g.sleep(min(max(wait, 20*time.Microsecond), 2*time.Millisecond))
		return
	}
	k := min(int(v.tokens), writesPerUnit)
	v.tokens -= float64(k)
	m := v.g.mem
	for i := 0; i < k; i++ {
		p := v.first + v.nextPage()
		v.st.Counter++
		c := v.st.Counter
		v.write(p, c)
		if v.g.disk != nil && c%diskEvery == 0 {
			blk := make([]byte, guest.PageSize)
			m.faultIn(p<<guest.PageShift, guest.PageSize)
			copy(blk, m.mem[p<<guest.PageShift:(p+1)<<guest.PageShift])
			off := uint64(v.index)*diskSpan + (c/diskEvery)%(diskSpan/guest.PageSize)*guest.PageSize
			v.timed(hDiskSubmit, func() { v.g.diskWrite(off, blk) })
		}
	}
	v.writes.Store(v.st.Counter)
}

// write makes write number c to page p with the write profile: WriteSize
// bytes at guest.WriteOffset, holding guest.WriteData.
func (v *vcpu) write(p, c uint64) {
	m := v.g.mem
	w := &v.g.cfg.Workload
	n, kind := w.WriteSize(), guest.WriteKind(w.WriteData)
	off := p<<guest.PageShift + guest.WriteOffset(n, c, p)
	if n == 8 && kind == guest.WriteKindCounter {
		m.putUint64(off, c) // the old write, without the scratch copy
		return
	}
	buf := v.scratch[:n]
	guest.WriteData(buf, kind, w.Seed, c, p)
	m.write(off, buf)
}

// nextPage picks the next page to write, relative to the vCPU's range.
func (v *vcpu) nextPage() uint64 {
	switch v.g.cfg.Workload.Pattern {
	case guest.PatternSeq:
		p := v.st.Cursor % v.n
		v.st.Cursor = p + 1
		return p
	case guest.PatternHot:
		// 10% of the pages take 90% of the writes.
		hot := max(v.n/10, 1)
		r := v.rand()
		if r%10 != 0 || hot == v.n {
			return (r / 10) % hot
		}
		return hot + (r/10)%(v.n-hot)
	default:
		return v.rand() % v.n
	}
}

// rand is splitmix64: tiny state that is saved with the vCPU.
func (v *vcpu) rand() uint64 {
	v.st.RNG += 0x9e3779b97f4a7c15
	return mix(v.st.RNG)
}

func mix(z uint64) uint64 { return guest.Mix(z) }
