package replica

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/trust"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/precopy"
)

// Secondary keeps a committed image of a primary's guest. It takes one
// primary connection at a time; each connection starts with a catch-up
// sync into a fresh image, and only once that image is consistent does it
// replace the previous one, so a primary that reconnects (or a new one)
// never leaves the secondary without a usable committed epoch.
type Secondary struct {
	R *Receiver
	// Store, if set, keeps the committed image on disk (see Store); its
	// policy says whether an epoch is fsynced before or right after its
	// acknowledgement (docs/DURABILITY.md).
	Store *Store
	// OnCommit, if set, is told of every consistent epoch committed (raft
	// learns from here that this node could take over at that epoch).
	OnCommit func(epoch uint64)
	// MinGeneration refuses primaries whose generation is lower (a stale
	// primary); updated by the caller as raft moves on.
	minGen func() uint64

	// mu guards the fields below.
	mu        sync.Mutex
	current   *Image // consistent committed image, or nil
	currentH  Hello
	syncing   *Image
	activated bool
	lastErr   string
	// storeErr is why the store was given up, if it was; storeDiskLost
	// says it was kept under SyncDisk, so the secondary acknowledges
	// nothing more (an acknowledgement would promise durability it
	// cannot give).
	storeErr      error
	storeDiskLost bool
	commits       uint64
	lastCommit    time.Time
	conn          net.Conn
	served        chan struct{} // closed when conn's Serve has returned
	from          string
	lastHeard     time.Time // the current primary's last handshake or epoch
	connGen       uint64    // the current primary's generation (its Hello)
	connPeer      string    // the node its certificate names ("" plaintext)
	// move is the last move notice heard (moving.go), moveConn its
	// connection while open and moveHeard its last heartbeat.
	move      *Move
	moveConn  net.Conn
	moveHeard time.Time
	// lostStore is a store given up (storeFailed): a restart may still
	// load its image, so a retirement is recorded there all the same.
	lostStore *Store

	// wmu serialises writes on a primary connection: Serve's
	// acknowledgements and Activate's last word.
	wmu sync.Mutex
}

// PrimaryContact says whether a primary is connected now, from where, and
// when it was last heard (its handshake or its last epoch; zero: never).
// A pair secondary refuses activation while its primary is heard.
func (s *Secondary) PrimaryContact() (from string, connected bool, lastHeard time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	from, connected, heard := s.from, s.conn != nil, s.lastHeard
	if s.moveConn != nil && s.move != nil {
		// A primary moving its guest ships no epochs: its move notice's
		// heartbeats say it is alive.
		from, connected = s.move.From, true
		if s.moveHeard.After(heard) {
			heard = s.moveHeard
		}
	}
	return from, connected, heard
}

// NewSecondary makes a Secondary building guests with r. minGen, if set,
// gives the lowest primary generation accepted.
func NewSecondary(r *Receiver, minGen func() uint64) *Secondary {
	return &Secondary{R: r, minGen: minGen}
}

// SenderLiveWindow is how recently the connected primary must have been
// heard (its handshake or an epoch) for a second sender to be refused. A
// live primary ships an epoch every few tens of milliseconds; a silent
// connection this old is a link its primary has given up on.
var SenderLiveWindow = 2 * time.Second

// ErrActivated is returned once the secondary has handed its image over.
var ErrActivated = errors.New("replica: secondary already activated")

