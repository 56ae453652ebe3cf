package failover

import (
	"github.com/tandemvm/tandem/internal/clock"
	"sync"
	"time"
)

// OutputGate holds back everything the guest says to the outside world
// until the epoch that produced it is safe on the secondary (output
// commit). The guest writes through Write on its vCPU; the epoch loop calls
// Seal at every pause and Release when the secondary acknowledges an epoch.
//
// Bytes written after Seal(n) returned and before Seal(n+1) belong to
// epoch n+1: the guest is paused across Seal, so no write straddles it.
//
// Arrivals tells the epoch loop, without polling, that the open epoch
// has output held: a value is sent (never blocking, at most one pending)
// when its first byte is held. OpenHeld then says how much and since
// when, so output-triggered epochs can end the epoch for it.
//
// Fencing: Release consults the allow function (the generation check) on
// every call; when it says no, nothing leaves, and Discard drops what is
// held. A gate never releases out of order and never releases twice.
//
// Locks: the sink (the outside world) never runs under mu, so Seal (at a
// pause, with the guest stopped), a held Write, Holding, Held and Delays
// never wait for it. Every sink call runs under relMu instead, which only
// orders releases: whoever releases takes relMu, then mu just long enough
// to check allow and take the bytes out of pending, then calls the sink
// with mu released and relMu still held. Lock order: relMu, then mu;
// never mu then relMu. Discard takes relMu too, so when it returns no sink
// call is in flight, and any later release checks allow (which the fence
// has turned false before Discard) with nothing held: nothing held at
// Discard ever reaches the sink.
type OutputGate struct {
	// relMu serialises sink calls (Release, Hold(false), a passing
	// Write) and Discard; it guards no field.
	relMu sync.Mutex
	// mu guards every field below.
	mu   sync.Mutex
	sink func([]byte)
	// frameSink takes the guest's network frames, one call per frame
	// (nil: frames are dropped); frames are held and released with the
	// console's bytes, each kind in its own order.
	frameSink func([]byte)
	frames    uint64 // frames released or passed
	// frameBytes is the bytes of frames in pending, at most
	// maxHeldFrameBytes, and heldFrames their number; framesDropped
	// counts the frames refused over the bound.
	frameBytes    int
	heldFrames    int
	framesDropped uint64
	observe       OutputObserver
	allow         func() bool
	open          uint64 // epoch the next written byte belongs to
	released      uint64 // highest epoch released (0: none)
	pending       []heldOutput
	held          int         // bytes in pending
	clock         clock.Clock // stamps writes and releases: the output delays
	passing       bool        // not holding: Write releases at once (unprotected)
	// openBytes is held output of the open epoch, its first byte held at
	// openSince.
	openBytes int
	openSince time.Time
	// overlapAt is when output was last written while earlier epochs'
	// output still waited for its acknowledgement: the writer did not
	// wait for its replies (pipelined load).
	overlapAt time.Time
	arrived   chan struct{} // Arrivals; buffered 1

	delays []time.Duration // output delay of recent releases: a ring of maxDelaySamples
	next   int             // where the ring's next sample goes once it is full

	// consoleCost is what console writes in pending cost (their bytes
	// plus heldRecordCost each), at most maxHeldConsoleBytes;
	// consoleDropped counts the console bytes refused over the bound.
	consoleCost    int
	consoleDropped uint64
}

type heldOutput struct {
	epoch   uint64
	written time.Time
	data    []byte
	frame   bool // a network frame (frameSink), not console bytes
}

// OutputObserver is told about the output a gate releases (metrics).
// Its functions run under the gate's lock: they must return at once
// (a histogram's Observe) and never call the gate. Either may be nil.
type OutputObserver struct {
	// Delay is each held write or frame's wait, from written to
	// released (frame: a network frame, else console bytes).
	Delay func(frame bool, d time.Duration)
	// EpochFrames is the number of frames an epoch held, for each
	// released epoch that held any.
	EpochFrames func(frames int)
}

// maxHeldFrameBytes bounds the network frames held for their epochs.
const maxHeldFrameBytes = 16 << 20

// maxHeldConsoleBytes bounds the console output held, counted as
// consoleCost: a hold can last as long as an operator takes to resolve it
// (a post-copy destination whose protected source died), and a chatty
// guest must not grow the process until it runs out of memory. Past it
// console bytes are dropped and counted (ConsoleDropped).
const maxHeldConsoleBytes = 16 << 20

// heldRecordCost is what one held write costs beyond its bytes (its
// record in pending), so that one-byte writes are bounded too.
const heldRecordCost = 64

// maxDelaySamples bounds the kept output-delay samples.
const maxDelaySamples = 4096

