package kvm

import (
	"context"
	"encoding/binary"
	"sync"
	"time"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/block"
)

// maxDiskInflight bounds requests the guest may have outstanding; beyond
// it a submit is dropped and counted complete with nothing written (the
// micro-guest never exceeds 16).
const maxDiskInflight = 64

// guestFlushTimeout bounds a flush the guest asked for.
const guestFlushTimeout = 60 * time.Second

// pvDisk is Tandem's paravirtual disk: the guest writes the GPA of a
// request {u32 op, u32 len, u64 offset, u64 buf} to port 0x510; Tandem
// copies the buffer at once (so the guest may reuse it) and queues the
// write on the block device. Port 0x511 reads how many requests have
// completed. Completion never writes guest memory, so a completion racing
// a checkpoint cannot change the memory image behind Tandem's back.
type pvDisk struct {
	g   *Guest
	dev *block.Disk

	// mu guards the counters and the in-flight list.
	mu        sync.Mutex
	submitted uint64
	completed uint64
	inflight  []*diskReq // submission order
	flushWG   sync.WaitGroup
	rejected  uint64
}

type diskReq struct {
	op   uint32
	off  uint64
	data []byte
}

func newPVDisk(g *Guest, dev *block.Disk) *pvDisk { return &pvDisk{g: g, dev: dev} }

func (d *pvDisk) completedCount() uint32 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return uint32(d.completed)
}

// submit reads the request at gpa and queues it. Malformed requests
// (outside RAM, beyond the disk window) complete at once with no effect:
// a guest bug must not become a host error.
func (d *pvDisk) submit(gpa uint64) {
	// One copy of the header, read before mu: the guest may rewrite it
	// meanwhile, and what is checked, faulted in and used must be the
	// same request.
	var hdr [24]byte
	mem, ok := d.g.guestBytes(gpa, 24)
	if ok {
		copy(hdr[:], mem)
	}
	le := binary.LittleEndian
	op, n, off, buf := le.Uint32(hdr[:]), uint64(le.Uint32(hdr[4:])), le.Uint64(hdr[8:]), le.Uint64(hdr[16:])
	valid := op == diskOpWrite && n > 0 && off+n <= diskBytes && off+n > off
	if ok && valid {
		// On a post-copy destination the buffer's pages may be owed:
		// fault them in before mu, so the wait (unbounded while the
		// source is away) holds up this vCPU only, not the completions
		// that take mu (and Close, which waits for them). Only a valid
		// write's: a junk length would populate a whole region.
		d.g.faultInGPA(buf, n)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.submitted++
	if !ok || len(d.inflight) >= maxDiskInflight {
		d.rejected++
		d.completed++
		return
	}
	switch op {
	case diskOpWrite:
		src, ok := d.g.guestBytes(buf, n)
		if !ok || !valid {
			d.rejected++
			d.completed++
			return
		}
		d.issue(&diskReq{op: op, off: off, data: append([]byte(nil), src...)})
	case diskOpFlush:
		d.issue(&diskReq{op: op})
	default:
		d.rejected++
		d.completed++
	}
}

// issue starts r on the device. Precondition: mu held.
func (d *pvDisk) issue(r *diskReq) {
	d.inflight = append(d.inflight, r)
	if r.op == diskOpFlush {
		d.flushWG.Add(1)
		go func() {
			defer d.flushWG.Done()
			ctx, cancel := context.WithTimeout(context.Background(), guestFlushTimeout)
			defer cancel()
			_ = d.dev.Flush(ctx) // a failed or late flush still completes the request
			d.done(r)
		}()
		return
	}
	if err := d.dev.Write(r.off, r.data, func(error) { d.done(r) }); err != nil {
		d.inflight = d.inflight[:len(d.inflight)-1]
		d.completed++
	}
}

func (d *pvDisk) done(r *diskReq) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, x := range d.inflight {
		if x == r {
			d.inflight = append(d.inflight[:i], d.inflight[i+1:]...)
			d.completed++
			return
		}
	}
}

func (d *pvDisk) flush(ctx context.Context) error { return d.dev.Flush(ctx) }

func (d *pvDisk) close() error {
	err := d.dev.Close()
	d.flushWG.Wait() // Close failed every queued flush, so this returns
	return err
}

// diskStateV1 is the saved disk: the counters the guest sees and the
// requests still in flight, reissued on restore.
type diskStateV1 struct {
	Submitted, Completed uint64
	Writes               []guest.DiskWrite
	Flushes              uint32
	Rejected             uint64
}

func (d *pvDisk) save() diskStateV1 {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := diskStateV1{Submitted: d.submitted, Completed: d.completed, Rejected: d.rejected}
	for _, r := range d.inflight {
		if r.op == diskOpFlush {
			s.Flushes++
			continue
		}
		s.Writes = append(s.Writes, guest.DiskWrite{Offset: r.off, Data: r.data})
	}
	return s
}

func (d *pvDisk) load(s diskStateV1) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.submitted, d.completed, d.rejected = s.Submitted, s.Completed, s.Rejected
	d.inflight = nil
	for _, w := range s.Writes {
		d.issue(&diskReq{op: diskOpWrite, off: w.Offset, data: w.Data})
	}
	for i := uint32(0); i < s.Flushes; i++ {
		d.issue(&diskReq{op: diskOpFlush})
	}
}

// BlockDisk returns the disk behind the paravirtual device, or nil without
// one (fault injection and flush timings reach it through here).
func (g *Guest) BlockDisk() *block.Disk {
	if g.disk == nil {
		return nil
	}
	return g.disk.dev
}
