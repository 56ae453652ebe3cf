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

	received, delivered, sent, sendErrors atomic.Uint64
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
				p.sendErrors.Add(1)
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

// attach makes nic (nil: none) the card received frames go to.
func (p *netPort) attach(nic guest.NIC) {
	if p == nil {
		return
	}
	if nic == nil {
		p.nic.Store(nil)
		return
	}
	p.nic.Store(&nic)
}

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
		p.sendErrors.Add(1)
	}
}

// announce sends the card's gratuitous ARP, so the segment learns that
// the guest's address now lives behind this node's device.
func (p *netPort) announce(nic guest.NIC) {
	if p == nil || nic == nil {
		return
	}
	p.send(nic.Announce())
	p.log.Info("guest network: address announced", "tap", p.dev.Name())
}

// close stops the reader and the writer (joined within their deadlines;
// frames still queued are dropped) and closes the device; a second call
// does nothing.
func (p *netPort) close() {
	if p == nil {
		return
	}
	p.closeOnce.Do(func() {
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
		ns.FramesSent, ns.FramesSendErrors = p.sent.Load(), p.sendErrors.Load()
	}
	if nic != nil {
		ns.GuestIP = n.cfg.Net.IP
		c := nic.Counters()
		ns.CardReceived, ns.ARPReplies, ns.Datagrams, ns.CardSent = c.Received, c.ARPReplies, c.Datagrams, c.Sent
		d := c.Dropped
		ns.Dropped = api.DroppedFrames{Short: d[netframe.DropShort], TooLong: d[netframe.DropTooLong], BadLength: d[netframe.DropBadLength],
			BadChecksum: d[netframe.DropBadChecksum], Fragment: d[netframe.DropFragment], Unsupported: d[netframe.DropUnsupported], NotOurs: d[netframe.DropNotOurs]}
		if loop != nil {
			f, d := loop.Gate().Frames(), loop.Gate().FramesDropped()
			ns.FramesReleased, ns.FramesOverHeld = &f, &d
		}
	}
	return ns
}
