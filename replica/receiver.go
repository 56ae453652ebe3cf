package replica

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"time"

	"github.com/tandemvm/tandem/internal/trust"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/precopy"
)

// Factory builds an empty, paused guest of a kind from a configuration,
// without booting it: its memory is zero until a stream fills it.
type Factory func(kind string, cfg guest.Config) (guest.Guest, error)

// Receiver accepts data connections.
type Receiver struct {
	NewGuest Factory
	Build    string
	Limits   checkpoint.Limits
	Log      *slog.Logger
	// Timeout bounds every read: a sender that sends nothing for this
	// long is gone. 0 means DefaultIOTimeout.
	Timeout time.Duration
	// Kind, if set, is the only guest kind accepted.
	Kind string
	// MaxMemory refuses guests larger than this many bytes; 0 means
	// DefaultMaxMemory. Anyone who reaches a data port may ask.
	MaxMemory uint64
	// DiskPath is where this receiver keeps its copy of a guest's disk:
	// its own --disk, or a file in its --data-dir. The sender's
	// Config.Disk names a file on the sender's host and is never opened
	// here (nor Config.Image). Empty: a guest with a disk is refused.
	DiskPath string
	// MaxEpochDisk bounds the disk writes one epoch may stage, in bytes;
	// 0 means DefaultMaxEpochDisk. With the guest's memory it makes the
	// staging budget of an epoch (see Image.SetBudget).
	MaxEpochDisk uint64
	// Sync is the durability policy of a store this receiver's
	// secondary keeps (--sync; StoreOptions.Sync of the store its caller
	// opens): see SyncPolicy and docs/DURABILITY.md.
	Sync SyncPolicy
	// AcceptUnsynced: StoreOptions.AcceptUnsynced of that store, the
	// operator's override (--accept-unsynced-image).
	AcceptUnsynced bool
	// HandshakeTimeout bounds reading the whole Hello, however slowly it
	// trickles in; 0 means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// Admit, if set, is asked once the Hello has passed every check and
	// before a guest is built; an error refuses the sender with it (a
	// receiver that takes one migration at a time says it is busy).
	Admit func(Hello) error
	// Sections, if set, gives the device sections (with versions) this
	// receiver loads for a guest kind; nil: what the kind's backend
	// registered (guest.StateVersionsOf). Tests set it to play an
	// older build.
	Sections func(kind string) (map[string]uint32, bool)
	// PostcopyConn, if set, takes a post-copy migration's extra
	// connections (Hello.Purpose PurposePostcopy) arriving where
	// migrations do: it is called with conn nil to ask whether the
	// migration h names is here and takes post-copy (an error refuses
	// the connection with it), then with the connection, which is then
	// its to close. nil: such connections are refused.
	PostcopyConn func(h Hello, conn net.Conn) error
}

// DefaultMaxEpochDisk is the disk writes one epoch may stage unless told
// otherwise: the sender's own bound on its log of unshipped disk writes
// (block.DefaultMaxLogBytes), so a real epoch never exceeds it.
const DefaultMaxEpochDisk = 256 << 20

// DefaultHandshakeTimeout bounds the reading of a Hello line.
const DefaultHandshakeTimeout = 5 * time.Second

func (r *Receiver) handshakeTimeout() time.Duration {
	if r.HandshakeTimeout > 0 {
		return r.HandshakeTimeout
	}
	return DefaultHandshakeTimeout
}

// stagingBudget is what one epoch of a guest of cfg may stage: its memory
// plus MaxEpochDisk, plus an eighth of that for the bookkeeping of each
// staged disk write (diskWriteOverhead, under 10% for writes of a 512-byte
// sector or more), so a real epoch with MaxEpochDisk of writes fits.
func (r *Receiver) stagingBudget(cfg guest.Config) uint64 {
	d := r.MaxEpochDisk
	if d == 0 {
		d = DefaultMaxEpochDisk
	}
	return cfg.Memory + d + d/8
}

// newImage wraps g with this receiver's staging budget for cfg.
func (r *Receiver) newImage(g guest.Guest, cfg guest.Config) *Image {
	im := NewImage(g)
	b := r.stagingBudget(cfg)
	im.SetBudget(b)
	raiseMemoryLimit(b)
	return im
}