// NewOutputGate makes a gate releasing to sink; allow (nil: always) is the
// fencing check called before every release. firstEpoch is the number of
// the epoch in progress.
func NewOutputGate(firstEpoch uint64, sink func([]byte), allow func() bool) *OutputGate {
	return newOutputGate(firstEpoch, sink, allow, nil)
}

// newOutputGate is NewOutputGate on the clock clk (nil: clock.Real).
func newOutputGate(firstEpoch uint64, sink func([]byte), allow func() bool, clk clock.Clock) *OutputGate {
	if allow == nil {
		allow = func() bool { return true }
	}
	return &OutputGate{sink: sink, allow: allow, open: firstEpoch, clock: clock.Or(clk), arrived: make(chan struct{}, 1)}
}

// Write holds p as output of the epoch in progress, or passes it straight
// on while the gate is not holding (and the fencing check allows). It
// never blocks on the outside world; it copies p.
func (g *OutputGate) Write(p []byte) { g.write(p, false) }

// WriteFrame is Write for one network frame the guest sent: held with the
// epoch in progress like console bytes, and handed to the frame sink
// whole, one call per frame.
func (g *OutputGate) WriteFrame(p []byte) { g.write(p, true) }

// SetFrameSink sets where released frames go (nil: dropped).
func (g *OutputGate) SetFrameSink(sink func([]byte)) {
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	g.frameSink = sink
	g.mu.Unlock()
}

// SetObserver sets who is told about released output.
func (g *OutputGate) SetObserver(o OutputObserver) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.observe = o
}

// HeldFrames is the frames waiting for their epochs and their bytes.
func (g *OutputGate) HeldFrames() (frames, bytes int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.heldFrames, g.frameBytes
}

// Frames counts the frames released (or passed while not holding).
func (g *OutputGate) Frames() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.frames
}

// FramesDropped counts the frames refused because maxHeldFrameBytes of
// frames already waited for their epochs.
func (g *OutputGate) FramesDropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.framesDropped
}

// ConsoleDropped counts the console bytes refused because
// maxHeldConsoleBytes of console output was already held.
func (g *OutputGate) ConsoleDropped() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.consoleDropped
}

func (g *OutputGate) write(p []byte, frame bool) {
	if len(p) == 0 {
		return
	}
	g.mu.Lock()
	if !g.passing {
		g.holdLocked(p, frame)
		g.mu.Unlock()
		return
	}
	g.mu.Unlock()
	// Passing: the sink call needs relMu, taken before mu (lock order);
	// the gate may have switched to holding meanwhile, so look again.
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	if !g.passing {
		g.holdLocked(p, frame)
		g.mu.Unlock()
		return
	}
	sink := g.sink
	if frame {
		sink = g.frameSink
	}
	ok := g.allow() && sink != nil
	if ok && frame {
		g.frames++
	}
	g.mu.Unlock()
	if ok {
		sink(p)
	}
}

// holdLocked keeps a copy of p as output of the open epoch; mu is held.
func (g *OutputGate) holdLocked(p []byte, frame bool) {
	if frame {
		// A card can send at line rate while acknowledgements stall:
		// past the bound a frame is dropped, as a full transmit ring
		// drops it, and the guest's protocols send it again.
		if g.frameBytes+len(p) > maxHeldFrameBytes {
			g.framesDropped++
			return
		}
		g.frameBytes += len(p)
		g.heldFrames++
	} else {
		if g.consoleCost+len(p)+heldRecordCost > maxHeldConsoleBytes {
			g.consoleDropped += uint64(len(p))
			return
		}
		g.consoleCost += len(p) + heldRecordCost
	}
	now := g.clock.Now()
	g.pending = append(g.pending, heldOutput{epoch: g.open, written: now, data: append([]byte(nil), p...), frame: frame})
	if g.held > g.openBytes {
		g.overlapAt = now
	}
	g.held += len(p)
	if g.openBytes == 0 {
		g.openSince = now
		select {
		case g.arrived <- struct{}{}:
		default: // one pending is enough: the reader looks at OpenHeld
		}
	}
	g.openBytes += len(p)
}

// Arrivals receives a value when the open epoch's first byte is held
// (see OutputGate). A value may be stale (its output sealed since):
// read OpenHeld.
func (g *OutputGate) Arrivals() <-chan struct{} { return g.arrived }

// OpenOutput is the held output of the epoch in progress (not yet
// sealed).
type OpenOutput struct {
	Bytes int       // held in the open epoch
	Since time.Time // its first byte's
	// OverlapAt is the last time output was written while earlier
	// epochs' output still waited (zero: never).
	OverlapAt time.Time
}

// OpenHeld returns the held output of the epoch in progress.
func (g *OutputGate) OpenHeld() OpenOutput {
	g.mu.Lock()
	defer g.mu.Unlock()
	return OpenOutput{Bytes: g.openBytes, Since: g.openSince, OverlapAt: g.overlapAt}
}

