package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
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

func init() {
	register("primary", "run a guest protected by a secondary (epochs, output commit)", cmdPrimary)
	register("secondary", "keep a committed replica of a primary's guest, ready to activate", cmdSecondary)
	register("activate", "resume a secondary's guest from its last committed epoch", cmdActivate)
	register("protect", "point a primary without raft at a (new) secondary", cmdProtect)
}

// epochFlags are the protection flags of `tandem primary`.
type epochFlags struct {
	epoch       time.Duration
	flushBudget time.Duration
	verify      bool
	verifySlice uint64
	inFlight    int
	ackTimeout  time.Duration
}

func addEpochFlags(fs interface {
	DurationVar(*time.Duration, string, time.Duration, string)
	BoolVar(*bool, string, bool, string)
	IntVar(*int, string, int, string)
	Var(flag.Value, string, string)
}, ef *epochFlags) {
	fs.DurationVar(&ef.epoch, "epoch", 25*time.Millisecond, "epoch interval")
	fs.DurationVar(&ef.flushBudget, "flush-budget", 5*time.Millisecond, "longest disk flush at an epoch pause before the capture is abandoned")
	fs.BoolVar(&ef.verify, "verify-epochs", true, "prove every epoch: compare the primary's digest of what it shipped with the secondary's, and re-read a slice of memory at each pause (--verify-epochs=false turns it off)")
	ef.verifySlice = failover.DefaultVerifySlicePages * guest.PageSize
	fs.Var(sizeFlag{&ef.verifySlice}, "verify-slice", "memory re-read at each pause to catch writes the dirty log missed; every page is covered every memory/slice epochs")
	fs.IntVar(&ef.inFlight, "max-in-flight", 4, "epochs shipped but not yet acknowledged before the primary waits")
	fs.DurationVar(&ef.ackTimeout, "ack-timeout", failover.DefaultAckTimeout, "no acknowledgement progress from the secondary this long while epochs are outstanding: drop the link and retry")
}

func (ef epochFlags) validate() error {
	switch {
	case ef.epoch < time.Millisecond || ef.epoch > time.Minute:
		return usagef("--epoch %v: want 1ms to 1m", ef.epoch)
	case ef.flushBudget <= 0:
		return usagef("--flush-budget %v: want a positive duration", ef.flushBudget)
	case ef.verifySlice < guest.PageSize || ef.verifySlice%guest.PageSize != 0 || ef.verifySlice > 1<<30:
		return usagef("--verify-slice %d: want a multiple of 4KiB from 4KiB to 1GiB", ef.verifySlice)
	case ef.inFlight < 1 || ef.inFlight > 1024:
		return usagef("--max-in-flight %d: want 1 to 1024", ef.inFlight)
	case ef.ackTimeout < 100*time.Millisecond || ef.ackTimeout > time.Hour:
		return usagef("--ack-timeout %v: want 100ms to 1h", ef.ackTimeout)
	}
	return nil
}

// slicePages is --verify-slice in pages.
func (ef epochFlags) slicePages() int { return int(ef.verifySlice / guest.PageSize) }

