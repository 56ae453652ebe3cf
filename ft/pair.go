package ft

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/replica"
)

// PairPrimaryConfig configures the primary of a pair without raft.
type PairPrimaryConfig struct {
	Node NodeConfig
	// Guest is the booted guest (not yet run), of GuestConfig; the
	// primary closes it.
	Guest       guest.Guest
	GuestConfig guest.Config
	// Secondary is the secondary's data address ("": unprotected until
	// POST /protect names one); SecondaryName, with TLS, the node its
	// certificate must name ("": any certificate of the CA).
	Secondary, SecondaryName string
	Epochs                   EpochSettings
}

// RunPairPrimary runs cfg.Guest protected by a secondary until ctx ends
// or POST /quit: the Member driver with a pair primary's coordinator.
func RunPairPrimary(ctx context.Context, cfg PairPrimaryConfig) error {
	g := cfg.Guest
	n, err := NewNode(cfg.Node)
	if err != nil {
		g.Close()
		return err
	}
	defer n.Close()
	coord := NewPairPrimary(cfg.Secondary, cfg.SecondaryName)
	m := NewMember(MemberConfig{Node: n, Coordinator: coord, Epochs: cfg.Epochs, Log: n.log, Fresh: true,
		Boot: func() (guest.Guest, error) { return g, nil }, BootConfig: cfg.GuestConfig})
	n.mu.Lock()
	n.pair, n.pairMember = coord, m
	n.mu.Unlock()
	n.Start()
	m.Start()
	n.log.Info("primary running", "kind", g.Kind(), "secondary", cfg.Secondary, "epoch", cfg.Epochs.Interval, "api", n.APIAddr(), "console", n.ConsoleAddr(), "tls", n.trust.TLSOn())
	n.Wait(ctx)
	m.Stop()
	return nil
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

// RunPairSecondary keeps a committed replica of a pair primary's guest
// until ctx ends or POST /quit: the Member driver with a pair secondary's
// coordinator, made primary by POST /activate. Once activated it is a
// primary like a pair's first (POST /protect gives it a secondary), and
// its data port stays open: a primary that was cut off while this node
// was activated joins again once the link heals, and the refusal it gets
// (activated) fences it.
func RunPairSecondary(ctx context.Context, cfg PairSecondaryConfig) error {
	log := cfg.Node.Log
	if cfg.DataDir != "" {
		if err := fsperm.PrivateDir(cfg.DataDir, log); err != nil {
			return fmt.Errorf("--data-dir: %w", err)
		}
		// A store that cannot be opened stops the start: the operator
		// asked for a replica that survives a restart.
		if _, err := replica.OpenStoreWith(filepath.Join(cfg.DataDir, "image"), log, replica.StoreOptions{Sync: cfg.Receiver.Sync, AcceptUnsynced: cfg.Receiver.AcceptUnsynced}); err != nil {
			return err
		}
	}
	n, err := NewNode(cfg.Node)
	if err != nil {
		return err
	}
	defer n.Close()
	ln, err := cfg.Node.Trust.Listen(log, "--data", cfg.DataAddr, "data", netlimit.DataCap)
	if err != nil {
		return err
	}
	coord := NewPairSecondary(cfg.PrimaryName)
	m := NewMember(MemberConfig{Node: n, Coordinator: coord, Epochs: cfg.Epochs, Receiver: cfg.Receiver,
		DataDir: cfg.DataDir, Data: ln, KeepActivated: true, Log: log})
	n.mu.Lock()
	n.pair, n.pairMember = coord, m
	n.mu.Unlock()
	n.HandleFunc("POST /activate", m.handleActivate(cfg.FailureTimeout))
	// The pair's coordinator is in sync at once: the kept image is loaded
	// before the API answers, so the first status a caller sees already
	// says where this secondary stands.
	m.Start()
	n.Start()
	log.Info("secondary waiting for a primary", "data", ln.Addr().String(), "api", n.APIAddr(), "tls", n.trust.TLSOn())
	n.Wait(ctx)
	m.Stop()
	return nil
}

// handleActivate is POST /activate {"force": BOOL} on a pair secondary:
// the operator, the pair's only judge of the primary's death, makes this
// node primary. It is refused while the primary was heard within
// failureTimeout, unless forced.
func (m *Member) handleActivate(failureTimeout time.Duration) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		force, ok := readForce(w, r)
		if !ok {
			return
		}
		m.mu.Lock()
		sec := m.sec
		m.mu.Unlock()
		if sec == nil {
			WriteError(w, http.StatusConflict, api.CodeRefused, errors.New("activate: not a secondary (already activated?)"))
			return
		}
		mv, moving := sec.Move()
		if moving && mv.Done {
			// Even forced: the guest runs at the destination, from
			// later than anything this secondary holds.
			WriteError(w, http.StatusConflict, api.CodeRefused, sec.MovedError())
			return
		}
		if why := checkPrimaryGone(sec, failureTimeout); why != "" {
			if !force {
				WriteError(w, http.StatusConflict, api.CodeRefused, errors.New(why))
				return
			}
			m.log.Error("FORCED ACTIVATION while the primary is alive: both may run the guest until it hears of this activation and fences itself (it does at once if its data link still works)",
				"detail", why)
		}
		epoch, err := m.becomePrimary(failover.Event{Kind: failover.EventBecamePrimary})
		if err != nil {
			WriteError(w, http.StatusConflict, api.CodeInternal, fmt.Errorf("activate: %w", err))
			return
		}
		reply := map[string]any{"ok": true, "role": "primary", "activated_epoch": epoch}
		if moving {
			why := fellBack(mv, epoch)
			m.n.setStateWhy("running", why)
			m.log.Error("FELL BACK: "+why, "migration", mv.MigrationID, "destination", mv.Destination)
			reply["fell_back"] = why
		}
		WriteJSON(w, http.StatusOK, reply)
	}
}

// fellBack says that an activated secondary took over a guest its
// primary was moving (mv): the move's destination holds a half guest that
// released nothing and is to be discarded.
func fellBack(mv replica.Move, epoch uint64) string {
	return fmt.Sprintf("fell back to this secondary's last committed epoch %d: the primary %s died (or was given up) during post-copy migration %s to %s, which started from epoch %d; the half guest on %s released no output and must be discarded",
		epoch, mv.From, mv.MigrationID, mv.Destination, mv.Epoch, mv.Destination)
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
	loop, clustered, pair := n.epochs, n.cluster != nil, n.pair
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
	case loop == nil || pair == nil:
		WriteError(w, http.StatusConflict, api.CodeNotPrimary, errors.New("not a primary"))
	default:
		// Without a name the one given before (--secondary-name or an
		// earlier protect) still applies: a check is never dropped by
		// leaving it out.
		name := pair.setSecondary(req.Secondary, req.Name)
		loop.SetSecondary(req.Secondary)
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true, "secondary": req.Secondary, "name": name})
	}
}