// Serve receives one primary connection until it ends. It returns the
// reason the connection ended; the committed image survives it.
func (s *Secondary) Serve(ctx context.Context, conn net.Conn) error {
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	hello, br, err := s.R.handshake(conn, PurposeReplicate)
	if err != nil {
		return err
	}
	if hello.Purpose == PurposeMoving {
		return s.serveMoving(conn, hello, br)
	}
	refuse := func(format string, a ...any) error {
		err := fmt.Errorf(format, a...)
		conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: err.Error(), Build: s.R.Build})
		return err
	}
	done := make(chan struct{})
	defer close(done)
	cur, store, err := s.admit(conn, hello, done, refuse)
	if err != nil {
		return err
	}
	g, err := s.R.NewGuest(hello.Kind, hello.Config)
	if err != nil {
		return refuse("build the %s guest: %v", hello.Kind, err)
	}
	im := s.R.newImage(g, hello.Config)
	if store != nil {
		im.Record()
	}
	// Until it is adopted (its first consistent epoch), the image is a
	// guest nobody may activate, read or store, closed by this Serve on
	// any failure while the one held before stays: its catch-up writes
	// pages straight into memory, as a migration destination does,
	// rather than staging each and copying it again at the commit.
	im.WriteThrough()
	// Once it stages, an epoch is acknowledged before its pages are
	// copied into memory (image_settle.go): the copy follows the
	// acknowledgement, before the next epoch is read.
	im.AckBeforeCopy()
	adopted := false
	defer func() {
		im.Settle() // before the guest may be closed or handed over
		if !adopted {
			g.Close()
		}
		s.mu.Lock()
		if s.syncing == im {
			s.syncing = nil
		}
		if s.conn == conn {
			s.conn = nil
		}
		s.mu.Unlock()
	}()
	var last uint64
	if cur != nil {
		last = cur.Committed().Epoch
	}
	if err := s.R.replyOK(conn, last, hello.Kind); err != nil {
		return err
	}
	s.mu.Lock()
	s.syncing, s.from, s.lastHeard = im, conn.RemoteAddr().String(), time.Now()
	s.mu.Unlock()

	rd, err := checkpoint.NewReader(br, s.R.Limits)
	if err != nil {
		return s.fail(fmt.Errorf("stream from %s: %w", conn.RemoteAddr(), err))
	}
	if err := checkLayout(rd.Header(), hello.Kind, g); err != nil {
		return s.fail(err)
	}
	// Populate the primary's resident memory while its catch-up arrives
	// (stopped before the guest is closed: defers run last first).
	im.populateAhead(hello.Resident)
	defer im.stopAhead()
	for {
		e, err := rd.ReadEpoch(im)
		if err != nil {
			im.Discard()
			if errors.Is(err, io.EOF) {
				return s.fail(errors.New("primary ended the stream"))
			}
			return s.fail(fmt.Errorf("epoch %d from %s: %w", im.Committed().Epoch+1, conn.RemoteAddr(), err))
		}
		c := im.Committed()
		if store != nil {
			// With a store the copy precedes its writes and fsync, as
			// before AckBeforeCopy: an activation waits for the copy
			// and must never wait for the disk.
			im.Settle()
		}
		if store, err = s.keep(im, c, e, hello, store, &adopted); err != nil {
			return err
		}
		if adopted {
			im.endWriteThrough() // the failover image now: stage again
			im.adviseWholeWrites()
		}
		store, err = s.acknowledge(conn, im, c, e, hello, store, adopted)
		im.Settle() // done by acknowledge, unless it returned before its write
		if err != nil {
			return err
		}
	}
}

