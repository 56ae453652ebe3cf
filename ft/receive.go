package ft

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/postcopy"
	"github.com/tandemvm/tandem/precopy"
	"github.com/tandemvm/tandem/replica"
)

// RestoreFile makes the snapshot at path the node's guest and resumes it.
func (n *Node) RestoreFile(r *replica.Receiver, path string) error {
	res, err := r.RestoreFile(path)
	if err != nil {
		return err
	}
	n.Attach(res.Guest, res.Hello.Config)
	if _, err := res.Guest.Resume(); err != nil {
		return fmt.Errorf("resume the restored guest: %w", err)
	}
	n.net.announce(guest.NICOf(res.Guest))
	n.mu.Lock()
	n.inbound, n.state = &res, "running"
	n.mu.Unlock()
	n.log.Info("snapshot restored; guest running", "path", path, "epochs", res.Epochs, "digest", res.Digest)
	return nil
}

// ReceiverConfig is what a node waiting for one migration needs.
type ReceiverConfig struct {
	// Listener is the data address migrations arrive on; ReceiveMigrations
	// closes it.
	Listener net.Listener
	Receiver *replica.Receiver
	// CommitTimeout: after answering ready, how long to wait on the
	// connection for the source's commit before asking its API.
	CommitTimeout time.Duration
	// NoPostcopy refuses every source's switch to post-copy (the
	// operator's choice, --postcopy=false): migrations stay precopy-only.
	NoPostcopy bool
}

// ReceiveMigrations serves POST /migrate/commit and /migrate/abort, starts
// the API and receives one migration on cfg.Listener until ctx ends or
// POST /quit. Every connection is handshaken on its own goroutine (TLS
// first, then the Hello), so a peer that connects and says nothing holds
// up no one (both have a deadline); the first Hello that passes takes the
// one migration this process receives, later ones are told it is busy. A
// migration that fails or is aborted frees the receiver for the next one.
// It returns once its goroutines are gone (bounded), the node still open.
func (n *Node) ReceiveMigrations(ctx context.Context, cfg ReceiverConfig) {
	ln, log := cfg.Listener, n.log
	n.api.HandleFunc("POST /migrate/commit", n.handleMigrateResolve(true))
	n.api.HandleFunc("POST /migrate/abort", n.handleMigrateResolve(false))
	n.api.HandleFunc("POST /migrate/abandon", n.handleMigrateAbandon)
	pc := &pcInbound{log: log, apiAddr: n.api.Addr()}
	n.api.reg.MustRegister(pc.collectors()...)
	n.mu.Lock()
	n.pcIn = pc
	n.mu.Unlock()
	n.Start()
	log.Info("waiting for a migration", "listen", ln.Addr().String(), "api", n.api.Addr(), "tls", n.trust.TLSOn())
	rctx, cancel := context.WithCancel(context.Background())
	var busy atomic.Bool
	var wg sync.WaitGroup
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				n.receiveOne(rctx, conn, ln, cfg, &busy)
			}()
		}
	}()
	n.Wait(ctx)
	// Stop receiving before the guest is closed: a migration in flight
	// closes its own half-built guest, one awaiting its commit leaves it
	// to Close.
	cancel()
	ln.Close()
	joinWithin(func() { <-done; wg.Wait() }, 5*time.Second, log, "the receiving goroutines")
	pc.abort()
}

// receiveOne takes one migration connection: the handshake, the stream,
// and the commit (or the wait for it).
func (n *Node) receiveOne(ctx context.Context, conn net.Conn, ln net.Listener, cfg ReceiverConfig, busy *atomic.Bool) {
	log := n.log
	keep := false // a post-copy channel is the pcInbound's to close
	defer func() {
		if !keep {
			conn.Close()
		}
	}()
	if err := trust.Handshake(conn, handshakeTimeout); err != nil {
		log.Warn("migration connection refused: TLS handshake", "from", conn.RemoteAddr().String(), "err", err)
		return
	}
	admitted := false
	rc := *cfg.Receiver
	rc.Admit = func(replica.Hello) error {
		if !busy.CompareAndSwap(false, true) {
			return errors.New("this receiver is already receiving a migration")
		}
		admitted = true
		n.SetState("receiving")
		return nil
	}
	rc.PostcopyConn = n.pcIn.take
	free := func() {
		if admitted {
			n.pcIn.abort()
			n.SetState("waiting")
			busy.Store(false)
		}
	}
	res, err := rc.ReceiveMigrationWith(ctx, conn, n.migrationOptions(cfg))
	if res.PostcopyChannel && err == nil {
		keep = true
		return
	}
	if err != nil {
		free()
		log.Error("migration refused, failed or aborted; still waiting", "from", conn.RemoteAddr().String(), "err", err)
		return
	}
	if res.AwaitingCommit {
		conn.Close()
		if !n.awaitCommit(ctx, &res) {
			free() // aborted: the source runs the guest
			return
		}
		// No more migrations: the guest runs here now. The listener
		// stays open while post-copy runs, for the source's resume
		// channels after a lost link (a new migration is refused: busy).
		n.pcIn.finish(ctx)
		ln.Close()
		n.releaseWhenMoved(ctx, &res)
		return
	}
	// The guest runs here now: the segment must learn that its address
	// lives behind this node's device, or clients' frames keep going to
	// the source's until the bridge forgets it (a held guest's card
	// announces itself at the release).
	n.announceOrDefer(guest.NICOf(res.Guest))
	n.mu.Lock()
	n.cfg = res.Hello.Config
	n.inbound, n.state, n.stateReason = &res, "running", ""
	n.mu.Unlock()
	log.Info("migration received; guest running", "from", conn.RemoteAddr().String(),
		"epochs", res.Epochs, "digest", res.Digest, "load", res.LoadTime.String())
	// No more migrations: the guest runs here now (the listener stays
	// open while post-copy runs, for a resume's channels).
	n.pcIn.finish(ctx)
	ln.Close()
	n.releaseWhenMoved(ctx, &res)
	// Drain the end of the stream, then close.
	conn.SetReadDeadline(time.Now().Add(2 * time.Second))
	var b [512]byte
	for {
		if _, err := conn.Read(b[:]); err != nil {
			break
		}
	}
}