// startEpochs protects n's guest with an epoch loop (not yet pointed at a
// secondary) and returns it running.
func startEpochs(n *guestNode, g guest.Guest, cfg guest.Config, ef epochFlags, allow func() bool) (*failover.EpochLoop, context.CancelFunc) {
	loop := failover.NewEpochLoop(failover.EpochConfig{
		Guest: g, Config: cfg, Interval: ef.epoch, FlushBudget: ef.flushBudget, MaxInFlight: ef.inFlight,
		Verify: ef.verify, VerifySlicePages: ef.slicePages(), Build: version.Build(), Timings: n.api.timings, Log: n.log,
		Release: n.console.release, Allow: allow, AckTimeout: ef.ackTimeout,
		OnFenced: n.fenced,
		TLS:      n.trust.id, SecondaryName: func(string) string { return n.secondaryName() },
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

func cmdPrimary(args []string) error {
	fs := newFlagSet("primary")
	var gf guestFlags
	addGuestFlags(fs, &gf)
	var ef epochFlags
	addEpochFlags(fs, &ef)
	apiAddr := fs.String("api", "127.0.0.1:7070", "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7071", "address of the console bridge")
	secondary := fs.String("secondary", "", "the secondary's --data address (a pair without raft)")
	secName := fs.String("secondary-name", "", "with TLS, a pair without raft: the node the secondary's certificate must name (default: any certificate of the CA)")
	allowFaults := fs.Bool("allow-faults", false, "serve fault-injection endpoints (tests)")
	var cf clusterFlags
	addClusterFlags(fs, &cf, true)
	var rf receiveFlags
	addReceiveFlags(fs, &rf, false) // a member's received disk is its --disk, else DATA_DIR/disk.img
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	if cf.id != "" {
		if *secondary != "" || *secName != "" {
			return usagef("--secondary and --secondary-name are for a pair without raft; with --id the secondary is found through raft")
		}
		rf.disk = gf.cfg.Disk
		nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr, "--data", cf.data)
		if err != nil {
			return err
		}
		cf.tls, cf.insecure = nt.id, nt.insecure
		return runMember(failover.RolePrimary, cf, &gf, ef, rf, snapDir, *apiAddr, *consoleAddr, *allowFaults, nt)
	}
	kind, cfg, err := gf.config()
	if err != nil {
		return err
	}
	if err := ef.validate(); err != nil {
		return err
	}
	if *secondary != "" {
		if _, _, err := net.SplitHostPort(*secondary); err != nil {
			return usagef("--secondary %q: want HOST:PORT", *secondary)
		}
	}
	nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr)
	if err != nil {
		return err
	}
	if *secName != "" && nt.id == nil {
		return usagef("--secondary-name needs --tls-ca, --tls-cert and --tls-key (a name is checked on a certificate)")
	}
	log := newLogger()
	g, err := bootGuest(kind, cfg)
	if err != nil {
		return err
	}
	n, err := newGuestNode("primary", *apiAddr, *consoleAddr, log, nt)
	if err != nil {
		g.Close()
		return err
	}
	n.allowFaults = *allowFaults
	if err := n.setSnapshotDir(snapDir); err != nil {
		g.Close()
		n.close()
		return err
	}
	n.secName = *secName
	loop, cancel := startEpochs(n, g, cfg, ef, nil)
	n.mu.Lock()
	n.cancel = cancel
	n.mu.Unlock()
	if _, err := g.Resume(); err != nil {
		n.close()
		return fmt.Errorf("start the guest: %w", err)
	}
	n.setState("running")
	loop.SetSecondary(*secondary)
	log.Info("primary running", "kind", kind, "secondary", *secondary, "epoch", ef.epoch, "api", n.api.addr(), "console", n.console.addr(), "tls", nt.tlsOn())
	return n.wait()
}

// fenced is a pair primary told by its secondary that the secondary was
// activated: the loop has stopped releasing and paused the guest; the
// node says so and turns its console clients away.
func (n *guestNode) fenced(why string) {
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

func cmdSecondary(args []string) error {
	fs := newFlagSet("secondary")
	data := fs.String("data", "127.0.0.1:7092", "address the primary streams epochs to")
	apiAddr := fs.String("api", "127.0.0.1:7082", "address of the HTTP API")
	consoleAddr := fs.String("console", "127.0.0.1:7083", "address of the console bridge (serves once activated)")
	kind := fs.String("guest", "", "accept only this guest kind (kvm or synth); default: either")
	failureTimeout := fs.Duration("failure-timeout", DefaultFailureTimeout, "tandem activate refuses (without --force) while the primary was heard within this long")
	var ef epochFlags
	addEpochFlags(fs, &ef)
	primaryName := fs.String("primary-name", "", "with TLS, a pair without raft: the node the primary's certificate must name (default: any certificate of the CA)")
	var cf clusterFlags
	addClusterFlags(fs, &cf, false)
	fs.StringVar(&cf.dataAdvertise, "data-advertise", "", "the --data address as other nodes reach it, if not the same (NAT, a proxy)")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	addInsecureFlag(fs, &tf)
	dataDir := &cf.dataDir
	var rf receiveFlags
	addReceiveFlags(fs, &rf, true)
	var snapDir string
	addSnapshotDirFlag(fs, &snapDir)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	nt, err := tf.resolve("--api", *apiAddr, "--console", *consoleAddr, "--data", *data)
	if err != nil {
		return err
	}
	if cf.id != "" {
		if *primaryName != "" {
			return usagef("--primary-name is for a pair without raft; with --id the primary is the one raft names")
		}
		cf.data = *data
		cf.tls, cf.insecure = nt.id, nt.insecure
		return runMember(failover.RoleSecondary, cf, nil, ef, rf, snapDir, *apiAddr, *consoleAddr, false, nt)
	}
	if *primaryName != "" && nt.id == nil {
		return usagef("--primary-name needs --tls-ca, --tls-cert and --tls-key (a name is checked on a certificate)")
	}
	if *kind != "" && *kind != "kvm" && *kind != "synth" {
		return usagef("--guest %q: want kvm or synth", *kind)
	}
	if err := ef.validate(); err != nil {
		return err
	}
	log := newLogger()
	r := rf.apply(&replica.Receiver{NewGuest: emptyGuest, Build: version.Build(), Log: log, Kind: *kind, Timeout: 5 * time.Second}, *dataDir)
	sec := replica.NewSecondary(r, nil)
	// Load a kept image before the API answers, so the first status a
	// caller sees already says where this secondary stands.
	if *dataDir != "" {
		if err := fsperm.PrivateDir(*dataDir, log); err != nil {
			return fmt.Errorf("--data-dir: %w", err)
		}
		store, err := replica.OpenStoreWith(filepath.Join(*dataDir, "image"), log, replica.StoreOptions{Sync: r.Sync})
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
	n, err := newGuestNode("secondary", *apiAddr, *consoleAddr, log, nt)
	if err != nil {
		sec.Close()
		return err
	}
	if err := n.setSnapshotDir(snapDir); err != nil {
		sec.Close()
		n.close()
		return err
	}
	n.mu.Lock()
	n.sec = sec
	n.state = "standby"
	n.mu.Unlock()
	ln, err := nt.listen(log, "--data", *data, "data", netlimit.DataCap)
	if err != nil {
		n.close()
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	// In a pair the primary is whoever holds a certificate of the CA, or
	// the node --primary-name says.
	checkPrimary := func(conn net.Conn) error {
		if *primaryName == "" {
			return nil
		}
		return trust.CheckPeer(conn, *primaryName)
	}
	served := make(chan struct{})
	go func() {
		defer close(served)
		serveSecondary(ctx, ln, func() *replica.Secondary { return sec }, checkPrimary, log)
	}()
	n.api.mux.HandleFunc("POST /activate", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Force bool `json:"force"`
		}
		if r.ContentLength != 0 {
			if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
				writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"force\": BOOL}: %v", err))
				return
			}
		}
		if why := checkPrimaryGone(sec, *failureTimeout); why != "" {
			if !req.Force {
				writeError(w, http.StatusConflict, api.CodeRefused, errors.New(why))
				return
			}
			log.Error("FORCED ACTIVATION while the primary is alive: both may run the guest until it hears of this activation and fences itself (it does at once if its data link still works)",
				"detail", why)
		}
		epoch, err := activate(n, sec, ef)
		if err != nil {
			writeError(w, http.StatusConflict, api.CodeInternal, err)
			return
		}
		// The data port stays open: a primary that was cut off while
		// this node was activated joins again once the link heals, and
		// the refusal it gets (activated) fences it.
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "role": "primary", "activated_epoch": epoch})
	})
	log.Info("secondary waiting for a primary", "data", ln.Addr().String(), "api", n.api.addr(), "tls", nt.tlsOn())
	err = n.wait()
	cancel()
	ln.Close()
	joinWithin(func() { <-served }, serveJoinTimeout, log, "data connections")
	sec.Close()
	return err
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
func activate(n *guestNode, sec *replica.Secondary, ef epochFlags) (uint64, error) {
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
	n.setState("running")
	n.log.Info("activated: guest resumed from the last committed epoch", "epoch", c.Epoch, "took", time.Since(t0).String())
	return c.Epoch, nil
}