// admit decides whether conn's primary may stream here, and if so makes
// it the one connection served (done is closed when its Serve ends). It
// returns the image held now and the store, or the refusal (sent).
//
// One primary connection at a time. A second sender is refused while the
// current one is live (heard within SenderLiveWindow) and no newer: it may
// replace it only if it runs under a newer generation (the current one's
// primary is stale) or, with TLS, is the same node (its own reconnect
// after a link it gave up on). An accepted one ends the one before and
// waits for it to let go, since adopting an image closes the guest the
// other may still be writing.
func (s *Secondary) admit(conn net.Conn, hello Hello, done chan struct{}, refuse func(string, ...any) error) (*Image, *Store, error) {
	s.mu.Lock()
	activated, cur, curH, store := s.activated, s.current, s.currentH, s.Store
	storeErr, diskLost := s.storeErr, s.storeDiskLost
	s.mu.Unlock()
	switch {
	case activated:
		err := errors.New("this secondary has been activated and runs the guest itself")
		conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: err.Error(), Build: s.R.Build, Activated: true})
		return nil, nil, err
	case store == nil && diskLost:
		return nil, nil, refuse("this secondary cannot make epochs durable (--sync disk) since its store failed: %v", storeErr)
	case s.minGen != nil && hello.Generation < s.minGen():
		return nil, nil, refuse("primary generation %d is stale (the cluster is at %d)", hello.Generation, s.minGen())
	case cur != nil && (curH.Kind != hello.Kind || curH.Config.Memory != hello.Config.Memory):
		return nil, nil, refuse("this secondary holds a %s guest of %s; refusing a %s guest of %s (another guest)",
			curH.Kind, guest.FormatSize(curH.Config.Memory), hello.Kind, guest.FormatSize(hello.Config.Memory))
	}
	peer, _ := trust.PeerName(conn)
	s.mu.Lock()
	prevConn, prevDone := s.conn, s.served
	if prevConn != nil && time.Since(s.lastHeard) < SenderLiveWindow &&
		hello.Generation <= s.connGen && (peer == "" || peer != s.connPeer) {
		from, gen, heard := s.from, s.connGen, time.Since(s.lastHeard)
		s.mu.Unlock()
		return nil, nil, refuse("busy: this secondary serves the primary at %s (generation %d, heard %v ago); a second sender is refused",
			from, gen, heard.Round(time.Millisecond))
	}
	s.conn, s.served, s.connGen, s.connPeer = conn, done, hello.Generation, peer
	s.mu.Unlock()
	if prevConn != nil {
		prevConn.Close()
	}
	if prevDone != nil {
		select {
		case <-prevDone:
		case <-time.After(s.R.timeout()):
			return nil, nil, refuse("the previous primary connection did not end within %v", s.R.timeout())
		}
	}
	return cur, store, nil
}

// keep makes a received epoch (c is the image's committed state after
// it) last: the first consistent one adopts the
// image (replacing the one held) and begins the store; later ones are
// appended to it. It returns the store to go on with (nil once it failed
// under SyncMemory).
func (s *Secondary) keep(im *Image, c Committed, e checkpoint.EpochEnd, hello Hello, store *Store, adopted *bool) (*Store, error) {
	if c.Consistent && !*adopted {
		// The new image is a guest now: it replaces the old one.
		s.mu.Lock()
		if s.activated {
			s.mu.Unlock()
			return store, ErrActivated
		}
		old := s.current
		s.current, s.currentH, s.syncing = im, hello, nil
		if s.move != nil && s.moveConn == nil {
			// A primary's image replaces the one a move left behind
			// (a primary protected by this node now).
			s.move = nil
		}
		s.mu.Unlock()
		*adopted = true
		if old != nil && old != im {
			old.Close()
		}
		if store != nil {
			if err := store.Begin(im, hello); err != nil {
				return nil, s.storeFailed(store, e.Epoch, err)
			}
			// The stored image is this primary's now: a retirement
			// recorded for the old one no longer applies.
			if err := store.ClearMoved(); err != nil {
				return nil, s.storeFailed(store, e.Epoch, err)
			}
		}
	} else if *adopted && store != nil {
		pages, st, disk := im.LastCommit()
		if err := store.Append(im, e, pages, st, disk); err != nil {
			return nil, s.storeFailed(store, e.Epoch, err)
		}
	}
	if c.Consistent && *adopted && s.OnCommit != nil {
		s.OnCommit(e.Epoch)
	}
	return store, nil
}