// migrationOptions are the hooks of a received migration: the guest is
// attached before it resumes; post-copy is granted where the guest's
// memory can be registered (and the operator did not turn it off), its
// switch handled by the node's pcInbound.
func (n *Node) migrationOptions(cfg ReceiverConfig) replica.MigrationOptions {
	return replica.MigrationOptions{
		BeforeResume: func(g guest.Guest, h replica.Hello) error {
			n.Attach(g, h.Config)
			if h.HoldOutput {
				// Promised in the handshake: a guest whose output
				// cannot be held does not run here at all.
				if !n.pcIn.granted(h.MigrationID) {
					return fmt.Errorf("migration %s asked for the guest's output held, but its post-copy grant is gone: not resuming it unheld", h.MigrationID)
				}
				n.holdOutput(g, h)
			}
			return nil
		},
		OnReady: func(guest.Guest, replica.Hello) {
			n.setStateWhy("awaiting-commit", "the final epoch is loaded; waiting for the source's commit")
		},
		HoldsOutput: true,
		OnDiscard: func(guest.Guest) {
			n.dropHold()
			n.pcIn.abort()
			n.detach()
		},
		CommitTimeout: cfg.CommitTimeout,
		Postcopy: func(g guest.Guest, h replica.Hello) error {
			if cfg.NoPostcopy {
				return errors.New("post-copy is off on this receiver (--postcopy=false)")
			}
			if err := postcopy.Available(g.Regions()); err != nil {
				return err
			}
			n.pcIn.grant(h.MigrationID)
			return nil
		},
		PostcopySwitch: n.pcIn.start,
	}
}

func (n *Node) setStateWhy(s, why string) {
	n.mu.Lock()
	n.state, n.stateReason = s, why
	n.mu.Unlock()
}

// detach forgets a guest that is about to be closed (a migration that
// failed or was aborted after the load).
func (n *Node) detach() {
	n.lockIdle()
	n.g, n.state, n.stateReason = nil, "waiting", ""
	n.mu.Unlock()
	n.exits.follow(nil, nil)
}

// pendingCommit is a destination holding a loaded, paused guest whose
// source's commit never arrived.
type pendingCommit struct {
	res    *replica.MigrationResult
	decide chan bool // true: resume here; false: drop (the source runs it)
	// decided (under Node.mu) says the outcome is chosen: by an API
	// request (sent on decide, under the same lock) or by the source.
	decided bool
}

// awaitCommit holds a migrated guest, paused, until it is known how the
// migration ended at the source: its API says it committed (the guest
// runs here) or failed (it resumed there: the guest here is dropped), or
// an operator decides (POST /migrate/commit or /migrate/abort). It never
// resumes the guest on a guess. It returns true if the guest runs here.
func (n *Node) awaitCommit(ctx context.Context, res *replica.MigrationResult) bool {
	p := &pendingCommit{res: res, decide: make(chan bool, 1)}
	why := res.Why + "; asking the source's API " + cmp.Or(res.Hello.SourceAPI, "(none given)") +
		"; resolve by hand with POST /migrate/commit (only once the source is stopped) or POST /migrate/abort"
	n.mu.Lock()
	n.cfg = res.Hello.Config
	n.pending, n.state, n.stateReason = p, "awaiting-commit", why
	n.mu.Unlock()
	n.log.Warn("AWAITING COMMIT: the guest is loaded and paused; it resumes only once the source is known to have stopped", "why", why)
	src := n.sourceClient(res)
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	var commit bool
	lastSeen := ""
wait:
	for {
		select {
		case <-ctx.Done():
			return false // stopping: n.close closes the held guest
		case commit = <-p.decide:
			break wait
		case <-tick.C:
		}
		v, detail := sourceVerdict(ctx, src, res.Hello)
		if detail != lastSeen {
			n.log.Info("awaiting commit: the source says", "verdict", v, "detail", detail)
			lastSeen = detail
		}
		switch v {
		case verdictCommitted:
			commit = true
			break wait
		case verdictAborted:
			commit = false
			break wait
		}
	}
	n.mu.Lock()
	if p.decided {
		// An API request decided first; it was checked against the
		// source's word when it was made.
		select {
		case commit = <-p.decide:
		default:
		}
	}
	p.decided, n.pending = true, nil
	n.mu.Unlock()
	if !commit {
		n.detach()
		res.Guest.Close()
		n.log.Warn("migration aborted: the paused guest is dropped; the source runs it")
		return false
	}
	if _, err := res.Guest.Resume(); err != nil {
		n.setStateWhy("awaiting-commit", "resume failed: "+err.Error())
		n.log.Error("resume after the commit", "err", err)
		return true
	}
	res.ResumedAt = time.Now()
	n.announceOrDefer(guest.NICOf(res.Guest))
	n.mu.Lock()
	n.inbound, n.state, n.stateReason = res, "running", ""
	n.mu.Unlock()
	n.log.Info("migration committed: guest running", "epochs", res.Epochs, "digest", res.Digest)
	return true
}

