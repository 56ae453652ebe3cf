package ft

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"sync"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/version"
	"github.com/tandemvm/tandem/replica"
)

// startEpochs protects n's guest with an epoch loop (not yet pointed at a
// secondary) and returns it running.
func startEpochs(n *Node, g guest.Guest, cfg guest.Config, ef EpochSettings, allow func() bool) (*failover.EpochLoop, context.CancelFunc) {
	loop := failover.NewEpochLoop(failover.EpochConfig{
		Guest: g, Config: cfg, Interval: ef.Interval, FlushBudget: ef.FlushBudget, MaxInFlight: ef.MaxInFlight,
		Verify: ef.Verify, VerifySlicePages: ef.VerifySlicePages, Build: version.Build(), Timings: n.api.timings, Log: n.log,
		Release: n.console.release, Allow: allow, AckTimeout: ef.AckTimeout,
		OnFenced: n.fenced,
		TLS:      n.trust.ID, SecondaryName: func(string) string { return n.secondaryName() },
	})
	n.observeDisk(g)
	ctx, cancel := context.WithCancel(context.Background())
	n.lockIdle()
	n.g, n.cfg, n.epochs = g, cfg, loop
	n.mu.Unlock()
	n.users.Add(1)
	go func() {
		defer n.users.Done()
		loop.Run(ctx)
	}()
	return loop, cancel
}

// PairPrimaryConfig configures the primary of a pair without raft.
type PairPrimaryConfig struct {
	Node NodeConfig
	// Guest is the booted guest (not yet run), of GuestConfig.
	Guest       guest.Guest
	GuestConfig guest.Config
	// Secondary is the secondary's data address ("": unprotected until
	// POST /protect names one); SecondaryName, with TLS, the node its
	// certificate must name ("": any certificate of the CA).
	Secondary, SecondaryName string
	Epochs                   EpochSettings
}

// RunPairPrimary runs cfg.Guest protected by a secondary until ctx ends
// or POST /quit; it closes the guest.
func RunPairPrimary(ctx context.Context, cfg PairPrimaryConfig) error {
	g := cfg.Guest
	n, err := NewNode(cfg.Node)
	if err != nil {
		g.Close()
		return err
	}
	n.secName = cfg.SecondaryName
	n.Start()
	loop, cancel := startEpochs(n, g, cfg.GuestConfig, cfg.Epochs, nil)
	n.mu.Lock()
	n.cancel = cancel
	n.mu.Unlock()
	if _, err := g.Resume(); err != nil {
		n.Close()
		return fmt.Errorf("start the guest: %w", err)
	}
	n.SetState("running")
	loop.SetSecondary(cfg.Secondary)
	n.log.Info("primary running", "kind", g.Kind(), "secondary", cfg.Secondary, "epoch", cfg.Epochs.Interval, "api", n.APIAddr(), "console", n.ConsoleAddr(), "tls", n.trust.TLSOn())
	n.Wait(ctx)
	n.Close()
	return nil
}

// fenced is a pair primary told by its secondary that the secondary was
// activated: the loop has stopped releasing and paused the guest; the
// node says so and turns its console clients away.
func (n *Node) fenced(why string) {
	n.mu.Lock()
	n.state, n.stateReason = "fenced", why
	n.mu.Unlock()
	n.console.dropAll()
	n.log.Error("FENCED: the guest is paused for good and nothing it says leaves this node; restart it as a secondary of the new primary", "why", why)
}

// DefaultFailureTimeout is how recently a pair secondary may have heard
// its primary and still be activated without --force.
const DefaultFailureTimeout = 2 * time.Second

// activationRefusal says why a pair secondary must not activate now, or
// "" if it may: its primary is connected and was heard within timeout,
// so it is alive, and activating would run the guest twice (each side
// acknowledging writes the other never sees).
func activationRefusal(from string, connected bool, lastHeard, now time.Time, timeout time.Duration) string {
	if !connected || lastHeard.IsZero() {
		return ""
	}
	ago := now.Sub(lastHeard)
	if ago >= timeout {
		return ""
	}
	return fmt.Sprintf("refusing to activate: the primary %s was last heard %v ago (failure timeout %v), so it is alive and both would run the guest; stop it first, or pass --force",
		from, ago.Round(time.Millisecond), timeout)
}