// acknowledge answers a kept epoch (with the image's digest when the
// primary verifies) and, under SyncMemory, fsyncs the store behind the
// acknowledgement. It returns the store to go on with.
func (s *Secondary) acknowledge(conn net.Conn, im *Image, c Committed, e checkpoint.EpochEnd, hello Hello, store *Store, adopted bool) (*Store, error) {
	ack := precopy.Ack{Epoch: e.Epoch}
	if c.Consistent && hello.Verify {
		ack.Digest = im.Digest().String()
	}
	s.mu.Lock()
	if s.activated {
		// Activate owns the connection's last word now.
		s.mu.Unlock()
		return store, ErrActivated
	}
	s.commits++
	s.lastCommit = time.Now()
	if s.conn == conn {
		s.lastHeard = s.lastCommit
	}
	s.mu.Unlock()
	if err := FPBeforeAck.Hit(); err != nil {
		return store, s.fail(err)
	}
	s.wmu.Lock()
	conn.SetWriteDeadline(time.Now().Add(s.R.timeout()))
	err := writeLine(conn, ack)
	s.wmu.Unlock()
	im.Settle() // the epoch's pages into memory, before anything else
	if err != nil {
		return store, s.fail(fmt.Errorf("acknowledge epoch %d: %w", e.Epoch, err))
	}
	if adopted && store != nil && store.Policy() == SyncMemory {
		// The Remus contract: acknowledged from memory, fsynced behind
		// the acknowledgement (before the next epoch is read).
		if err := FPAfterAckBeforeSync.Hit(); err != nil {
			return store, s.fail(err)
		}
		if err := store.Sync(); err != nil {
			return nil, s.storeFailed(store, e.Epoch, err)
		}
	}
	if adopted && store != nil {
		// A compaction writes the whole image: behind the
		// acknowledgement, never in front of it.
		if err := store.Compact(im); err != nil {
			// e.Epoch is acknowledged (and, under SyncDisk, fsynced):
			// the next one is what the failure costs.
			return nil, s.storeFailed(store, e.Epoch+1, err)
		}
	}
	return store, nil
}

// storeFailed gives up persistence and says so loudly: a restart would no
// longer come back at the last epoch. With SyncMemory replication goes on
// in memory (nil is returned); with SyncDisk the epoch must not be
// acknowledged, so the error to end the stream with is returned, and
// later primaries are refused.
func (s *Secondary) storeFailed(st *Store, epoch uint64, err error) error {
	policy := st.Policy()
	s.R.log().Error("secondary: cannot persist the committed image; a restart will need a full re-sync",
		"err", err, "sync", policy.String())
	s.mu.Lock()
	s.lastErr = err.Error()
	s.storeErr, s.storeDiskLost = err, policy == SyncDisk
	if s.Store == st {
		s.Store, s.lostStore = nil, st
	}
	s.mu.Unlock()
	st.Close()
	if policy == SyncDisk {
		return s.fail(fmt.Errorf("epoch %d not acknowledged: --sync disk and the store failed: %w", epoch, err))
	}
	return nil
}

// LoadStored makes the image kept in Store (if any) the committed one, so
// a restarted secondary can be activated at its last committed epoch
// before any primary reconnects.
func (s *Secondary) LoadStored() (Committed, bool, error) {
	s.mu.Lock()
	store := s.Store
	s.mu.Unlock()
	if store == nil {
		return Committed{}, false, nil
	}
	im, h, ok, err := store.Load(s.R)
	if err != nil {
		s.fail(err)
		return Committed{}, false, err
	}
	if !ok {
		return Committed{}, false, nil
	}
	// A secondary that retired after a move stays retired (moved.go).
	mv, merr := store.LoadMoved()
	if merr != nil {
		s.R.log().Error("the move marker cannot be read; taken as retired", "err", merr)
	}
	s.mu.Lock()
	s.current, s.currentH = im, h
	if mv != nil {
		s.move = mv
	}
	s.mu.Unlock()
	if mv != nil {
		s.R.log().Warn("RETIRED before this restart: the guest moved away; this secondary refuses activation until a primary syncs its full image",
			"migration", mv.MigrationID, "destination", mv.Destination, "epoch", mv.Epoch)
	}
	return im.Committed(), true, nil
}

func (s *Secondary) fail(err error) error {
	s.mu.Lock()
	s.lastErr = err.Error()
	s.mu.Unlock()
	return err
}