// ErrNoDiskPlace refuses a guest with a disk on a receiver that has no
// place of its own for it.
var ErrNoDiskPlace = errors.New("replica: the guest has a disk and this receiver has no place for it (start it with --disk PATH or --data-dir DIR)")

// localConfig is the configuration a guest received from a sender (or
// read back from a stored image or snapshot) is built with here: the
// sender's, except for paths, which are never taken from the sender. A
// disk lives at DiskPath; the kvm image is not loaded (the guest is built
// empty and filled by the stream); a file: fill keeps its kind, not its
// path.
func (r *Receiver) localConfig(cfg guest.Config) (guest.Config, error) {
	cfg.Image = ""
	if guest.FillFile(cfg.Workload.Fill) != "" {
		// The fill file is read only by a booting guest; a received one
		// has its pages from the stream and must not open a sender's path.
		cfg.Workload.Fill = guest.FillFilePrefix
	}
	if cfg.Disk == "" {
		return cfg, nil
	}
	if r.DiskPath == "" {
		return cfg, ErrNoDiskPlace
	}
	cfg.Disk = r.DiskPath
	if err := fsperm.PrivateFile(r.DiskPath, r.log()); err != nil {
		return cfg, fmt.Errorf("replica: disk copy: %w", err)
	}
	return cfg, nil
}

// DefaultMaxMemory is the largest guest a Receiver builds unless told
// otherwise.
const DefaultMaxMemory = 1 << 40

func (r *Receiver) timeout() time.Duration {
	if r.Timeout > 0 {
		return r.Timeout
	}
	return DefaultIOTimeout
}

func (r *Receiver) log() *slog.Logger {
	if r.Log != nil {
		return r.Log
	}
	return slog.Default()
}

// connReader reads a data connection with a deadline: during the
// handshake one fixed deadline for the whole Hello (a sender trickling a
// byte at a time gains nothing), afterwards one renewed before every read
// (a sender that sends nothing for the timeout is gone).
type connReader struct {
	conn    net.Conn
	timeout time.Duration
	fixed   bool
}

func (cr *connReader) Read(p []byte) (int, error) {
	if !cr.fixed {
		cr.conn.SetReadDeadline(time.Now().Add(cr.timeout))
	}
	return cr.conn.Read(p)
}

// established is implemented by connections from a listener that caps
// the connections still in their handshake (netlimit): a connection
// whose Hello passed is no longer one of them.
type established interface{ Established() }

// markEstablished tells the capping listener under conn that its
// handshake is done: conn itself, or the connection under a TLS one
// (NetConn).
func markEstablished(conn net.Conn) {
	for conn != nil {
		if e, ok := conn.(established); ok {
			e.Established()
			return
		}
		u, ok := conn.(interface{ NetConn() net.Conn })
		if !ok {
			return
		}
		conn = u.NetConn()
	}
}

// handshake reads and checks the sender's Hello, all of it within the
// handshake timeout. It answers a refusal itself; the caller answers OK
// once it has what it needs. The Hello it returns carries the local
// configuration (localConfig): no path in it came from the sender.
func (r *Receiver) handshake(conn net.Conn, purpose string) (Hello, *bufio.Reader, error) {
	h, _, br, err := r.handshakeConn(conn, purpose)
	return h, br, err
}