// PairSecondaryConfig configures the secondary of a pair without raft.
type PairSecondaryConfig struct {
	Node NodeConfig
	// DataAddr is where the primary streams epochs to.
	DataAddr string
	// DataDir, if set, keeps the committed image (DataDir/image) across
	// restarts (created, private, if missing).
	DataDir  string
	Receiver *replica.Receiver
	// PrimaryName, with TLS, is the node the primary's certificate must
	// name ("": any certificate of the CA).
	PrimaryName string
	// FailureTimeout: POST /activate refuses (without force) while the
	// primary was heard within this long.
	FailureTimeout time.Duration
	// Epochs protects the guest once activated.
	Epochs EpochSettings
}

// RunPairSecondary keeps a committed replica of a pair primary's guest,
// activated by POST /activate, until ctx ends or POST /quit.
func RunPairSecondary(ctx context.Context, cfg PairSecondaryConfig) error {
	log := cfg.Node.Log
	sec := replica.NewSecondary(cfg.Receiver, nil)
	// Load a kept image before the API answers, so the first status a
	// caller sees already says where this secondary stands.
	if cfg.DataDir != "" {
		if err := fsperm.PrivateDir(cfg.DataDir, log); err != nil {
			return fmt.Errorf("--data-dir: %w", err)
		}
		store, err := replica.OpenStore(filepath.Join(cfg.DataDir, "image"), log)
		if err != nil {
			return err
		}
		sec.Store = store
		if c, ok, err := sec.LoadStored(); err != nil {
			log.Warn("stored image unusable; waiting for a full sync", "err", err)
		} else if ok {
			log.Info("restarted at the last committed epoch on disk", "epoch", c.Epoch)
		}
	}
	n, err := NewNode(cfg.Node)
	if err != nil {
		sec.Close()
		return err
	}
	n.mu.Lock()
	n.sec = sec
	n.state = "standby"
	n.mu.Unlock()
	ln, err := cfg.Node.Trust.Listen(log, "--data", cfg.DataAddr, "data", netlimit.DataCap)
	if err != nil {
		n.Close()
		return err
	}
	sctx, cancel := context.WithCancel(context.Background())
	// In a pair the primary is whoever holds a certificate of the CA, or
	// the node PrimaryName says.
	checkPrimary := func(conn net.Conn) error {
		if cfg.PrimaryName == "" {
			return nil
		}
		return trust.CheckPeer(conn, cfg.PrimaryName)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		serveSecondary(sctx, ln, func() *replica.Secondary { return sec }, checkPrimary, log)
	}()
	n.api.HandleFunc("POST /activate", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Force bool `json:"force"`
		}
		if r.ContentLength != 0 {
			if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
				WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"force\": BOOL}: %v", err))
				return
			}
		}
		if why := checkPrimaryGone(sec, cfg.FailureTimeout); why != "" {
			if !req.Force {
				WriteError(w, http.StatusConflict, api.CodeRefused, errors.New(why))
				return
			}
			log.Error("FORCED ACTIVATION while the primary is alive: both may run the guest until it hears of this activation and fences itself (it does at once if its data link still works)",
				"detail", why)
		}
		epoch, err := activate(n, sec, cfg.Epochs)
		if err != nil {
			WriteError(w, http.StatusConflict, api.CodeInternal, err)
			return
		}
		// The data port stays open: a primary that was cut off while
		// this node was activated joins again once the link heals, and
		// the refusal it gets (activated) fences it.
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "role": "primary", "activated_epoch": epoch})
	})
	n.Start()
	log.Info("secondary waiting for a primary", "data", ln.Addr().String(), "api", n.APIAddr(), "tls", n.trust.TLSOn())
	n.Wait(ctx)
	n.Close()
	cancel()
	ln.Close()
	joinWithin(func() { <-served }, serveJoinTimeout, log, "data connections")
	sec.Close()
	return nil
}

// serveJoinTimeout bounds how long a stopping node waits for its data
// connections' goroutines (serveSecondary) once their context has ended.
const serveJoinTimeout = 5 * time.Second