func cmdActivate(args []string) error {
	fs := newFlagSet("activate")
	api := fs.String("api", "127.0.0.1:7082", "API address of the secondary")
	force := fs.Bool("force", false, "activate even though the primary was heard within the secondary's --failure-timeout (split brain unless it is really gone)")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	st, err := newAPIClient(*api, id, 0).Activate(context.Background(), *force)
	if err != nil {
		return err
	}
	fmt.Printf("activated: role %v, guest resumed from committed epoch %v\n", st.Role, st.ActivatedEpoch)
	return nil
}

// secondaryName is the node a pair primary's secondary must be.
func (n *guestNode) secondaryName() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.secName
}

// handleProtect points the epoch loop of a primary without raft at a new
// secondary (after an activation, say): POST /protect {"secondary": ADDR,
// "name": NODE}; with TLS, name (if given) is the node the secondary's
// certificate must name from now on (without it, the name given before
// still applies).
func (n *guestNode) handleProtect(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Secondary string `json:"secondary"`
		Name      string `json:"name"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"secondary\": \"HOST:PORT\"}: %v", err))
		return
	}
	if _, _, err := net.SplitHostPort(req.Secondary); err != nil && req.Secondary != "" {
		writeError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("secondary %q: want HOST:PORT", req.Secondary))
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
		writeError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("this primary is fenced: its secondary was activated and runs the guest"))
	case clustered:
		writeError(w, http.StatusConflict, api.CodeRefused, errors.New("this node is in a raft cluster: its secondary is found through raft"))
	case loop == nil:
		writeError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not a primary"))
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
		writeJSON(w, http.StatusOK, map[string]any{"ok": true, "secondary": req.Secondary, "name": name})
	}
}

func cmdProtect(args []string) error {
	fs := newFlagSet("protect")
	api := fs.String("api", "127.0.0.1:7070", "API address of the primary")
	secondary := fs.String("secondary", "", "the secondary's --data address (\"\" drops protection)")
	name := fs.String("secondary-name", "", "with TLS: the node the secondary's certificate must name (default: any certificate of the CA)")
	var tf tlsFlags
	addTLSFlags(fs, &tf)
	if err := parseFlags(fs, args, 0); err != nil {
		return err
	}
	id, err := tf.load()
	if err != nil {
		return err
	}
	if _, err := newAPIClient(*api, id, 0).Protect(context.Background(), *secondary, *name); err != nil {
		return err
	}
	fmt.Printf("protecting with %q\n", *secondary)
	return nil
}
