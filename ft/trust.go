package ft

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"

	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/trust"
)

// handshakeTimeout bounds a server-side TLS handshake: a connection that
// has not completed one by then is dropped before anything is read.
const handshakeTimeout = trust.HandshakeTimeout

// Trust is how a node's listeners and clients authenticate: its identity
// (nil: plaintext) and whether plaintext may bind a non-loopback address.
type Trust struct {
	ID       *trust.Identity
	Insecure bool
}

// Listen opens one of the node's listeners through trust (mutual TLS with
// an identity; otherwise loopback only unless Insecure, which is logged as
// a warning when it binds more). Under TLS, netlimit caps the connections
// still in their handshake (the TLS handshake included) at capN, closing
// the oldest; capName names the listener in its logs. A plaintext
// non-loopback address without Insecure is refused with an error that
// wraps trust.ErrPlaintext.
func (nt Trust) Listen(log *slog.Logger, what, addr, capName string, capN int) (net.Listener, error) {
	ln, err := trust.ListenWrapped(nt.ID, nt.Insecure, what, addr, func(ln net.Listener) net.Listener {
		return netlimit.Wrap(ln, capName, capN, log)
	})
	if err != nil {
		return nil, err
	}
	if nt.ID == nil && trust.CheckListen(nil, false, what, addr) != nil && log != nil {
		log.Warn("--insecure: listening WITHOUT TLS on a non-loopback address; anyone who reaches it can read and inject traffic", "listener", what, "addr", ln.Addr().String())
	}
	return ln, nil
}

// ResolveTrust loads the identity cfg names (nil without TLS files) and
// checks every listen address up front (pairs of flag name and address;
// empty addresses are skipped), so a plaintext non-loopback listen without
// cfg.Insecure is refused before anything starts.
func ResolveTrust(cfg trust.Config, listens ...string) (Trust, error) {
	id, err := trust.Load(cfg)
	if err != nil {
		return Trust{}, err
	}
	nt := Trust{ID: id, Insecure: cfg.Insecure}
	for i := 0; i+1 < len(listens); i += 2 {
		if listens[i+1] == "" {
			continue
		}
		if err := trust.CheckListen(id, nt.Insecure, listens[i], listens[i+1]); err != nil {
			return Trust{}, err
		}
	}
	return nt, nil
}

// TLSOn says whether the node's channels are mutual TLS (for logs).
func (nt Trust) TLSOn() bool { return nt.ID != nil }

// Paths and bounds of what a node takes from the network (see
// docs/SECURITY.md, "Input bounds and paths"): a node never opens a path
// a peer named. A snapshot written for POST /migrate lands in this node's
// snapshot directory under a plain name.

// errNoSnapshotDir refuses a file migration on a node without a place
// for snapshots.
var errNoSnapshotDir = errors.New("no --snapshot-dir: file migrations are off")

// snapshotPath resolves the NAME of a file:NAME migration target under
// dir. NAME is a plain file name: a path (a slash, "." or "..") is
// refused, so a caller of the API cannot make the node write anywhere else.
func snapshotPath(dir, name string) (string, error) {
	if dir == "" {
		return "", errNoSnapshotDir
	}
	if err := PlainName(name); err != nil {
		return "", fmt.Errorf("snapshot file:%s: %w", name, err)
	}
	return filepath.Join(dir, name), nil
}

// PlainName refuses a snapshot name that is not a plain file name.
func PlainName(name string) error {
	switch {
	case name == "":
		return errors.New("want file:NAME with a file name")
	case strings.ContainsAny(name, "/\\\x00"), name == ".", name == "..":
		return errors.New("want a plain file name (no directory): snapshots land in the node's --snapshot-dir")
	}
	return nil
}

// setSnapshotDir makes dir (created if missing) the node's place for
// snapshots, private: 0700, tightened if looser.
func (n *Node) setSnapshotDir(dir string) error {
	if dir == "" {
		return nil
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return fmt.Errorf("--snapshot-dir %q: %w", dir, err)
	}
	if err := fsperm.PrivateDir(abs, n.log); err != nil {
		return fmt.Errorf("--snapshot-dir: %w", err)
	}
	n.snapshotDir = abs
	return nil
}
