package etcdcoord

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tandemvm/tandem/failover"
	"github.com/tandemvm/tandem/internal/etcdlab"
	"github.com/tandemvm/tandem/internal/trust"
)

// TestEtcdCertMustNameHost: over TLS the node checks etcd's certificate
// like any TLS client: chained to the CA and naming the endpoint's host.
// An etcd whose certificate (same CA) names 127.0.0.1 is joined; one
// whose certificate of the same CA names another host is refused (before,
// any certificate of the CA passed).
func TestEtcdCertMustNameHost(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	now := time.Now()
	if err := trust.NewCA(dir, "test CA", now); err != nil {
		t.Fatal(err)
	}
	for name, opts := range map[string]trust.IssueOptions{
		"etcd":  {IPs: []net.IP{net.IPv4(127, 0, 0, 1)}},
		"rogue": {DNS: []string{"elsewhere.example"}},
		"a":     {},
	} {
		if err := trust.Issue(dir, name, opts, now); err != nil {
			t.Fatal(err)
		}
	}
	id, err := trust.Load(trust.Config{CAFile: filepath.Join(dir, trust.CAFile),
		CertFile: filepath.Join(dir, trust.CertFile("a")), KeyFile: filepath.Join(dir, trust.KeyFile("a"))})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		server string
		ok     bool
	}{{"etcd", true}, {"rogue", false}} {
		ec, err := etcdlab.Start(etcdlab.Config{Members: 1, Dir: t.TempDir(), TickMs: 50, ElectionMs: 500,
			TLS: &etcdlab.TLSFiles{CA: filepath.Join(dir, trust.CAFile),
				Cert: filepath.Join(dir, trust.CertFile(tc.server)), Key: filepath.Join(dir, trust.KeyFile(tc.server))}})
		if err != nil {
			t.Fatal(err)
		}
		cfg := nodeConfig(t, t.TempDir(), "g1", "a", failover.RolePrimary, ec.Endpoints())
		cfg.TLS = id
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := Open(ctx, cfg)
		cancel()
		if err == nil {
			c.Close()
		}
		ec.Close()
		switch {
		case tc.ok && err != nil:
			t.Errorf("etcd with a certificate for 127.0.0.1 refused: %v", err)
		case !tc.ok && err == nil:
			t.Errorf("etcd at 127.0.0.1 with a certificate for elsewhere.example was joined")
		case !tc.ok && !strings.Contains(err.Error(), "unreachable"):
			t.Errorf("refusal %v: want the endpoints named unreachable", err)
		}
	}
}