// handshakeConn is handshake, also returning the reader under br (whose
// per-read deadline a caller may replace with one fixed deadline).
func (r *Receiver) handshakeConn(conn net.Conn, purpose string) (Hello, *connReader, *bufio.Reader, error) {
	cr := &connReader{conn: conn, timeout: r.timeout(), fixed: true}
	// Sized for a control line, not for the stream: the Reader reads
	// sections in chunks of its own.
	br := bufio.NewReaderSize(cr, 256<<10)
	conn.SetReadDeadline(time.Now().Add(r.handshakeTimeout()))
	var h Hello
	if err := readLine(br, &h); err != nil {
		if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
			return h, nil, nil, fmt.Errorf("%w: no complete handshake within %v", ErrProtocol, r.handshakeTimeout())
		}
		return h, nil, nil, err
	}
	cr.fixed = false
	if h.Purpose == PurposePostcopy && purpose == PurposeMigrate {
		markEstablished(conn)
		return h, nil, nil, r.postcopyChannel(conn, h, br.Buffered())
	}
	refuse := func(format string, a ...any) (Hello, *connReader, *bufio.Reader, error) {
		err := fmt.Errorf(format, a...)
		conn.SetWriteDeadline(time.Now().Add(r.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: err.Error(), Build: r.Build})
		return h, nil, nil, err
	}
	switch {
	case h.Proto != ProtoVersion:
		return refuse("data-channel protocol %d, this receiver speaks %d", h.Proto, ProtoVersion)
	case h.Purpose != purpose && !(h.Purpose == PurposeMoving && purpose == PurposeReplicate):
		return refuse("sender wants %q, this receiver takes %q", h.Purpose, purpose)
	case checkpoint.FormatVersion(h.MinReader) > checkpoint.Current:
		return refuse("stream format version %d needs a reader of version %d or later; this build reads %d to %d",
			h.Format, h.MinReader, checkpoint.MinReadable, checkpoint.Current)
	case checkpoint.FormatVersion(h.Format) < checkpoint.MinReadable:
		return refuse("stream format version %d is older than the oldest this build reads (%d)", h.Format, checkpoint.MinReadable)
	}
	cfg, err := r.checkGuest(h)
	if err != nil {
		return refuse("%w", err)
	}
	if err := r.checkSections(h); err != nil {
		return refuse("%w", err)
	}
	h.Config = cfg
	if r.Admit != nil {
		if err := r.Admit(h); err != nil {
			return refuse("%w", err)
		}
	}
	markEstablished(conn)
	return h, cr, br, nil
}

// replyOK accepts a sender of a kind guest; the reply says whether its
// device sections were checked (checkSections).
func (r *Receiver) replyOK(conn net.Conn, last uint64, kind string) error {
	conn.SetWriteDeadline(time.Now().Add(r.timeout()))
	_, checked := r.sections(kind)
	return writeLine(conn, HelloReply{OK: true, Build: r.Build, LastEpoch: last, SectionsChecked: checked})
}

// checkLayout refuses a stream whose header does not match the guest.
func checkLayout(h checkpoint.Header, kind string, g guest.Guest) error {
	if h.Kind != kind {
		return fmt.Errorf("%w: stream of a %q guest, handshake said %q", checkpoint.ErrCorrupt, h.Kind, kind)
	}
	if !slices.Equal(h.Regions, checkpoint.RegionsOf(g.Regions())) {
		return fmt.Errorf("%w: stream memory layout %v does not match the guest's %v", checkpoint.ErrCorrupt, h.Regions, checkpoint.RegionsOf(g.Regions()))
	}
	return nil
}

// MigrationResult is what a receiving end learns from a migration.
type MigrationResult struct {
	Guest     guest.Guest
	Hello     Hello
	Epochs    uint64
	Digest    string
	LoadTime  time.Duration
	ResumedAt time.Time
	// AwaitingCommit (two-phase, Hello.Commit): the guest is loaded and
	// paused, and neither the source's commit nor its abort arrived
	// (Why says what happened instead). The caller holds the guest and
	// resolves: Resume only once the source is known to have stopped for
	// good (it sent the commit), Close if the source resumed.
	AwaitingCommit bool
	Why            string
	FinalEpoch     uint64
	// Peer is the node the migration connection's certificate named (""
	// over plaintext): whoever the destination asks about the commit must
	// be that node, not whatever API address the stream claimed.
	Peer string
	// PostcopyChannel: the connection was a post-copy channel, handed to
	// Receiver.PostcopyConn (nothing else in the result is set).
	PostcopyChannel bool
}