// Verdicts of a source on a migration a destination holds paused.
const (
	verdictCommitted = "committed" // the source stopped for good and sent the commit
	verdictAborted   = "aborted"   // the source resumed the guest
	verdictUnknown   = "unknown"   // still deciding, unreachable, or another migration
)

// sourceClient is the client a destination asks its source with: the API
// address the source gave, reached with this node's identity, and (with
// TLS) only if that API's certificate names the node that sent the
// migration, so a stream cannot point the destination at a third party
// that would answer "committed". nil: the source gave no API.
func (n *Node) sourceClient(res *replica.MigrationResult) *api.Client {
	if res.Hello.SourceAPI == "" {
		return nil
	}
	return api.NewClient(res.Hello.SourceAPI, n.trust.ID.ClientTLS(res.Peer), 2*time.Second)
}

// sourceVerdict asks the source's API (c) how migration h ended there.
func sourceVerdict(ctx context.Context, c *api.Client, h replica.Hello) (string, string) {
	if c == nil || h.MigrationID == "" {
		return verdictUnknown, "the source gave no API to ask"
	}
	st, err := c.Status(ctx, false)
	if err != nil {
		return verdictUnknown, "source unreachable: " + err.Error()
	}
	switch {
	case st.MigrationID != h.MigrationID:
		return verdictUnknown, fmt.Sprintf("the source reports migration %q, not %q (restarted?); state %s", st.MigrationID, h.MigrationID, st.State)
	case st.CommitSent || st.Status == precopy.StatusCompleted || st.Status == precopy.StatusUnknown:
		return verdictCommitted, "the source stopped its guest for good and sent the commit (status " + st.Status + ")"
	case st.Status == precopy.StatusFailed:
		return verdictAborted, "the source's migration failed and its guest runs there"
	}
	return verdictUnknown, "the source is still deciding (status " + st.Status + ")"
}

// handleMigrateResolve is POST /migrate/commit (commit true) and POST
// /migrate/abort on a destination awaiting a commit. The source's API is
// asked first; an answer that contradicts the request is refused, and
// without an answer {"force": true} is needed: committing while the
// source runs is the split brain this protocol exists to prevent, and
// aborting while the source is stopped loses the guest.
func (n *Node) handleMigrateResolve(commit bool) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		force, ok := readForce(w, r)
		if !ok {
			return
		}
		n.mu.Lock()
		p := n.pending
		n.mu.Unlock()
		if p == nil && n.resolveHold(w, r, commit, force) {
			return
		}
		if p == nil {
			WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("no migration awaits a commit here"))
			return
		}
		// Asked on every request: sourceClient builds a client per call,
		// and a request is rare (an operator resolving by hand).
		v, detail := sourceVerdict(r.Context(), n.sourceClient(p.res), p.res.Hello)
		switch {
		case commit && v == verdictAborted:
			WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("refusing to commit: %s; POST /migrate/abort drops the copy here", detail))
			return
		case !commit && v == verdictCommitted:
			WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("refusing to abort: %s, so this is the only copy; POST /migrate/commit resumes it", detail))
			return
		case v == verdictUnknown && !force:
			WriteError(w, http.StatusConflict, api.CodeRefused, fmt.Errorf("cannot confirm with the source: %s; check by hand, then repeat with {\"force\": true}", detail))
			return
		case v == verdictUnknown:
			n.log.Error("FORCED migration resolution without the source's word", "commit", commit, "detail", detail)
		}
		n.mu.Lock()
		taken := n.pending == p && !p.decided
		if taken {
			p.decided = true
			p.decide <- commit // capacity 1, and only the one who sets decided sends
		}
		n.mu.Unlock()
		if !taken {
			WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("the migration was resolved meanwhile (by the source's word or another request); see GET /status"))
			return
		}
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "commit": commit, "source": detail})
	}
}