// Seal closes the epoch in progress and returns its number; later writes
// belong to the next epoch. Call it while the guest is paused.
func (g *OutputGate) Seal() uint64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := g.open
	g.open++
	g.openBytes = 0
	return n
}

// Release lets out, in order, every byte of epochs up to and including
// acked. It returns false (and releases nothing) if the fencing check
// refuses. The sink runs under relMu, not the state lock, so releases
// stay ordered while Seal and Write do not wait for it; it must not call
// back into the gate.
func (g *OutputGate) Release(acked uint64) bool {
	if FPBeforeReleaseOutput.Hit() != nil {
		return false
	}
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	if !g.allow() {
		g.mu.Unlock()
		return false
	}
	i := 0
	now := g.clock.Now()
	// One sink call per release, not per write: a console client then
	// gets one chunk per epoch however many replies the epoch held.
	var out []byte
	var frames [][]byte
	epochFrames := 0 // frames of pending[i-1]'s epoch so far
	for ; i < len(g.pending) && g.pending[i].epoch <= acked; i++ {
		h := g.pending[i]
		if i > 0 && h.epoch != g.pending[i-1].epoch {
			g.observeEpochLocked(epochFrames)
			epochFrames = 0
		}
		if h.frame {
			frames = append(frames, h.data)
			g.frameBytes -= len(h.data)
			g.heldFrames--
			epochFrames++
		} else {
			out = append(out, h.data...)
			g.consoleCost -= len(h.data) + heldRecordCost
		}
		g.held -= len(h.data)
		d := now.Sub(h.written)
		// A ring, not a shifted slice: under pipelined load thousands of
		// items are released a second, and shifting 4,096 samples for
		// each cost a 32 KiB copy apiece.
		if len(g.delays) < maxDelaySamples {
			g.delays = append(g.delays, d)
		} else {
			g.delays[g.next] = d
			g.next = (g.next + 1) % maxDelaySamples
		}
		if g.observe.Delay != nil {
			g.observe.Delay(h.frame, d)
		}
	}
	g.observeEpochLocked(epochFrames)
	g.pending = append(g.pending[:0], g.pending[i:]...)
	if acked > g.released {
		g.released = acked
	}
	sink, frameSink := g.sink, g.frameSink
	if frameSink != nil {
		g.frames += uint64(len(frames))
	}
	g.mu.Unlock()
	if len(out) > 0 && sink != nil {
		sink(out)
	}
	if frameSink != nil {
		for _, f := range frames {
			frameSink(f)
		}
	}
	return true
}

// observeEpochLocked reports an epoch's released frames, if any; mu is
// held.
func (g *OutputGate) observeEpochLocked(frames int) {
	if frames > 0 && g.observe.EpochFrames != nil {
		g.observe.EpochFrames(frames)
	}
}

// Hold switches between holding output for acknowledgements (a protected
// primary) and passing it on at once (an unprotected one, which has no
// secondary to wait for). Switching to passing first releases everything
// held, in order, if the fencing check allows.
//
// Hold(true) (at a pause) takes only mu: it calls no sink, and a passing
// Write already past its check still sinks its bytes under relMu before
// any release of held output can (they were written before the switch).
func (g *OutputGate) Hold(on bool) {
	if on {
		g.mu.Lock()
		g.passing = false
		g.mu.Unlock()
		return
	}
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	var out []heldOutput
	if !g.passing && g.allow() {
		out = g.pending
		g.clearLocked()
	}
	g.passing = true
	sink, frameSink := g.sink, g.frameSink
	for _, h := range out {
		if h.frame && frameSink != nil {
			g.frames++
		}
	}
	g.mu.Unlock()
	for _, h := range out {
		switch {
		case h.frame && frameSink != nil:
			frameSink(h.data)
		case !h.frame && sink != nil:
			sink(h.data)
		}
	}
}

// Holding reports whether the gate holds output for acknowledgements.
func (g *OutputGate) Holding() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return !g.passing
}

// Discard drops everything held (a fenced or demoted primary). It waits
// for a sink call in flight (relMu), so once it returns nothing more
// leaves for what was held; the caller turns allow false first, so later
// releases refuse.
func (g *OutputGate) Discard() {
	g.relMu.Lock()
	defer g.relMu.Unlock()
	g.mu.Lock()
	g.clearLocked()
	g.mu.Unlock()
}

// clearLocked drops everything held, with the counts kept beside it.
func (g *OutputGate) clearLocked() {
	g.pending, g.held, g.openBytes, g.frameBytes, g.heldFrames, g.consoleCost = nil, 0, 0, 0, 0, 0
}

// Held returns how many bytes wait for their epoch.
func (g *OutputGate) Held() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.held
}

// Delays returns the recent output delays (write to release), in no
// particular order.
func (g *OutputGate) Delays() []time.Duration {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]time.Duration(nil), g.delays...)
}