// MigrationOptions are the hooks and bounds of ReceiveMigrationWith.
type MigrationOptions struct {
	// BeforeResume, if set, runs with the loaded guest still paused (the
	// caller connects the console there).
	BeforeResume func(guest.Guest, Hello) error
	// OnReady, if set, is told when a two-phase destination has answered
	// Ready and waits, paused, for the commit.
	OnReady func(guest.Guest, Hello)
	// CommitTimeout bounds the wait for the commit after Ready; 0 means
	// DefaultCommitTimeout.
	CommitTimeout time.Duration
	// OnDiscard, if set, is told before a guest that BeforeResume saw is
	// closed (the migration failed or was aborted after the load).
	OnDiscard func(guest.Guest)
	// Postcopy, if set, answers a source that asks for post-copy
	// (Hello.Postcopy), with the empty guest built: nil grants it (the
	// memory can be registered with userfaultfd), an error refuses it in
	// one line (HelloReply.PostcopyRefused). nil Postcopy refuses it.
	Postcopy func(guest.Guest, Hello) error
	// PostcopySwitch, if set, runs after BeforeResume when post-copy was
	// granted, with the final epoch's machine state (the switch-over
	// digest's part): the caller learns there whether the source
	// switched and sets up the page mover before the guest resumes. An
	// error fails the migration before Ready: the source resumes.
	PostcopySwitch func(g guest.Guest, h Hello, state guest.MachineState) error
	// HoldsOutput says the caller holds the output of a guest whose
	// Hello asked HoldOutput (and was granted post-copy) until the
	// source reports the migration completed; only then is the hold
	// granted (HelloReply.HoldOutput).
	HoldsOutput bool
}

// DefaultCommitTimeout is how long a destination waits on the connection
// for the source's commit after answering Ready.
const DefaultCommitTimeout = 10 * time.Second

// ErrMigrationAborted is a source that aborted the switch-over after the
// destination was ready: the source resumed its guest.
var ErrMigrationAborted = errors.New("the source aborted the switch-over and runs the guest")

// ReceiveMigration is ReceiveMigrationWith with only a BeforeResume hook.
func (r *Receiver) ReceiveMigration(ctx context.Context, conn net.Conn, beforeResume func(guest.Guest, Hello) error) (MigrationResult, error) {
	return r.ReceiveMigrationWith(ctx, conn, MigrationOptions{BeforeResume: beforeResume})
}

// ReceiveMigrationWith receives one live migration on conn: it builds an
// empty guest, commits the sender's epochs into it, and when an epoch
// with machine state commits, loads it and takes the switch-over digest.
//
// One-phase (an older source): it resumes the guest and acknowledges
// Final at once. Two-phase (Hello.Commit): it acknowledges Ready and
// waits, paused, for the source's control line: on commit it resumes
// and acknowledges Final; on abort it drops the guest and returns
// ErrMigrationAborted; with neither (the connection ends, the deadline
// passes) it returns the paused guest with AwaitingCommit set and no
// error, never resuming it by itself: the source may have resumed (its
// Ready never arrived) or stopped for good (its commit was lost), and
// only the caller can find out which.
//
// On any other error the half-built guest is closed and nothing runs.
func (r *Receiver) ReceiveMigrationWith(ctx context.Context, conn net.Conn, o MigrationOptions) (MigrationResult, error) {
	var res MigrationResult
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Now()) })
	defer stop()
	hello, cr, br, err := r.handshakeConn(conn, PurposeMigrate)
	if errors.Is(err, errPostcopyTaken) {
		res.PostcopyChannel = true
		return res, nil
	}
	if err != nil {
		return res, err
	}
	res.Hello = hello
	res.Peer, _ = trust.PeerName(conn)
	g, err := r.NewGuest(hello.Kind, hello.Config)
	if err != nil {
		conn.SetWriteDeadline(time.Now().Add(r.timeout()))
		writeLine(conn, HelloReply{OK: false, Error: err.Error(), Build: r.Build})
		return res, fmt.Errorf("build the %s guest: %w", hello.Kind, err)
	}
	// g is closed unless handed to the caller (ok); OnDiscard is told
	// first if BeforeResume has seen it (shown).
	ok, shown := false, false
	defer func() {
		if ok {
			return
		}
		if shown && o.OnDiscard != nil {
			o.OnDiscard(g)
		}
		g.Close()
	}()
	granted := r.grantPostcopy(hello, g, o)
	im, final, err := r.receiveEpochs(conn, br, hello, g, &res, granted)
	if err != nil {
		return res, err
	}
	t0 := time.Now()
	if _, _, err := im.Activate(); err != nil {
		return res, err
	}
	res.Digest = im.Digest().String()
	res.FinalEpoch = final
	if o.BeforeResume != nil {
		shown = true
		if err := o.BeforeResume(g, hello); err != nil {
			return res, err
		}
	}
	if granted.Postcopy && o.PostcopySwitch != nil {
		_, st, _ := im.LastCommit()
		if st == nil {
			return res, fmt.Errorf("%w: post-copy: the final epoch %d carried no state", ErrProtocol, final)
		}
		shown = true
		if err := o.PostcopySwitch(g, hello, *st); err != nil {
			return res, err
		}
	}
	res.LoadTime = time.Since(t0)
	if hello.Commit {
		held, err := r.awaitCommit(ctx, conn, cr, br, final, g, hello, o, &res)
		if err != nil || held {
			ok = held
			return res, err
		}
	}
	if _, err := g.Resume(); err != nil {
		return res, fmt.Errorf("resume the received guest: %w", err)
	}
	res.ResumedAt = time.Now()
	res.Guest = g
	ok = true
	r.confirmResumed(conn, final, hello, res)
	return res, nil
}

