package ft

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/guest/netframe"
	"github.com/tandemvm/tandem/internal/tap"
)

// netPort is a node's end of the guest network: its TAP device, the
// reader that hands received frames to the card of the guest this node
// runs, and the writer of the frames the output gate releases.
//
// Received frames go in at once (Remus holds only output); a node that
// runs no guest, or one without a card, drops them. Frames to send are
// queued, never written by the caller: send runs on a vCPU (an
// unprotected guest's card) or under the output gate's release lock, and
// neither may wait for a full device. The reader and the writer are the
// port's own goroutines: close stops and joins them.
type netPort struct {
	dev       *tap.Device
	log       *slog.Logger
	nic       atomic.Pointer[guest.NIC] // the running guest's card; nil: none
	out       chan []byte               // frames for the writer; full: dropped
	stop      chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once

	// annMu guards the announcement schedule: annStop ends the one in
	// progress (nil: none), and closed refuses new ones once close
	// waits for the port's goroutines. It is also held from a schedule's
	// "still running nic?" check to its send, and by attach(nil), so no
	// announcement follows a detach.
	annMu   sync.Mutex
	annStop chan struct{}
	closed  bool

	received, delivered, sent atomic.Uint64
	// Frames to send that were dropped: the queue to the writer was
	// full, or the device's write failed or timed out.
	queueFull, writeFailed atomic.Uint64
	announcements          atomic.Uint64 // gratuitous ARPs queued
}

// The announcement schedule: a gratuitous ARP can be lost (a busy
// bridge, a switch port still coming up), so the node that starts
// running the guest sends announceCount of them, the first at once and
// each gap announceGapGrowth longer than the one before it: at 0, 50,
// 200, 450 and 800 ms after the start (each send is timed from the
// start, so a slow send does not push the later ones back). A switch or
// neighbour that missed the first learns the address within a second,
// and the repeats stop there.
const (
	announceCount     = 5
	announceFirstGap  = 50 * time.Millisecond
	announceGapGrowth = 100 * time.Millisecond
)

// announceOffset is the i-th announcement's time after the schedule's
// start (0 for the first).
func announceOffset(i int) time.Duration {
	var off time.Duration
	for k := 1; k <= i; k++ {
		off += announceFirstGap + time.Duration(k-1)*announceGapGrowth
	}
	return off
}

// frameWriteTimeout bounds one frame's write to the TAP device (a full
// device queue); the frame is then dropped, as a real link would.
const frameWriteTimeout = 100 * time.Millisecond

// sendQueueFrames bounds the frames waiting for the writer; beyond it
// send drops and counts them, as a card with a full transmit ring would.
const sendQueueFrames = 512

// newNetPort takes over dev (opened by the command, so a missing device
// permission or bridge is its start-up error) and starts its reader.
func newNetPort(dev *tap.Device, log *slog.Logger) *netPort {
	p := &netPort{dev: dev, log: log, out: make(chan []byte, sendQueueFrames), stop: make(chan struct{})}
	p.wg.Add(2)
	go p.read()
	go p.write()
	return p
}

// write writes queued frames to the device until close.
func (p *netPort) write() {
	defer p.wg.Done()
	for {
		select {
		case <-p.stop:
			return
		case f := <-p.out:
			if err := p.dev.WriteFrame(f, time.Now().Add(frameWriteTimeout)); err != nil {
				p.writeFailed.Add(1)
				continue
			}
			p.sent.Add(1)
		}
	}
}

// read delivers received frames to the current card until close.
func (p *netPort) read() {
	defer p.wg.Done()
	buf := make([]byte, 2048)
	for {
		select {
		case <-p.stop:
			return
		default:
		}
		n, err := p.dev.ReadFrame(buf, time.Now().Add(200*time.Millisecond))
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				p.log.Warn("guest network: read from the TAP device failed", "tap", p.dev.Name(), "err", err)
				select {
				case <-p.stop:
					return
				case <-time.After(100 * time.Millisecond):
				}
			}
			continue
		}
		p.received.Add(1)
		if nic := p.nic.Load(); nic != nil {
			if (*nic).Deliver(buf[:n]) == nil {
				p.delivered.Add(1)
			}
		}
	}
}

// attach makes nic (nil: none) the card received frames go to. A node
// that stops running the guest (nil) also stops announcing it: the card
// is dropped and the schedule ended under annMu, which announceLoop holds
// from its check to its send, so once attach(nil) returns no
// announcement goes out (a late one would point the bridge back here).
func (p *netPort) attach(nic guest.NIC) {
	if p == nil {
		return
	}
	if nic == nil {
		p.annMu.Lock()
		defer p.annMu.Unlock()
		p.nic.Store(nil)
		p.stopAnnouncingLocked()
		return
	}
	p.nic.Store(&nic)
}

// running reports whether nic is the card received frames go to.
func (p *netPort) running(nic guest.NIC) bool {
	cur := p.nic.Load()
	return cur != nil && *cur == nic
}

// sendErrors is the frames to send that were dropped, whatever the
// reason (status's frames_send_errors).
func (p *netPort) sendErrors() uint64 { return p.queueFull.Load() + p.writeFailed.Load() }

