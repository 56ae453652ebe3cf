// Package etcdlab starts a real etcd cluster inside the calling process
// (go.etcd.io/etcd/server/v3/embed): every member on its own loopback
// ports, its data in a directory the caller owns. Tests of the etcd
// coordinator and `tandem drill --coordinator etcd` run on it. It must
// never be used to serve anything but a test or a drill: its members
// share one process, so killing that process kills the whole cluster.
package etcdlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// StartTimeout bounds how long Start waits for the members to be ready.
const StartTimeout = 30 * time.Second

// TLSFiles, when set, makes every member's client port mutual TLS with
// these PEM files (the members' certificate must be valid for
// 127.0.0.1 and serve as server and client). Peer traffic stays
// plaintext on loopback.
type TLSFiles struct{ CA, Cert, Key string }

// Config describes a cluster.
type Config struct {
	Members int    // how many members (1 to 7)
	Dir     string // each member's data goes in Dir/<name>
	TLS     *TLSFiles
	// TickMs and ElectionMs are etcd's raft timings (0: etcd's defaults,
	// 100 and 1000).
	TickMs, ElectionMs uint
}

// Member is one etcd server of the cluster.
type Member struct {
	Name      string
	ClientURL string
	peerURL   string
	cfg       *embed.Config

	// mu guards etcd.
	mu   sync.Mutex
	etcd *embed.Etcd // nil while stopped
}

// Cluster is a running cluster.
type Cluster struct {
	Members []*Member
}

// Start runs a new cluster and waits (bounded) until every member is
// ready. Its ports are picked free (freeURL) but another process may bind
// one before the member does: Start then begins again on new ports, a
// few times.
func Start(cfg Config) (*Cluster, error) {
	if cfg.Members < 1 || cfg.Members > 7 {
		return nil, fmt.Errorf("etcdlab: %d members: want 1 to 7", cfg.Members)
	}
	var err error
	for range startAttempts {
		var c *Cluster
		if c, err = startOnce(cfg); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			return c, err
		}
		// A bootstrap that failed half-way leaves members' data of
		// that cluster: begin again from none.
		for i := range cfg.Members {
			os.RemoveAll(filepath.Join(cfg.Dir, memberName(i)))
		}
	}
	return nil, err
}

// startAttempts bounds Start's tries on ports taken under it;
// bindRetries and bindWait a restart's on its own ports.
const (
	startAttempts = 5
	bindRetries   = 20
	bindWait      = 100 * time.Millisecond
)

func memberName(i int) string { return fmt.Sprintf("m%d", i) }

// startOnce is one attempt of Start.
func startOnce(cfg Config) (*Cluster, error) {
	scheme := "http"
	if cfg.TLS != nil {
		scheme = "https"
	}
	c := &Cluster{}
	var initial []string
	for i := range cfg.Members {
		peer, err := freeURL("http")
		if err != nil {
			return nil, err
		}
		client, err := freeURL(scheme)
		if err != nil {
			return nil, err
		}
		m := &Member{Name: memberName(i), ClientURL: client, peerURL: peer}
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+peer)
	}
	for _, m := range c.Members {
		m.cfg = memberConfig(cfg, m, strings.Join(initial, ","))
	}
	errs := make(chan error, len(c.Members))
	for _, m := range c.Members {
		go func() { errs <- m.startOnce() }() // bootstrap needs every member up at once
	}
	var first error
	for range c.Members {
		if err := <-errs; err != nil && (first == nil || errors.Is(err, syscall.EADDRINUSE)) {
			first = err // a bind error first: the others then fail waiting for it
		}
	}
	if first != nil {
		c.Close()
		return nil, first
	}
	return c, nil
}

// memberConfig is m's embed configuration.
func memberConfig(cfg Config, m *Member, initial string) *embed.Config {
	ec := embed.NewConfig()
	ec.Name = m.Name
	ec.Dir = filepath.Join(cfg.Dir, m.Name)
	pu, _ := url.Parse(m.peerURL)
	cu, _ := url.Parse(m.ClientURL)
	ec.ListenPeerUrls, ec.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	ec.ListenClientUrls, ec.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	ec.InitialCluster = initial
	ec.InitialClusterToken = "etcdlab-" + filepath.Base(cfg.Dir)
	// etcd's own log (zap, JSON) would drown the caller's: members log
	// nothing; a test sees their state through the client.
	ec.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	if cfg.TickMs != 0 {
		ec.TickMs, ec.ElectionMs = cfg.TickMs, cfg.ElectionMs
	}
	if cfg.TLS != nil {
		ec.ClientTLSInfo = transport.TLSInfo{CertFile: cfg.TLS.Cert, KeyFile: cfg.TLS.Key, TrustedCAFile: cfg.TLS.CA, ClientCertAuth: true}
	}
	return ec
}

// freeURL is a URL on a loopback port nobody listens on now (someone may
// by the time a member binds it: Start and start retry).
func freeURL(scheme string) (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	addr := ln.Addr().String()
	ln.Close()
	takeNext(addr)
	return scheme + "://" + addr, nil
}

// takeNext is a test's hook: it may bind the address freeURL just
// handed out, as a parallel test could.
var takeNext = func(string) {}

// start runs m again, with the data and ports it kept, and waits until
// it is ready. A port of m's held by someone else (another test's probe
// in freeURL holds one for a moment) is tried again, bindRetries times.
func (m *Member) start() error {
	var err error
	for range bindRetries {
		if err = m.startOnce(); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			return err
		}
		time.Sleep(bindWait)
	}
	return err
}

// startOnce runs m once and waits until it is ready.
func (m *Member) startOnce() error {
	e, err := embed.StartEtcd(m.cfg)
	if err != nil {
		return fmt.Errorf("etcdlab: start %s: %w", m.Name, err)
	}
	t := time.NewTimer(StartTimeout)
	defer t.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return fmt.Errorf("etcdlab: %s: %w", m.Name, err)
	case <-t.C:
		e.Close()
		return fmt.Errorf("etcdlab: %s not ready after %v", m.Name, StartTimeout)
	}
	m.mu.Lock()
	m.etcd = e
	m.mu.Unlock()
	return nil
}

// Stop stops m gracefully (a leader hands its leadership over first);
// its data stays. Restart runs it again.
func (m *Member) Stop() {
	m.mu.Lock()
	e := m.etcd
	m.etcd = nil
	m.mu.Unlock()
	if e != nil {
		e.Close()
	}
}

// Kill stops m without handing its leadership over first (as a crash
// would: the others elect a leader after their election timeout); its
// data stays.
func (m *Member) Kill() {
	m.mu.Lock()
	e := m.etcd
	m.etcd = nil
	m.mu.Unlock()
	if e != nil {
		e.Server.HardStop()
		e.Close()
	}
}

// Restart runs a stopped member again.
func (m *Member) Restart() error { return m.start() }

// IsLeader says whether m runs and leads the etcd cluster.
func (m *Member) IsLeader() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.etcd != nil && m.etcd.Server.Leader() == m.etcd.Server.MemberID()
}

// Endpoints are the members' client URLs.
func (c *Cluster) Endpoints() []string {
	var out []string
	for _, m := range c.Members {
		out = append(out, m.ClientURL)
	}
	return out
}

// Leader is the member that leads now, waiting (bounded by ctx) for one.
func (c *Cluster) Leader(ctx context.Context) (*Member, error) {
	for {
		for _, m := range c.Members {
			if m.IsLeader() {
				return m, nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, errors.New("etcdlab: no leader")
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Close stops every member.
func (c *Cluster) Close() {
	for _, m := range c.Members {
		m.Stop()
	}
}