// receiveEpochs accepts the Hello, checks the stream's memory layout
// against g and commits the sender's epochs into an image of g until one
// with machine state commits: that image and the final epoch's number.
// Live epochs are acknowledged too: the sender measures its bandwidth and
// bounds its backlog by them.
func (r *Receiver) receiveEpochs(conn net.Conn, br *bufio.Reader, hello Hello, g guest.Guest, res *MigrationResult, pc HelloReply) (_ *Image, _ uint64, err error) {
	conn.SetWriteDeadline(time.Now().Add(r.timeout()))
	_, checked := r.sections(hello.Kind)
	reply := HelloReply{OK: true, Build: r.Build, SectionsChecked: checked, Postcopy: pc.Postcopy, PostcopyRefused: pc.PostcopyRefused, HoldOutput: pc.HoldOutput}
	if err := writeLine(conn, reply); err != nil {
		return nil, 0, err
	}
	rd, err := checkpoint.NewReader(br, r.Limits)
	if err != nil {
		return nil, 0, fmt.Errorf("stream from %s: %w", conn.RemoteAddr(), err)
	}
	if err := checkLayout(rd.Header(), hello.Kind, g); err != nil {
		return nil, 0, err
	}
	im := r.newImage(g, hello.Config)
	// g is fresh and closed on any error below (ReceiveMigrationWith):
	// its pages may skip staging (image_writethrough.go says why).
	im.WriteThrough()
	if pc.Postcopy {
		// The final epoch's state, for the post-copy digest (a
		// write-through image records the state and disk writes of a
		// commit, not its pages, which this needs not).
		im.Record()
	} else {
		// Not under post-copy: a page populated ahead and then missing at
		// the switch would have to be dropped again. Halted when the
		// stream ends; Activate waits for it, and so does a failure
		// here, before the caller closes the guest.
		im.populateAhead(hello.Resident)
		defer func() {
			if err != nil {
				im.stopAhead()
			} else {
				im.haltAhead()
			}
		}()
	}
	for {
		e, err := rd.ReadEpoch(im)
		if err != nil {
			im.Discard()
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("%w: stream ended before the guest's state arrived", checkpoint.ErrTruncated)
			}
			return nil, 0, fmt.Errorf("migration from %s: epoch %d: %w", conn.RemoteAddr(), im.Committed().Epoch+1, err)
		}
		res.Epochs++
		if im.Committed().Consistent {
			return im, e.Epoch, nil
		}
		conn.SetWriteDeadline(time.Now().Add(r.timeout()))
		if err := writeLine(conn, precopy.Ack{Epoch: e.Epoch}); err != nil {
			return nil, 0, fmt.Errorf("acknowledge epoch %d: %w", e.Epoch, err)
		}
	}
}

// awaitCommit is the two-phase switch-over's destination side: it
// acknowledges Ready for the loaded final epoch and waits for the source's
// word. It returns (false, nil) on commit (resume now), an error wrapping
// ErrMigrationAborted on abort, and held=true, with the paused guest in
// res and AwaitingCommit set, when no word came.
func (r *Receiver) awaitCommit(ctx context.Context, conn net.Conn, cr *connReader, br *bufio.Reader, epoch uint64, g guest.Guest, hello Hello, o MigrationOptions, res *MigrationResult) (held bool, err error) {
	conn.SetWriteDeadline(time.Now().Add(r.timeout()))
	if err := writeLine(conn, precopy.Ack{Epoch: epoch, Digest: res.Digest, Ready: true, LoadTime: res.LoadTime}); err != nil {
		return false, fmt.Errorf("acknowledge the final epoch %d: %w", epoch, err)
	}
	if o.OnReady != nil {
		o.OnReady(g, hello)
	}
	c, cerr := waitControl(ctx, conn, cr, br, epoch, o.CommitTimeout)
	switch {
	case cerr == nil && c.Migrate == ControlAbort:
		return false, fmt.Errorf("%w: %s", ErrMigrationAborted, c.Reason)
	case cerr != nil:
		// Not a word: the guest stays paused, held for the caller to
		// resolve.
		res.Guest, res.AwaitingCommit = g, true
		res.Why = fmt.Sprintf("no commit from the source after the final epoch %d: %v", epoch, cerr)
		return true, nil
	}
	return false, nil
}