// send queues a copy of one frame for the network without waiting; with
// the queue full, or a write that fails or takes over frameWriteTimeout,
// the frame is dropped and counted in sendErrors.
func (p *netPort) send(frame []byte) {
	if p == nil {
		return
	}
	select {
	case p.out <- append([]byte(nil), frame...):
	default:
		p.queueFull.Add(1)
	}
}

// announce sends the card's gratuitous ARP on the announcement schedule,
// so the segment learns that the guest's address now lives behind this
// node's device. The schedule runs on a goroutine of the port; it ends
// early when the node stops running nic (attach), another announcement
// starts, or the port closes (which joins it).
func (p *netPort) announce(nic guest.NIC) {
	if p == nil || nic == nil {
		return
	}
	frame := nic.Announce()
	p.annMu.Lock()
	defer p.annMu.Unlock()
	if p.closed {
		return
	}
	p.stopAnnouncingLocked()
	stop := make(chan struct{})
	p.annStop = stop
	p.wg.Add(1)
	go p.announceLoop(nic, frame, stop)
	p.log.Info("guest network: announcing the address", "tap", p.dev.Name(), "times", announceCount)
}

// announceLoop sends frame announceCount times on the schedule while nic
// is the card this node runs. The check and the send are one step under
// annMu (see attach), and a schedule that was stopped sends nothing more.
func (p *netPort) announceLoop(nic guest.NIC, frame []byte, stop <-chan struct{}) {
	defer p.wg.Done()
	start := time.Now()
	for i := 0; i < announceCount; i++ {
		if i > 0 {
			t := time.NewTimer(time.Until(start.Add(announceOffset(i))))
			select {
			case <-stop:
				t.Stop()
				return
			case <-p.stop:
				t.Stop()
				return
			case <-t.C:
			}
		}
		if !p.sendAnnouncement(nic, frame, stop) {
			return
		}
	}
}

// sendAnnouncement queues frame if nic is still the running card and the
// schedule was not stopped; false: the schedule is over.
func (p *netPort) sendAnnouncement(nic guest.NIC, frame []byte, stop <-chan struct{}) bool {
	p.annMu.Lock()
	defer p.annMu.Unlock()
	select {
	case <-stop:
		return false
	default:
	}
	if !p.running(nic) {
		return false
	}
	p.send(frame)
	p.announcements.Add(1)
	return true
}

// stopAnnouncing ends the announcement schedule in progress, if any; once
// it returns, that schedule sends nothing more. A migration source calls
// it as the final pause begins, and a switchover's old primary as its
// final epoch begins: before the node taking over announces.
func (p *netPort) stopAnnouncing() {
	if p == nil {
		return
	}
	p.annMu.Lock()
	defer p.annMu.Unlock()
	p.stopAnnouncingLocked()
}

// stopAnnouncingLocked is stopAnnouncing with annMu held.
func (p *netPort) stopAnnouncingLocked() {
	if p.annStop != nil {
		close(p.annStop)
		p.annStop = nil
	}
}

// close stops the reader and the writer (joined within their deadlines;
// frames still queued are dropped) and closes the device; a second call
// does nothing.
func (p *netPort) close() {
	if p == nil {
		return
	}
	p.closeOnce.Do(func() {
		p.annMu.Lock()
		p.closed = true // no announcement starts once wg is waited for
		p.annMu.Unlock()
		close(p.stop)
		p.wg.Wait()
		p.dev.Close()
	})
}

// netStatusLocked is status's view of the guest network: the node's
// device and the card of the guest it runs (nil when neither is there).
// Precondition: n.mu held (it reads n.g and n.cfg).
func (n *Node) netStatusLocked(loop *failover.EpochLoop) *api.NetStatus {
	var nic guest.NIC
	if n.g != nil {
		nic = guest.NICOf(n.g)
	}
	if nic == nil && n.net == nil {
		return nil
	}
	ns := &api.NetStatus{}
	if p := n.net; p != nil {
		ns.Tap = p.dev.Name()
		ns.FramesReceived, ns.FramesDelivered = p.received.Load(), p.delivered.Load()
		ns.FramesSent, ns.FramesSendErrors, ns.Announcements = p.sent.Load(), p.sendErrors(), p.announcements.Load()
	}
	if nic != nil {
		ns.GuestIP = n.cfg.Net.IP
		c := nic.Counters()
		ns.CardReceived, ns.ARPReplies, ns.Datagrams, ns.CardSent = c.Received, c.ARPReplies, c.Datagrams, c.Sent
		d := c.Dropped
		ns.Dropped = api.DroppedFrames{Short: d[netframe.DropShort], TooLong: d[netframe.DropTooLong], BadLength: d[netframe.DropBadLength],
			BadChecksum: d[netframe.DropBadChecksum], Fragment: d[netframe.DropFragment], Unsupported: d[netframe.DropUnsupported], NotOurs: d[netframe.DropNotOurs],
			QueueFull: queueDrops(nic)}
		if u, ok := nic.(interface{ CountersUnavailable() string }); ok {
			ns.CardCountersUnavailable = u.CountersUnavailable()
		}
		if loop != nil {
			f, d := loop.Gate().Frames(), loop.Gate().FramesDropped()
			held, _ := loop.Gate().HeldFrames()
			ns.FramesReleased, ns.FramesOverHeld, ns.FramesHeld = &f, &d, &held
		}
	}
	return ns
}