// checkPrimaryGone is activationRefusal on a secondary's view now, after
// a short grace: a primary that was just killed has closed its
// connection, but the secondary may not have read the end yet.
func checkPrimaryGone(sec *replica.Secondary, timeout time.Duration) string {
	grace := time.Now().Add(min(timeout, 500*time.Millisecond))
	for {
		from, connected, heard := sec.PrimaryContact()
		why := activationRefusal(from, connected, heard, time.Now(), timeout)
		if why == "" || time.Now().After(grace) {
			return why
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// serveSecondary hands each primary connection to the current Secondary
// (which serves one at a time, ending the one before); with none, the
// connection is closed at once. Over TLS a connection must first complete
// its handshake within handshakeTimeout and pass checkPeer (the node its
// certificate names) before a byte of it is read: a refused one never
// reaches the Secondary, so it cannot end the legitimate stream.
//
// It owns a goroutine per connection: ctx's end closes every connection,
// and serveSecondary returns only once ln is closed and those goroutines
// are gone (each is bounded: the handshake by handshakeTimeout, checkPeer
// by its own wait, the stream by ctx).
func serveSecondary(ctx context.Context, ln net.Listener, current func() *replica.Secondary, checkPeer func(net.Conn) error, log *slog.Logger) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer conn.Close()
			stop := context.AfterFunc(ctx, func() { conn.Close() })
			defer stop()
			if err := trust.Handshake(conn, handshakeTimeout); err != nil {
				log.Warn("data connection refused: TLS handshake", "from", conn.RemoteAddr().String(), "err", err)
				return
			}
			if checkPeer != nil {
				if err := checkPeer(conn); err != nil {
					log.Warn("data connection refused", "from", conn.RemoteAddr().String(), "err", err)
					return
				}
			}
			sec := current()
			if sec == nil {
				return
			}
			err := sec.Serve(ctx, conn)
			if ctx.Err() == nil && !errors.Is(err, replica.ErrActivated) {
				log.Warn("primary connection ended", "from", conn.RemoteAddr().String(), "err", err)
			}
		}()
	}
}

// activate resumes the secondary's guest from its last committed epoch,
// serves its console and protects it with an epoch loop (unprotected until
// a secondary is given).
func activate(n *Node, sec *replica.Secondary, ef EpochSettings) (uint64, error) {
	t0 := time.Now()
	g, h, c, err := sec.Activate()
	if err != nil {
		return 0, fmt.Errorf("activate: %w", err)
	}
	_, cancel := startEpochs(n, g, h.Config, ef, nil)
	n.mu.Lock()
	n.role, n.cancel, n.sec = "primary", cancel, nil
	n.mu.Unlock()
	if _, err := g.Resume(); err != nil {
		return c.Epoch, fmt.Errorf("activate: resume: %w", err)
	}
	n.SetState("running")
	n.log.Info("activated: guest resumed from the last committed epoch", "epoch", c.Epoch, "took", time.Since(t0).String())
	return c.Epoch, nil
}

// secondaryName is the node a pair primary's secondary must be.
func (n *Node) secondaryName() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.secName
}

// handleProtect points the epoch loop of a primary without raft at a new
// secondary (after an activation, say): POST /protect {"secondary": ADDR,
// "name": NODE}; with TLS, name (if given) is the node the secondary's
// certificate must name from now on (without it, the name given before
// still applies).
func (n *Node) handleProtect(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Secondary string `json:"secondary"`
		Name      string `json:"name"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"secondary\": \"HOST:PORT\"}: %v", err))
		return
	}
	if _, _, err := net.SplitHostPort(req.Secondary); err != nil && req.Secondary != "" {
		WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("secondary %q: want HOST:PORT", req.Secondary))
		return
	}
	n.mu.Lock()
	loop, clustered := n.epochs, n.cluster != nil
	n.mu.Unlock()
	fenced := false
	if loop != nil {
		fenced, _ = loop.Fenced()
	}
	switch {
	case fenced:
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("this primary is fenced: its secondary was activated and runs the guest"))
	case clustered:
		WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("this node is in a raft cluster: its secondary is found through raft"))
	case loop == nil:
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not a primary"))
	default:
		// Without a name the one given before (--secondary-name or an
		// earlier protect) still applies: a check is never dropped by
		// leaving it out.
		n.mu.Lock()
		if req.Name != "" {
			n.secName = req.Name
		}
		name := n.secName
		n.mu.Unlock()
		loop.SetSecondary(req.Secondary)
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "secondary": req.Secondary, "name": name})
	}
}