// waitControl waits (up to timeout; 0: DefaultCommitTimeout) for the
// source's control line after the final epoch: one fixed read deadline
// replaces cr's per-read one (which would cut a commit timeout longer
// than the I/O timeout short), and ctx's end cuts the read. On any
// failure the connection is closed.
func waitControl(ctx context.Context, conn net.Conn, cr *connReader, br *bufio.Reader, epoch uint64, timeout time.Duration) (Control, error) {
	if timeout <= 0 {
		timeout = DefaultCommitTimeout
	}
	cr.fixed = true
	conn.SetReadDeadline(time.Now().Add(timeout))
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })
	defer stop()
	var c Control
	err := readControl(br, &c, epoch)
	if err == nil {
		return c, nil
	}
	conn.Close()
	if ctx.Err() != nil {
		return c, ctx.Err()
	}
	if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		return c, fmt.Errorf("nothing within %v", timeout)
	}
	return c, err
}

// confirmResumed sends the Final acknowledgement of a resumed guest; a
// failure is logged (the guest runs here whatever the source learns).
func (r *Receiver) confirmResumed(conn net.Conn, epoch uint64, hello Hello, res MigrationResult) {
	conn.SetWriteDeadline(time.Now().Add(r.timeout()))
	err := writeLine(conn, precopy.Ack{Epoch: epoch, Digest: res.Digest, Final: true, LoadTime: res.LoadTime, ResumedAt: res.ResumedAt})
	switch {
	case err == nil:
	case hello.Commit:
		// The source committed before this: it stays stopped and
		// reports an unconfirmed outcome. One runner.
		r.log().Warn("migration: guest resumed on the source's commit; the confirmation could not be sent", "err", err)
	default:
		// An older source learns of it by the missing ack and resumes
		// its own copy: the split brain the one-phase switch-over
		// cannot rule out. Say so.
		r.log().Error("migration: guest resumed but the acknowledgement could not be sent; the (older, one-phase) source may resume too", "err", err)
	}
}

// checkGuest checks what a Hello says of the guest against this receiver
// (kind, configuration, memory bound; the stream's format is checked by
// its own header) and
// returns the configuration as this node builds it (its own paths). A
// Hello from the network and one read back from a stored image both pass
// through it.
func (r *Receiver) checkGuest(h Hello) (guest.Config, error) {
	if r.Kind != "" && h.Kind != r.Kind {
		return guest.Config{}, fmt.Errorf("guest kind %q, this receiver runs %q guests", h.Kind, r.Kind)
	}
	if err := h.Config.Validate(); err != nil {
		return guest.Config{}, fmt.Errorf("guest config: %v", err)
	}
	maxMem := r.MaxMemory
	if maxMem == 0 {
		maxMem = DefaultMaxMemory
	}
	if h.Config.Memory > maxMem {
		return guest.Config{}, fmt.Errorf("guest of %s is larger than this receiver takes (%s)", guest.FormatSize(h.Config.Memory), guest.FormatSize(maxMem))
	}
	return r.localConfig(h.Config)
}

// readControl reads the source's control line after the final epoch.
func readControl(br *bufio.Reader, c *Control, epoch uint64) error {
	if err := readLine(br, c); err != nil {
		return err
	}
	switch {
	case c.Migrate != ControlCommit && c.Migrate != ControlAbort:
		return fmt.Errorf("%w: control %q", ErrProtocol, c.Migrate)
	case c.Epoch != epoch:
		return fmt.Errorf("%w: %s of epoch %d, the final epoch was %d", ErrProtocol, c.Migrate, c.Epoch, epoch)
	}
	return nil
}