// Activate stops receiving and hands over the last consistent committed
// image as a paused guest with its state loaded, plus the primary's
// handshake (its configuration). The caller resumes it.
func (s *Secondary) Activate() (guest.Guest, Hello, Committed, error) {
	s.mu.Lock()
	if s.activated {
		s.mu.Unlock()
		return nil, Hello{}, Committed{}, ErrActivated
	}
	cur, h, conn, moveConn := s.current, s.currentH, s.conn, s.moveConn
	if s.move != nil && s.move.Done {
		err := movedError(s.move)
		s.mu.Unlock()
		return nil, Hello{}, Committed{}, err
	}
	if cur == nil {
		s.mu.Unlock()
		return nil, Hello{}, Committed{}, ErrInconsistent
	}
	s.activated = true
	s.mu.Unlock()
	if moveConn != nil {
		// A forced activation while the primary moves the guest: its
		// commit, if it comes, is refused (retire), so the destination
		// never releases; ending the notice tells it at once.
		moveConn.Close()
	}
	if conn != nil {
		// Tell the primary, while its connection is there, that this node
		// runs the guest now: it fences itself (stops releasing output,
		// pauses its guest). Best effort and bounded: a partitioned
		// primary hears it only when it next connects (the refusal says
		// the same). Then stop the stream; a staged partial epoch is
		// dropped by the receiving goroutine, the committed image is
		// untouched.
		// The deadline comes first: it also cuts an acknowledgement
		// Serve may be writing under wmu (with its own, longer deadline),
		// so activation waits at most a second for the lock.
		conn.SetWriteDeadline(time.Now().Add(time.Second))
		s.wmu.Lock()
		conn.SetWriteDeadline(time.Now().Add(time.Second))
		writeLine(conn, precopy.Ack{Activated: true, Error: ""})
		s.wmu.Unlock()
		conn.Close()
	}
	g, c, err := cur.Activate()
	if err != nil {
		s.mu.Lock()
		s.activated = false
		s.mu.Unlock()
		return nil, h, c, err
	}
	return g, h, c, nil
}

// SecondaryStatus is what a secondary reports; JSON names are part of
// `tandem status --json`, kept in package api.
type SecondaryStatus = api.SecondaryStatus

// Status reports the committed image; digest adds its digest.
func (s *Secondary) Status(digest bool) SecondaryStatus {
	s.mu.Lock()
	cur, syncing := s.current, s.syncing
	st := SecondaryStatus{Syncing: syncing != nil, Primary: s.from, Commits: s.commits, LastError: s.lastErr, Activated: s.activated}
	if s.Store != nil {
		st.SyncPolicy = s.Store.Policy().String()
		if e, ok := s.Store.SyncedEpoch(); ok {
			st.SyncedEpoch = &e
		}
	} else if s.storeErr != nil {
		st.StoreError = s.storeErr.Error()
	}
	if s.conn == nil {
		st.Primary = ""
	}
	if !s.lastCommit.IsZero() {
		st.LastCommitAgoMs = time.Since(s.lastCommit).Milliseconds()
	}
	if cur != nil {
		st.GuestKind = s.currentH.Kind
		st.DiskPath = s.currentH.Config.Disk
	}
	s.mu.Unlock()
	if cur != nil {
		c := cur.Committed()
		st.LastCommittedEpoch, st.Consistent = c.Epoch, c.Consistent
		if digest {
			st.Digest = cur.Digest().String()
		}
	}
	st.Protected = st.Consistent && st.Primary != "" && !st.Activated
	return st
}

// Close ends the primary connection being served, waits (bounded) until
// its Serve has returned, and releases the held guest (not an activated
// one). A Serve still running reads and writes the committed guest's
// memory (delta bases, commits), so the guest is closed only once it has
// let go: closing it under a commit unmapped the memory being written
// (a secondary stopped with SIGTERM while its primary streamed died of
// SIGSEGV). If Serve does not return in time the guest is left open and
// the call says so in the log.
func (s *Secondary) Close() {
	s.mu.Lock()
	cur, activated, conn, served := s.current, s.activated, s.conn, s.served
	s.current, s.syncing = nil, nil
	s.mu.Unlock()
	if conn != nil {
		conn.Close()
		if served != nil {
			select {
			case <-served:
			case <-time.After(s.R.timeout()):
				s.R.log().Error("secondary: the primary connection did not end after close; its image is left open", "timeout", s.R.timeout())
				return
			}
		}
	}
	if cur != nil && !activated {
		cur.Close()
	}
	// A syncing image belongs to its Serve, which closes it. The store
	// is closed (fsynced, and marked clean) only now that no Serve
	// appends to it.
	s.mu.Lock()
	st := s.Store
	s.Store = nil
	s.mu.Unlock()
	st.Close()
}
